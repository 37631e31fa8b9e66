"""Software pixel conversion (swscale through PyAV) for the capture node's
CONVERT formats.  Imported only when such a format is in use: PyAV and numpy
are not on the camera (formats.capture_formats() does not offer them there).
"""

from __future__ import annotations

import threading

import av
import numpy as np

from .formats import PixFormat


class Converter:
    """NV12 -> ``fmt`` through swscale, for frames of one size.

    Scratch NV12 buffers come from a small pool (the backend may hold more
    than one while a frame is in flight); each is wrapped once as an
    ``av.VideoFrame`` without copying.
    """

    def __init__(self, fmt: PixFormat, width: int, height: int):
        assert fmt.av_format
        self.fmt = fmt
        self.width = width
        self.height = height
        self._lock = threading.Lock()
        self._free: list[np.ndarray] = []
        self._frames: dict[int, av.VideoFrame] = {}

    def scratch(self) -> memoryview:
        """A writable NV12 buffer for the backend (return it with convert/release)."""
        with self._lock:
            if self._free:
                arr = self._free.pop()
            else:
                arr = np.empty((self.height * 3 // 2, self.width), np.uint8)
                self._frames[id(arr)] = av.VideoFrame.from_numpy_buffer(arr, format="nv12")
        return memoryview(arr).cast("B")

    def release(self, scratch: memoryview) -> None:
        with self._lock:
            self._free.append(scratch.obj)  # type: ignore[arg-type]

    def convert(self, scratch: memoryview, dst: memoryview) -> int:
        """Convert the NV12 frame in ``scratch`` into ``dst``; returns bytes written."""
        arr = scratch.obj
        frame = self._frames[id(arr)]
        out = frame.reformat(format=self.fmt.av_format)
        target = np.frombuffer(dst, np.uint8)
        pos = 0
        w, h = self.width, self.height
        # Copy each plane row-block into the tightly packed V4L2 layout.
        for plane, (pw, ph) in zip(out.planes, _plane_dims(self.fmt.av_format, w, h)):
            src = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:ph, :pw]
            target[pos:pos + pw * ph].reshape(ph, pw)[:] = src
            pos += pw * ph
        return pos


def _plane_dims(av_format: str, w: int, h: int) -> list[tuple[int, int]]:
    """Bytes per row and rows of each plane of the packed V4L2 layout."""
    if av_format == "yuyv422":
        return [(w * 2, h)]
    if av_format == "yuv420p":
        return [(w, h), (w // 2, h // 2), (w // 2, h // 2)]
    raise ValueError(av_format)
