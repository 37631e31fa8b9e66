"""Pixel formats of the capture nodes, as data.

Each entry says how frames of that format are produced from a channel:

* ``NATIVE``  – the channel writes NV12 straight into the client's buffer (zero copy);
* ``CONVERT`` – the channel writes NV12 into a node scratch buffer and swscale
  (PyAV ``VideoFrame.reformat``, v4l2/convert.py) converts it into the
  client's buffer; offered only where PyAV and numpy are installed (not on
  the camera);
* ``ENCODED`` – ``channel.start_encoded`` (IMP's FrameSource->Encoder
  binding) writes one access unit / one JPEG picture into the client's buffer.

All raw formats share one colorimetry (Rec.709, limited range) so G/S/TRY_FMT
and ENUM_FMT answer consistently; MJPEG says what its pictures are (JFIF:
BT.601, full range).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable

from .. import optional
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
    PixFormat(PF.HEVC, "HEVC", Produce.ENCODED, _compressed, codec="hevc", compressed=True),
    PixFormat(PF.MJPEG, "Motion-JPEG", Produce.ENCODED, _compressed, codec="jpeg",
              compressed=True, colorimetry=JPEG_COLORIMETRY),
)
CAPTURE_FORMATS = RAW_FORMATS + ENCODED_FORMATS


def capture_formats(codecs=None) -> tuple[PixFormat, ...]:
    """What this runtime can produce: no CONVERT formats without PyAV and numpy, ENCODED
    formats only of ``codecs`` (driver.base.Codec members: what the AVPU encodes; None: all)."""
    convert = optional.have("av", "numpy")
    values = None if codecs is None else {c.value for c in codecs}
    return tuple(f for f in CAPTURE_FORMATS
                 if (convert or f.produce != Produce.CONVERT)
                 and (values is None or f.codec is None or f.codec in values))

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


ENCODER_RAW_FORMATS = (
    RawFormat(PF.NV12, "Y/CbCr 4:2:0", "nv12"),
    RawFormat(PF.YUV420, "Planar YUV 4:2:0", "yu12"),
)
CODED_FORMATS = (CodedFormat(PF.H264, "H.264", Codec.H264), CodedFormat(PF.HEVC, "HEVC", Codec.HEVC))


def coded_formats(codecs) -> tuple[CodedFormat, ...]:
    """The M2M encoder's CAPTURE formats among ``codecs`` (what the AVPU encodes)."""
    return tuple(f for f in CODED_FORMATS if f.codec in codecs)
