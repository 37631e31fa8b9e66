"""The sim AVPU: libx264, libx265 (and FFmpeg's MJPEG) through PyAV, shaped like the T31.

What the T31 AVPU emits, and so what this encoder emits:

* H.264 Annex-B, every NAL with a 4-byte start code (x264's 3-byte ones are
  widened), no AUD, no SEI (x264's version SEI is dropped), SPS+PPS before
  every IDR, no B-frames, closed GOP, an IDR exactly every ``gop`` frames
  (scenecut off) or when requested;
* H.265 the same way (libx265, Main profile): VPS+SPS+PPS before every IDR
  (repeat-headers), no AUD, no SEI, one slice per picture, no thread pool
  (``pools=none``, one frame thread: deterministic and cheap).  Offered only
  when the installed PyAV's FFmpeg has libx265 (:data:`HAVE_X265`);
* zero latency: every ``encode()`` returns the access unit of that very frame
  (tune=zerolatency: no lookahead, sliced threads instead of frame threads);
* one slice per picture (NAL sequence 7, 8, 5, 1, 1, ...), as the AVPU codes
  it: x264 runs one thread per channel (:data:`X264_THREADS`; sliced threads
  would cut each picture into one slice per thread).  The parallelism is across
  channels, each encoding on its own thread with the GIL released; one
  ultrafast 1080p channel alone runs at ~120 fps on one core here
  (benchmarks/bench_avpu.py);
* JPEG: one baseline JPEG per frame.

Input frames are NV12 (or I420 with ``EncoderParams.pixel_format="yu12"``)
memory of ``width*height*3/2`` bytes; the AVFrame is built on that memory
(no copy in Python; libx264 copies the picture into its own frame pool, as
the direct PyAV path does too).

Rate control (IMP's modes mapped to x264):

=============== ==========================================================
FIXQP           qp = p_qp, ipratio = 2^((p_qp - i_qp)/6) so I frames get i_qp
CBR             bitrate = vbv-maxrate = target, vbv-bufsize = 1 s, nal-hrd none
VBR             bitrate = target, vbv-maxrate = max_bitrate, bufsize = 1 s of max
CAPPED_VBR      same as VBR (the cap is the VBV maxrate)
CAPPED_QUALITY  crf = p_qp, vbv-maxrate = max_bitrate, bufsize = 1 s of max
=============== ==========================================================

``min_qp``/``max_qp`` become qpmin/qpmax in every mode but FIXQP.

Changing parameters while streaming (:meth:`SimH264Channel.update`):

* a new ``bitrate`` in CBR/VBR/CAPPED_VBR takes effect on the next frame
  (FFmpeg's libx264 wrapper calls ``x264_encoder_reconfig`` when
  ``AVCodecContext.bit_rate`` changes) — no IDR;
* everything else that changes the encoder (max_bitrate, VBV, gop, QPs,
  rc_mode, profile, level; and the exact CBR maxrate after a bitrate change)
  re-opens the encoder at the next IDR: the next GOP boundary, or earlier if
  :meth:`request_idr` is called — the new encoder starts with an IDR, so the
  stream stays decodable and no extra keyframe is spent;
* width, height, frame rate and pixel_format re-open before the next frame
  (an IDR) because the input itself changes.
"""

from __future__ import annotations

import dataclasses
import fractions
import logging
import threading
from typing import Callable

import av
import numpy as np

from .. import base
from ..base import Codec, EncodedFrame, EncoderChannel, EncoderParams, OutputTooSmall, RcMode  # noqa: F401 (re-exported)
from ..h264 import HEVC, H264, START_CODE, NalSpan, NalSyntax, level_idc, nal_spans

log = logging.getLogger("impv4l2.driver.sim.avpu")

# x264 threads per H.264 channel.  Sliced threads (the zero-latency kind) give one slice per
# thread; the T31's AVPU codes one slice per picture, so one thread (frame threads would
# delay every AU by a frame per thread).
X264_THREADS = 1
HAVE_X265 = "libx265" in av.codecs_available

# EncoderParams.pixel_format -> (PyAV pixel format, rows of width bytes per
# frame as a multiple of height/2: both are 4:2:0 with height*3/2 rows).
_PIXEL_FORMATS = {"nv12": "nv12", "yu12": "yuv420p", "i420": "yuv420p"}

# Changes that alter the input frames: re-open before the next frame.
_INPUT_KEYS = frozenset({"width", "height", "fps_num", "fps_den", "pixel_format"})


# ---------------------------------------------------------------- rate control

def _vbv(rate: int) -> dict[str, str]:
    """FFmpeg generic options for a VBV capped at ``rate`` with a 1 s buffer."""
    return {"maxrate": str(rate), "bufsize": str(rate)}


def _ipratio(p: EncoderParams) -> float:
    return 2.0 ** ((p.p_qp - p.i_qp) / 6.0)


def _qrange(p: EncoderParams) -> dict[str, object]:
    return {"qpmin": p.min_qp, "qpmax": p.max_qp}


# RcMode -> (AVCodecContext.bit_rate, FFmpeg options, x264 params).
# bit_rate is separate because it is the one value reconfigurable in place.
_RC_TABLE: dict[RcMode, Callable[[EncoderParams], tuple[int, dict, dict]]] = {
    RcMode.FIXQP: lambda p: (
        0, {"qp": str(p.p_qp)}, {"ipratio": f"{_ipratio(p):.4f}", "aq-mode": 0}),
    RcMode.CBR: lambda p: (p.bitrate, _vbv(p.bitrate), _qrange(p)),
    RcMode.VBR: lambda p: (p.bitrate, _vbv(p.max_bitrate), _qrange(p)),
    RcMode.CAPPED_VBR: lambda p: (p.bitrate, _vbv(p.max_bitrate), _qrange(p)),
    RcMode.CAPPED_QUALITY: lambda p: (
        0, {"crf": str(p.p_qp), **_vbv(p.max_bitrate)}, _qrange(p)),
}


# x264 signals the lowest profile its tools need (ultrafast: CAVLC, 4x4 only ->
# Baseline), so the tools that define Main and High are switched on; the
# "profile" option then only caps them.
_PROFILE_TOOLS: dict[base.Profile, dict[str, int]] = {
    base.Profile.BASELINE: {},
    base.Profile.MAIN: {"cabac": 1},
    base.Profile.HIGH: {"cabac": 1, "8x8dct": 1},
}


def _frame_bytes(p: EncoderParams) -> int:
    return p.width * p.height * 3 // 2


def _check_params(p: EncoderParams) -> None:
    if p.width <= 0 or p.height <= 0 or p.width % 2 or p.height % 2:
        raise ValueError(f"bad frame size {p.width}x{p.height} (must be even)")
    if p.pixel_format not in _PIXEL_FORMATS:
        raise ValueError(f"unsupported pixel format {p.pixel_format!r}")
    if p.rc_mode not in _RC_TABLE:
        raise ValueError(f"unsupported rate control mode {p.rc_mode!r}")
    if p.gop < 1:
        raise ValueError("gop must be >= 1")
    if not 9 <= level_idc(p.level) <= 62:
        raise ValueError(f"bad H.264 level {p.level!r}")
    if not 0 <= p.min_qp <= p.max_qp <= 51:
        raise ValueError(f"bad QP range {p.min_qp}..{p.max_qp}")


def _frame_from_memory(buf, p: EncoderParams, fmt: str) -> av.VideoFrame:
    """An AVFrame whose planes point into ``buf`` (no copy)."""
    need = _frame_bytes(p)
    arr = np.frombuffer(buf, np.uint8)
    if arr.size < need:
        raise ValueError(f"frame has {arr.size} bytes, {p.width}x{p.height} "
                         f"{p.pixel_format} needs {need}")
    if p.height % 4 == 0:
        return av.VideoFrame.from_numpy_buffer(
            arr[:need].reshape(p.height * 3 // 2, p.width), format=fmt)
    # PyAV derives the height of a wrapped 4:2:0 buffer as rows // 3 * 2, which
    # loses two lines when height % 4 == 2: copy the planes into a frame instead.
    frame = av.VideoFrame(p.width, p.height, fmt)
    chroma = [(p.width, p.height // 2)] if fmt == "nv12" else [(p.width // 2, p.height // 2)] * 2
    offset = 0
    for plane, (width, rows) in zip(frame.planes, [(p.width, p.height), *chroma]):
        dst = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        dst[:rows, :width] = arr[offset:offset + width * rows].reshape(rows, width)
        offset += width * rows
    return frame


# ---------------------------------------------------------------- H.264 / H.265

class SimVideoChannel(EncoderChannel):
    """An AVPU H.264/H.265 channel on an FFmpeg encoder; subclasses give the codec's row
    (``CODEC``, ``LIB``, ``SYNTAX``) and its options (:meth:`_config`).

    ``encode()`` and ``encode_into()`` are called by one thread (the frame
    channel's); ``request_idr()`` and ``update()`` may be called from any
    other thread and never wait for an encode in progress.
    """

    CODEC: Codec
    LIB: str  # the FFmpeg encoder
    SYNTAX: NalSyntax
    # FFmpeg reconfigures this encoder's bit rate in place (libx264: x264_encoder_reconfig);
    # otherwise a new bit rate re-opens at the next IDR like the other settings.
    RECONFIG_BITRATE = False
    # Input layouts the encoder takes as they are; others are converted by swscale (in C).
    INPUT_FORMATS = frozenset({"nv12", "yuv420p"})

    def __init__(self, params: EncoderParams, *, preset: str = "ultrafast",
                 threads: int = X264_THREADS):
        _check_params(params)
        self.params = dataclasses.replace(params)
        self._preset = preset
        self._threads = threads  # x264 slice threads: one slice each (0 = x264's choice)
        self._lock = threading.Lock()  # guards the _pending* fields
        self._pending: EncoderParams | None = None  # apply at next IDR
        self._pending_now = False  # apply before the next frame
        self._idr_requested = False
        self._since_idr = 0  # frames since (and including) the last IDR
        self._pts = 0
        self._ctx: av.VideoCodecContext | None = None
        self._open(self.params)

    # -- encoder life cycle

    def _config(self, p: EncoderParams) -> tuple[int, dict[str, str]]:
        """(AVCodecContext.bit_rate, FFmpeg options) for ``p``."""
        raise NotImplementedError

    def _open(self, p: EncoderParams) -> None:
        bit_rate, opts = self._config(p)
        ctx = av.CodecContext.create(self.LIB, "w")
        ctx.width, ctx.height = p.width, p.height
        src = _PIXEL_FORMATS[p.pixel_format]
        ctx.pix_fmt = src if src in self.INPUT_FORMATS else "yuv420p"
        ctx.time_base = fractions.Fraction(p.fps_den, p.fps_num)
        ctx.framerate = fractions.Fraction(p.fps_num, p.fps_den)
        ctx.gop_size = p.gop
        ctx.max_b_frames = 0
        self._threading(ctx)
        if bit_rate:
            ctx.bit_rate = bit_rate
        ctx.options = opts
        ctx.open()
        self._ctx, self._opts, self._bit_rate = ctx, opts, bit_rate
        self._fmt, self._convert = src, src != ctx.pix_fmt
        self._since_idr = 0  # a new encoder starts with an IDR
        self.params = p
        log.debug("%s opened %dx%d %s: %s", self.LIB, p.width, p.height, p.pixel_format, opts)

    def _threading(self, ctx) -> None:
        """Set the context's threading (before open)."""

    def close(self) -> None:
        self._ctx = None

    # -- control (any thread)

    def request_idr(self) -> None:
        """The next encoded frame is an IDR (with its parameter sets before it)."""
        self._idr_requested = True

    def update(self, **changes) -> None:
        """Change parameters while streaming (see the module doc for when
        each takes effect).  Unknown names or invalid values: ValueError."""
        if "codec" in changes and changes["codec"] != self.CODEC:
            raise ValueError("cannot change the codec of an open channel")
        with self._lock:
            cur = self._pending or self.params
            try:
                new = dataclasses.replace(cur, **changes)
            except TypeError as e:
                raise ValueError(str(e)) from None
            _check_params(new)
            self._pending = new
            if _INPUT_KEYS & changes.keys():
                self._pending_now = True

    def _apply_pending(self) -> None:
        """Encoder thread: take pending changes in place or by re-opening."""
        with self._lock:
            new = self._pending
            if new is None:
                return
            bit_rate, opts = self._config(new)
            if (self.RECONFIG_BITRATE and bit_rate and self._bit_rate
                    and bit_rate != self._bit_rate):
                self._ctx.bit_rate = self._bit_rate = bit_rate
            if (opts, bit_rate) == (self._opts, self._bit_rate) and not self._pending_now:
                self.params, self._pending = new, None  # done in place
                return
            if not (self._pending_now or self._idr_requested
                    or self._since_idr >= self.params.gop):
                return  # wait for the next IDR
            self._pending, self._pending_now = None, False
        self._open(new)

    # -- encoding (the channel thread)

    def _encode_packet(self, frame_mem, timestamp_ns: int):
        if self._ctx is None:
            raise RuntimeError("encoder channel is closed")
        self._apply_pending()
        frame = _frame_from_memory(frame_mem, self.params, self._fmt)
        if self._convert:  # libx265 takes planar 4:2:0 only: swscale repacks NV12 (in C)
            frame = frame.reformat(format="yuv420p")
        frame.pts = self._pts
        self._pts += 1
        if self._idr_requested:
            self._idr_requested = False
            frame.pict_type = av.video.frame.PictureType.I
        packets = self._ctx.encode(frame)
        if len(packets) != 1:  # zerolatency guarantees one; anything else is a bug
            raise RuntimeError(f"{self.LIB} returned {len(packets)} packets for one frame")
        mv = memoryview(packets[0])
        syn = self.SYNTAX
        spans = [s for s in nal_spans(mv, syn) if s.nal_type not in syn.drop]
        keyframe = any(s.nal_type in syn.idr for s in spans)
        self._since_idr = 1 if keyframe else self._since_idr + 1
        return mv, spans, keyframe

    def encode(self, nv12: memoryview, timestamp_ns: int) -> EncodedFrame:
        """Encode one frame; returns its access unit.  NALs are views of the
        encoder's packet when it wrote 4-byte start codes everywhere (one
        slice per frame), else views of one new buffer of the access unit."""
        mv, spans, keyframe = self._encode_packet(nv12, timestamp_ns)
        types = [s.nal_type for s in spans]
        if all(s.start_code_len == 4 for s in spans):
            nals = [mv[s.start:s.end] for s in spans]
        else:
            au = memoryview(bytearray(_au_size(spans)))
            ends = _write_au(mv, spans, au)
            nals = [au[a:b] for a, b in zip([0] + ends[:-1], ends)]
        return EncodedFrame(nals=nals, keyframe=keyframe,
                            timestamp_ns=timestamp_ns, nal_types=types)

    def encode_into(self, nv12: memoryview, timestamp_ns: int,
                    out: memoryview) -> tuple[int, bool]:
        """Encode one frame straight into ``out`` (one copy of the compressed
        data, none of the frame).  Returns (bytesused, keyframe); raises
        :class:`OutputTooSmall` if the access unit does not fit."""
        mv, spans, keyframe = self._encode_packet(nv12, timestamp_ns)
        need = _au_size(spans)
        out = memoryview(out).cast("B")
        if need > len(out):
            self._idr_requested = True  # the dropped frame broke the chain
            raise OutputTooSmall(need, len(out))
        _write_au(mv, spans, out)
        return need, keyframe


class SimH264Channel(SimVideoChannel):
    """An AVPU H.264 channel on libx264."""

    CODEC, LIB, SYNTAX = Codec.H264, "libx264", H264
    RECONFIG_BITRATE = True

    def _config(self, p: EncoderParams) -> tuple[int, dict[str, str]]:
        bit_rate, opts, x264 = _RC_TABLE[p.rc_mode](p)
        x264 = {
            "keyint": p.gop, "min-keyint": p.gop, "scenecut": 0,
            "open-gop": 0, "bframes": 0, "repeat-headers": 1, "annexb": 1,
            "aud": 0, "nal-hrd": "none", "intra-refresh": 0,
            "rc-lookahead": 0, "sync-lookahead": 0, "sliced-threads": 1,
            "threads": self._threads, "slices": self._threads, "level": p.level,
            **_PROFILE_TOOLS[p.profile], **x264,
        }
        opts = {
            "preset": self._preset, "tune": "zerolatency",
            "profile": p.profile.value, "forced-idr": "1",
            "x264-params": ":".join(f"{k}={v}" for k, v in x264.items()),
            **opts,
        }
        return bit_rate, opts

    def _threading(self, ctx) -> None:
        ctx.thread_count = self._threads
        ctx.thread_type = "SLICE"


# H.265 table A.8 MaxLumaPs by level: x265 refuses to open below the picture's level (x264
# just writes the level), so the sim codes the lowest level at or above the asked one that fits.
_HEVC_MAX_LUMA_PS = ((1.0, 36_864), (2.0, 122_880), (2.1, 245_760), (3.0, 552_960),
                     (3.1, 983_040), (4.0, 2_228_224), (4.1, 2_228_224), (5.0, 8_912_896),
                     (5.1, 8_912_896), (5.2, 8_912_896), (6.0, 35_651_584), (6.1, 35_651_584),
                     (6.2, 35_651_584))


def _hevc_level(p: EncoderParams) -> str:
    want = level_idc(p.level) / 10
    fits = [lv for lv, ps in _HEVC_MAX_LUMA_PS if lv >= want and ps >= p.width * p.height]
    return str(fits[0] if fits else _HEVC_MAX_LUMA_PS[-1][0])


class SimHevcChannel(SimVideoChannel):
    """An AVPU H.265 channel on libx265 (Main profile, Main or High tier)."""

    CODEC, LIB, SYNTAX = Codec.HEVC, "libx265", HEVC
    INPUT_FORMATS = frozenset({"yuv420p"})

    def _config(self, p: EncoderParams) -> tuple[int, dict[str, str]]:
        bit_rate, opts, rc = _RC_TABLE[p.rc_mode](p)
        x265 = {
            "keyint": p.gop, "min-keyint": p.gop, "scenecut": 0, "open-gop": 0, "bframes": 0,
            "repeat-headers": 1, "annexb": 1, "aud": 0, "info": 0, "hrd": 0, "rc-lookahead": 0,
            "frame-threads": 1, "pools": "none", "wpp": 0, "slices": 1, "log-level": "error",
            "level-idc": _hevc_level(p), "high-tier": int(p.high_tier), **rc,
        }
        opts = {
            "preset": self._preset, "tune": "zerolatency", "profile": "main", "forced-idr": "1",
            "x265-params": ":".join(f"{k}={v}" for k, v in x265.items()), **opts,
        }
        return bit_rate, opts


def _au_size(spans: list[NalSpan]) -> int:
    return sum(4 + s.end - s.payload for s in spans)


def _write_au(src: memoryview, spans: list[NalSpan], out: memoryview) -> list[int]:
    """Write NALs with 4-byte start codes into ``out``; returns NAL end offsets."""
    pos, ends = 0, []
    for s in spans:
        n = s.end - s.payload
        out[pos:pos + 4] = START_CODE
        out[pos + 4:pos + 4 + n] = src[s.payload:s.end]
        pos += 4 + n
        ends.append(pos)
    return ends


# ---------------------------------------------------------------- JPEG

def _jpeg_qscale(quality: int) -> int:
    """IMP-style quality 1..100 -> MJPEG qscale 31..2 (2 is best)."""
    q = min(max(quality, 1), 100)
    return round(31 - (q - 1) * 29 / 99)


class SimJpegChannel(EncoderChannel):
    """An AVPU JPEG channel: one baseline JPEG per frame (FFmpeg's mjpeg)."""

    def __init__(self, params: EncoderParams):
        _check_params(params)
        self.params = dataclasses.replace(params)
        self._lock = threading.Lock()
        self._pending: EncoderParams | None = None
        self._open(self.params)

    def _open(self, p: EncoderParams) -> None:
        ctx = av.CodecContext.create("mjpeg", "w")
        ctx.width, ctx.height = p.width, p.height
        ctx.pix_fmt = "yuvj420p"
        ctx.time_base = fractions.Fraction(p.fps_den, p.fps_num)
        q = str(_jpeg_qscale(p.jpeg_quality))
        # qmin = qmax pins every frame to one qscale (the rate control has
        # nothing left to decide).
        ctx.options = {"qmin": q, "qmax": q}
        ctx.open()
        self._ctx, self.params = ctx, p
        self._src_fmt = _PIXEL_FORMATS[p.pixel_format]
        self._pts = 0

    def close(self) -> None:
        self._ctx = None

    def request_idr(self) -> None:
        """Every JPEG is a key frame."""

    def update(self, **changes) -> None:
        """Takes effect on the next frame (re-opens the cheap MJPEG encoder)."""
        if "codec" in changes and changes["codec"] != Codec.JPEG:
            raise ValueError("cannot change the codec of an open channel")
        with self._lock:
            try:
                new = dataclasses.replace(self._pending or self.params, **changes)
            except TypeError as e:
                raise ValueError(str(e)) from None
            _check_params(new)
            self._pending = new

    def _encode_packet(self, frame_mem) -> memoryview:
        if self._ctx is None:
            raise RuntimeError("encoder channel is closed")
        with self._lock:
            new, self._pending = self._pending, None
        if new is not None:
            self._open(new)
        src = _frame_from_memory(frame_mem, self.params, self._src_fmt)
        # swscale: NV12/I420 (limited range) -> planar full-range JPEG YUV.
        frame = src.reformat(format="yuvj420p")
        frame.pts = self._pts
        self._pts += 1
        packets = self._ctx.encode(frame)
        if len(packets) != 1:
            raise RuntimeError(f"mjpeg returned {len(packets)} packets for one frame")
        return memoryview(packets[0])

    def encode(self, nv12: memoryview, timestamp_ns: int) -> EncodedFrame:
        jpeg = self._encode_packet(nv12)
        return EncodedFrame(nals=[jpeg], keyframe=True, timestamp_ns=timestamp_ns)

    def encode_into(self, nv12: memoryview, timestamp_ns: int,
                    out: memoryview) -> tuple[int, bool]:
        jpeg = self._encode_packet(nv12)
        out = memoryview(out).cast("B")
        if len(jpeg) > len(out):
            raise OutputTooSmall(len(jpeg), len(out))
        out[:len(jpeg)] = jpeg
        return len(jpeg), True


# ---------------------------------------------------------------- the AVPU

_warned: list[bool] = []


def _log_no_x265() -> None:
    if not _warned:
        _warned.append(True)
        log.warning("PyAV %s's FFmpeg has no libx265: H.265 (HEVC) is not offered", av.__version__)


class SimAvpu(base.Encoder):
    """Software AVPU: H.264 channels on libx264, H.265 on libx265 (when PyAV has it),
    JPEG channels on mjpeg.

    ``preset`` is x264's speed preset (ultrafast keeps 1080p real time on one
    core); ``threads`` is x264's slice threads per channel, X264_THREADS (one
    slice per picture, as the T31) unless a benchmark asks otherwise.
    """

    def __init__(self, *, preset: str = "ultrafast", threads: int = X264_THREADS):
        self.preset = preset
        self.threads = threads
        self._factories: dict[Codec, Callable[[EncoderParams], EncoderChannel]] = {
            Codec.H264: lambda p: SimH264Channel(p, preset=self.preset,
                                                 threads=self.threads),
            Codec.JPEG: SimJpegChannel,
        }
        if HAVE_X265:
            self._factories[Codec.HEVC] = lambda p: SimHevcChannel(p, preset=self.preset)
        else:
            _log_no_x265()
        self.codecs = frozenset(self._factories)

    def create_channel(self, params: EncoderParams) -> EncoderChannel:
        try:
            factory = self._factories[params.codec]
        except KeyError:
            raise ValueError(f"unsupported codec {params.codec!r}") from None
        return factory(params)
