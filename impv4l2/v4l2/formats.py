"""Pixel formats of the capture nodes, as data.

Each entry says how frames of that format are produced from a channel:

* ``NATIVE``  – the channel writes NV12 straight into the client's buffer (zero copy);
* ``CONVERT`` – the channel writes NV12 into a node scratch buffer and swscale
  (PyAV ``VideoFrame.reformat``) converts it into the client's buffer (one
  conversion, plus one memcpy of the converted planes);
* ``ENCODED`` – ``channel.start_encoded`` (IMP's FrameSource->Encoder
  binding) writes one access unit / one JPEG picture into the client's buffer.

All raw formats share one colorimetry (Rec.709, limited range) so G/S/TRY_FMT
and ENUM_FMT answer consistently; MJPEG says what its pictures are (JFIF:
BT.601, full range).
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from typing import Callable

import av
import numpy as np

from ..driver.base import Codec
from ..memfd import page_align
from . import abi


class Produce(enum.Enum):
    NATIVE = "native"
    CONVERT = "convert"
    ENCODED = "encoded"


Layout = Callable[[int, int], tuple[int, int]]  # (width, height) -> (bytesperline, sizeimage)


@dataclasses.dataclass(frozen=True)
class PixFormat:
    """One entry of ENUM_FMT for a capture node."""

    fourcc: int
    description: str  # ≤ 31 chars, the kernel's v4l_fill_fmtdesc wording
    produce: Produce
    layout: Layout
    av_format: str | None = None  # swscale target (CONVERT)
    codec: str | None = None  # ENCODED: driver.base.Codec value
    compressed: bool = False
    colorimetry: tuple[int, int, int, int] | None = None  # (colorspace, ycbcr_enc, quant, xfer); None: raw's

    @property
    def flags(self) -> int:
        return abi.FmtFlag.COMPRESSED if self.compressed else 0


def _nv12(w: int, h: int) -> tuple[int, int]:
    return w, w * h * 3 // 2


def _yuyv(w: int, h: int) -> tuple[int, int]:
    return w * 2, w * 2 * h


def _yu12(w: int, h: int) -> tuple[int, int]:
    return w, w * h + 2 * ((w // 2) * (h // 2))


def _compressed(w: int, h: int) -> tuple[int, int]:
    # Worst case of one access unit / JPEG picture (a raw frame plus headers,
    # page aligned; the memfd is sparse, unused bytes cost nothing);
    # bytesperline is 0 for compressed formats.
    return 0, max((w * h * 3 // 2 + (16 << 10) + 4095) & ~4095, 64 << 10)


PF = abi.PixelFormat
RAW_FORMATS: tuple[PixFormat, ...] = (
    # v4l-utils ≤ 1.22 (Debian 12) names NV12 "Y/CbCr 4:2:0" and v4l2-compliance fails a
    # driver whose description differs; kernel ≥ 5.x and v4l-utils ≥ 1.24 say "Y/UV 4:2:0".
    PixFormat(PF.NV12, "Y/CbCr 4:2:0", Produce.NATIVE, _nv12),
    PixFormat(PF.YUYV, "YUYV 4:2:2", Produce.CONVERT, _yuyv, av_format="yuyv422"),
    PixFormat(PF.YUV420, "Planar YUV 4:2:0", Produce.CONVERT, _yu12, av_format="yuv420p"),
)
JPEG_COLORIMETRY = (abi.Colorspace.JPEG, abi.YcbcrEnc._601, abi.Quantization.FULL_RANGE,
                    abi.XferFunc.SRGB)
# Compressed formats of a capture node: the AVPU channel bound to its frame channel.
ENCODED_FORMATS: tuple[PixFormat, ...] = (
    PixFormat(PF.H264, "H.264", Produce.ENCODED, _compressed, codec="h264", compressed=True),
    PixFormat(PF.MJPEG, "Motion-JPEG", Produce.ENCODED, _compressed, codec="jpeg",
              compressed=True, colorimetry=JPEG_COLORIMETRY),
)
CAPTURE_FORMATS = RAW_FORMATS + ENCODED_FORMATS

# Colorimetry of every raw format (the ISP outputs BT.709 limited-range YUV).
COLORSPACE = abi.Colorspace.REC709
YCBCR_ENC = abi.YcbcrEnc._709
QUANTIZATION = abi.Quantization.LIM_RANGE
XFER_FUNC = abi.XferFunc._709


def fill_pix(pix: abi.v4l2_pix_format, fmt: PixFormat, width: int, height: int) -> None:
    """Fill a v4l2_pix_format completely (all other fields zero)."""
    abi.zero(pix)
    bpl, size = fmt.layout(width, height)
    pix.width = width
    pix.height = height
    pix.pixelformat = fmt.fourcc
    pix.field = abi.Field.NONE
    pix.bytesperline = bpl
    pix.sizeimage = size
    pix.colorspace, pix.ycbcr_enc, pix.quantization, pix.xfer_func = (
        fmt.colorimetry or (COLORSPACE, YCBCR_ENC, QUANTIZATION, XFER_FUNC))


def nearest_size(sizes, width: int, height: int) -> tuple[int, int]:
    """The supported size closest to the request (as v4l2_find_nearest_size)."""
    return min(sizes, key=lambda s: (abs(s[0] - width) + abs(s[1] - height), -s[0]))


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


# ---------------------------------------------------------------- the M2M encoder's formats

@dataclasses.dataclass(frozen=True)
class RawFormat:
    """An OUTPUT (raw) format: one plane of width*height*3/2 bytes, stride = width."""

    fourcc: int
    description: str  # the kernel's v4l_fill_fmtdesc wording
    backend: str  # EncoderParams.pixel_format

    def layout(self, w: int, h: int) -> tuple[int, int]:
        return w, w * h * 3 // 2


@dataclasses.dataclass(frozen=True)
class CodedFormat:
    """A CAPTURE (coded) format."""

    fourcc: int
    description: str
    codec: Codec

    @staticmethod
    def sizeimage_range(w: int, h: int) -> tuple[int, int]:
        """(minimum accepted, default): the default holds a worst-case AU
        (a raw frame's size plus headers); clients may ask down to half of it."""
        raw = w * h * 3 // 2
        return max(page_align(raw // 3), 64 << 10), page_align(raw + (16 << 10))


RAW_FORMATS = (
    RawFormat(PF.NV12, "Y/CbCr 4:2:0", "nv12"),
    RawFormat(PF.YUV420, "Planar YUV 4:2:0", "yu12"),
)
CODED_FORMATS = (CodedFormat(PF.H264, "H.264", Codec.H264),)
