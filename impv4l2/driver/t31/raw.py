"""The raw frame channel of the t31 backend: NV12 from IMP_FrameSource_GetFrame.

The vendor's NV12 has its UV plane at width * ALIGN(height, NV12_UV_ALIGN),
the rows between are padding (OpenIMP framesource_tseries.c: buffers
ALIGN16(w) * ALIGN16(h) * 3/2; the SDK samples' nv12_copyto_yuyv422 reads
UV at src + w * ((h + 15) & ~15)).  The client gets contiguous NV12: one
copy per plane, straight into its buffer.
"""

from __future__ import annotations

import ctypes
import logging
from ctypes import byref
from typing import Protocol

from ..base import FrameInfo, FrameSink
from . import structs as st
from .capture import Capture, ChannelHost, dest

log = logging.getLogger("impv4l2.t31")
S = st.native

__all__ = ["NV12_UV_ALIGN", "RawCapture", "RawHost"]

NV12_UV_ALIGN = 16


class RawHost(ChannelHost, Protocol):
    """What a raw capture needs of its frame channel."""

    frame_cls: type  # the release's IMPFrameInfo


class RawCapture:
    """GetFrame -> copy -> ReleaseFrame on a thread of its own, until :meth:`stop`."""

    def __init__(self, host: RawHost, sink: FrameSink):
        self.host, self.lib, self.sink = host, host.lib, sink
        self.seq = 0
        self._frame_ptr = ctypes.POINTER(S.IMPFrameInfo)()
        self._capture = Capture(f"impv4l2-t31-ch{host.index}-nv12", self._step,
                                lambda: host.deliver_error(self.sink, self.seq))

    def stop(self) -> None:
        self._capture.stop()

    def _step(self) -> None:
        lib, fp, index = self.lib, self._frame_ptr, self.host.index
        if lib.IMP_FrameSource_GetFrame(index, byref(fp)) < 0:  # the vendor's gives up after 2 s
            raise TimeoutError
        buf = None
        try:
            f = fp.contents
            ts_us = ctypes.cast(fp, ctypes.POINTER(self.host.frame_cls)).contents.timeStamp
            buf = self.sink.get_buffer()
            info = FrameInfo(timestamp_ns=self.host.to_monotonic_ns(ts_us), sequence=self.seq)
            if buf is not None:
                _keep, dst, cap = dest(buf.view)
                w, h = f.width, f.height
                y, uv = w * h, w * (h // 2)  # contiguous NV12 for the client
                if y + uv > cap:
                    info.error, y, uv = True, min(y, cap), max(0, cap - y)
                ctypes.memmove(dst, f.virAddr, y)  # the one copy, plane by plane:
                uv_at = w * (-(-h // NV12_UV_ALIGN) * NV12_UV_ALIGN)  # the UV plane after padding rows
                ctypes.memmove(dst + y, f.virAddr + uv_at, uv)
                info.bytesused = y + uv
        finally:
            lib.IMP_FrameSource_ReleaseFrame(index, fp)
        self.seq += 1
        if buf is not None:
            self.sink.frame_done(buf, info)
