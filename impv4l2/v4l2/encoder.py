"""The stateful M2M H.264 encoder node (Documentation/userspace-api/media/v4l/dev-encoder.rst).

``EncoderNode(name, backend, defaults=None)`` is a :class:`impv4l2.fileops.Device`.
As the kernel's v4l2-mem2mem, every open file is an independent encoding
session (:class:`EncoderContext`, the m2m_ctx): its own OUTPUT queue (raw
NV12/YU12 frames from the client), CAPTURE queue (H.264 access units to the
client), formats, controls and backend encoder channel, so several clients
encode at once.

Buffer types: the multi-planar API (VIDEO_M2M_MPLANE, which ffmpeg's
h264_v4l2m2m picks) by default; ``apis=("splane",)`` serves the
single-planar one instead.  Both at once work here (a queue takes the type
of the API the client uses, switching only while it has no buffers), but
v4l2-compliance refuses a node advertising both (as every kernel driver
picks one), so that is not the default.  Raw frames are one plane
(Y then UV/U/V), stride = width; an OUTPUT crop rectangle (G/S_SELECTION)
selects the visible part, which is what the encoder codes (the SPS gets
frame cropping for sizes not multiple of 16).

Encoding runs in one worker thread per context: it pairs the oldest queued
OUTPUT buffer with the oldest queued CAPTURE buffer, and the backend writes
the access unit straight into the CAPTURE buffer's memory (the raw frame is
read in place: zero copies of the frame, one of the AU).

State machine (dev-encoder.rst) and its OpenMAX IL equivalents:

================  ==========================================  ==============================
EncState          dev-encoder.rst                              OpenMAX IL
================  ==========================================  ==============================
INITIALIZING      Initialization: formats set, no buffers /    Loaded / Idle
                  buffers allocated, not both streaming
ENCODING          Encoding (both queues streaming)             Executing
DRAINING          Drain (after V4L2_ENC_CMD_STOP)              EOS flag on the last input
STOPPED           Stopped: LAST buffer sent + V4L2_EVENT_EOS   EOS flag on the last output
                                                               (OMX_EventBufferFlag)
(STREAMOFF)       Reset (CAPTURE: new SPS/PPS + IDR on         Flush (OMX_CommandFlush)
                  restart)
================  ==========================================  ==============================

Buffer flags: V4L2_BUF_FLAG_KEYFRAME = OMX SYNCFRAME; the header-only
CAPTURE buffer of HEADER_MODE_SEPARATE = OMX CODECCONFIG; V4L2_BUF_FLAG_LAST
= OMX EOS; V4L2_BUF_FLAG_ERROR = OMX data corrupt.
"""

from __future__ import annotations

import errno
import fractions
import logging

from .. import optional
from ..driver.base import Backend
from ..fileops import POLLERR, POLLPRI
from ..memfd import page_align
from . import abi
from .budget import UNLIMITED, BufferBudget
from .codec_controls import HEADER_MODE_JOINED, HEADER_MODE_SEPARATE
from .controls import ControlView
from .encoder_session import (ENC_CMD_START, ENC_CMD_STOP, MAX_FPS, MAX_H, MAX_SIZEIMAGE, MAX_W, MIN_H, MIN_W,
                              STEP, EncoderContext)
from .formats import (COLORSPACE, ENCODER_RAW_FORMATS, QUANTIZATION, XFER_FUNC, YCBCR_ENC,
                      CodedFormat, coded_formats)
from .m2m import API_CAPS, API_TYPES, RegionAllocator, buffer_mask
from .node import Node, NodeHandle
from .queue import MPLANE_TYPES, OUTPUT_TYPES, BufferQueue

log = logging.getLogger("impv4l2.v4l2.encoder")

PF = abi.PixelFormat
BF = abi.BufFlag

# ---------------------------------------------------------------- the node

class EncoderNode(Node):
    """The AVPU as a V4L2 stateful M2M H.264 encoder (implements fileops.Device)."""

    card = "impv4l2 encoder"
    bus_info = "platform:impv4l2-encoder"
    event_types = frozenset({abi.EventType.CTRL, abi.EventType.EOS})

    def __init__(self, name: str, backend: Backend, defaults=None, *,
                 apis: tuple[str, ...] = ("mplane",), separate_headers: bool = False,
                 budget: BufferBudget = UNLIMITED):
        super().__init__(name, ControlView([]), budget=budget)
        self.backend = backend
        self.defaults = defaults  # impv4l2.config.EncoderDefaults, read at each open
        self.apis = apis
        self.coded_formats = coded_formats(backend.encoder.codecs)  # H.264, HEVC if the AVPU has it
        # HEADER_MODE_SEPARATE is implemented but not offered by default (as
        # allegro-dvt): ffmpeg (<= 7) asks for it and then muxes the header-only
        # buffer as a picture-less sample, which decoders report as an error.
        # Refused, ffmpeg gets SPS+PPS with the first IDR and builds avcC from it.
        modes = {HEADER_MODE_JOINED} | ({HEADER_MODE_SEPARATE} if separate_headers else set())
        self.menu_allow = {abi.CID.MPEG_VIDEO_HEADER_MODE: frozenset(modes)}
        self.buf_types = frozenset(t for a in apis for t in API_TYPES[a])
        caps = abi.Cap.STREAMING | abi.Cap.EXT_PIX_FORMAT
        for a in apis:
            caps |= API_CAPS[a]
        self.device_caps = caps
        self.regions = RegionAllocator(self.memory)

    def closed(self, h: NodeHandle) -> None:
        ctx = getattr(h, "ctx", None)
        if ctx is not None:
            ctx.release(h)
        super().closed(h)

    def contexts(self) -> list[EncoderContext]:
        return [h.ctx for h in list(self.handles) if isinstance(h, EncoderHandle)]

    def log_status(self) -> list[str]:
        return super().log_status() + [c.status() for c in self.contexts()]


# Valid ranges of (colorspace, xfer_func, ycbcr_enc, quantization); 0 or out of
# range: the source default (Rec.709 limited range, the ISP's output).
_COLORIMETRY_MAX = (12, 7, 9, 2)


def _colorimetry(pix) -> tuple[int, int, int, int]:
    given = (pix.colorspace, pix.xfer_func, pix.ycbcr_enc, pix.quantization)
    if not 1 <= given[0] <= _COLORIMETRY_MAX[0]:
        return (COLORSPACE, XFER_FUNC, YCBCR_ENC, QUANTIZATION)
    return tuple(v if 0 <= v <= m else 0 for v, m in zip(given, _COLORIMETRY_MAX))


def _ts_ns(b: abi.v4l2_buffer) -> int:
    return b.timestamp.secs * 1_000_000_000 + b.timestamp.usecs * 1000


class EncoderHandle(NodeHandle):
    """An open file of the encoder node: one encoding session."""

    node: EncoderNode

    def __init__(self, node: EncoderNode, caller):
        super().__init__(node, caller)
        self.ctx = EncoderContext(node, self)

    @property
    def fatal(self) -> str | None:
        return self.ctx.fatal

    @property
    def controls(self) -> ControlView:
        return self.ctx.controls

    def queue(self, buf_type: int) -> BufferQueue:
        return self.ctx.queue_for(buf_type)

    def mmap_queues(self) -> tuple[BufferQueue, ...]:
        return (self.ctx.out_q, self.ctx.cap_q)  # this session's, as v4l2_m2m_mmap

    def poll(self) -> int:
        mask = self._buffer_mask()
        # events after buffers (as v4l2_m2m_poll since the allegro fix): EOS is posted before
        # the LAST buffer is done, so a LAST seen here comes with its EOS
        return mask | (POLLPRI if self.events.has_pending() else 0)

    def _buffer_mask(self) -> int:
        ctx = self.ctx
        return POLLERR if ctx.fatal else buffer_mask(ctx.out_q, ctx.cap_q)

    # ------------------------------------------------------------ formats

    @staticmethod
    def _check(t: int) -> bool:
        """True for an OUTPUT buffer type (the core has validated it)."""
        return t in OUTPUT_TYPES

    def vidioc_enum_fmt(self, s, mem):
        is_out = self._check(s.type)
        fmts = ENCODER_RAW_FORMATS if is_out else self.node.coded_formats
        if s.index >= len(fmts):
            raise OSError(errno.EINVAL, "no more formats")
        f = fmts[s.index]
        s.pixelformat = f.fourcc
        s.flags = 0 if is_out else abi.FmtFlag.COMPRESSED
        abi.set_str(s, "description", f.description)

    def _fill_fmt(self, s: abi.v4l2_format, fourcc: int, w: int, h: int, bpl: int, size: int,
                  colorimetry: tuple[int, int, int, int] | None = None) -> None:
        t = s.type
        mp = t in MPLANE_TYPES
        abi.zero(s.fmt.pix_mp if mp else s.fmt.pix)
        s.type = t
        pix = s.fmt.pix_mp if mp else s.fmt.pix
        pix.width, pix.height, pix.pixelformat = w, h, fourcc
        pix.field = abi.Field.NONE
        pix.colorspace, pix.xfer_func, pix.ycbcr_enc, pix.quantization = \
            colorimetry or self.ctx.colorimetry
        if mp:
            pix.num_planes = 1
            pix.plane_fmt[0].bytesperline, pix.plane_fmt[0].sizeimage = bpl, size
        else:
            pix.bytesperline, pix.sizeimage = bpl, size

    def _try_fmt_of(self, s: abi.v4l2_format):
        """Adjust a format to a supported one; returns what S_FMT would set."""
        is_out = self._check(s.type)
        mp = s.type in MPLANE_TYPES
        pix = s.fmt.pix_mp if mp else s.fmt.pix
        ctx = self.ctx
        if is_out:
            f = next((x for x in ENCODER_RAW_FORMATS if x.fourcc == pix.pixelformat), ENCODER_RAW_FORMATS[0])
            w = min(max(pix.width, MIN_W), MAX_W) & ~(STEP - 1)
            h = min(max(pix.height, MIN_H), MAX_H) & ~(STEP - 1)
            bpl, size = f.layout(w, h)
            col = _colorimetry(pix)
            self._fill_fmt(s, f.fourcc, w, h, bpl, size, col)
            return f, w, h, col
        f = next((x for x in self.node.coded_formats if x.fourcc == pix.pixelformat), self.node.coded_formats[0])
        want = pix.plane_fmt[0].sizeimage if mp else pix.sizeimage
        lo, default = CodedFormat.sizeimage_range(ctx.width, ctx.height)
        size = default if want < lo else min(page_align(want), MAX_SIZEIMAGE)
        self._fill_fmt(s, f.fourcc, ctx.width, ctx.height, 0, size)
        return f, size

    def vidioc_g_fmt(self, s, mem):
        ctx = self.ctx
        if self._check(s.type):
            bpl, size = ctx.raw.layout(ctx.width, ctx.height)
            self._fill_fmt(s, ctx.raw.fourcc, ctx.width, ctx.height, bpl, size)
        else:
            self._fill_fmt(s, ctx.coded.fourcc, ctx.width, ctx.height, 0, ctx.sizeimage)

    def vidioc_try_fmt(self, s, mem):
        self._try_fmt_of(s)

    def vidioc_s_fmt(self, s, mem):
        ctx = self.ctx
        is_out = self._check(s.type)
        q = ctx.queue_for(s.type)
        if q.buffers or q.streaming:
            raise OSError(errno.EBUSY, "buffers allocated")
        if is_out:
            ctx.raw, ctx.width, ctx.height, ctx.colorimetry = self._try_fmt_of(s)
            ctx.crop = (0, 0, ctx.width, ctx.height)  # a new source size resets the crop
            lo, default = CodedFormat.sizeimage_range(ctx.width, ctx.height)
            if ctx.sizeimage < lo and not ctx.cap_q.buffers:
                ctx.sizeimage = default
        else:
            ctx.coded, ctx.sizeimage = self._try_fmt_of(s)
        ctx._update_sizes()

    def vidioc_enum_framesizes(self, s, mem):
        if not any(f.fourcc == s.pixel_format for f in ENCODER_RAW_FORMATS + self.node.coded_formats):
            raise OSError(errno.EINVAL, "unknown pixel format")
        if s.index != 0:
            raise OSError(errno.EINVAL, "no more sizes")
        s.type = abi.raw.Frmsizetypes.STEPWISE
        sw = s.stepwise
        sw.min_width, sw.max_width, sw.step_width = MIN_W, MAX_W, STEP
        sw.min_height, sw.max_height, sw.step_height = MIN_H, MAX_H, STEP

    # ------------------------------------------------------------ crop (OUTPUT)

    @staticmethod
    def _sel_type(t: int) -> None:
        # the core has let OUTPUT through for OUTPUT_MPLANE too (the SEL row flag)
        if t not in OUTPUT_TYPES:
            raise OSError(errno.EINVAL, "the encoder crops on the OUTPUT queue only")

    def vidioc_g_selection(self, s, mem):
        self._sel_type(s.type)
        ctx = self.ctx
        rects = {abi.raw.SelectionTarget.CROP: ctx.crop,
                 abi.raw.SelectionTarget.CROP_DEFAULT: (0, 0, ctx.width, ctx.height),
                 abi.raw.SelectionTarget.CROP_BOUNDS: (0, 0, ctx.width, ctx.height)}
        r = rects.get(s.target)
        if r is None:
            raise OSError(errno.EINVAL, f"selection target {s.target} not supported")
        s.r.left, s.r.top, s.r.width, s.r.height = r

    def vidioc_s_selection(self, s, mem):
        self._sel_type(s.type)
        if s.target != abi.raw.SelectionTarget.CROP:
            raise OSError(errno.EINVAL, f"selection target {s.target} is read-only")
        ctx = self.ctx
        if ctx.out_q.streaming:
            raise OSError(errno.EBUSY, "OUTPUT is streaming")
        w, h = ctx.width, ctx.height
        cw = min(max(s.r.width, MIN_W), w) & ~1
        if not optional.have("numpy"):
            cw = w  # a column crop is a strided copy: without numpy (the camera) rows only
        ch = min(max(s.r.height, MIN_H), h) & ~1
        left = min(max(s.r.left, 0), w - cw) & ~1
        top = min(max(s.r.top, 0), h - ch) & ~1
        ctx.crop = (left, top, cw, ch)
        s.r.left, s.r.top, s.r.width, s.r.height = ctx.crop

    # ------------------------------------------------------------ frame rate

    # dev-encoder.rst: the frame rate is the OUTPUT (raw) queue's; the CAPTURE
    # queue has a frame interval of its own only with ENC_CAP_FRAME_INTERVAL,
    # which the AVPU lacks, so G/S_PARM(CAPTURE) is EINVAL (as vicodec).
    def _parm_type(self, t: int) -> None:
        if not self._check(t):
            raise OSError(errno.EINVAL, "G/S_PARM: the coded (CAPTURE) queue has no frame interval of its own")

    def vidioc_g_parm(self, s, mem):
        self._parm_type(s.type)
        self._fill_parm(s)

    def vidioc_s_parm(self, s, mem):
        self._parm_type(s.type)
        tpf = s.parm.output.timeperframe
        if tpf.numerator and tpf.denominator:
            fps = fractions.Fraction(tpf.denominator, tpf.numerator)
            self.ctx.fps = min(max(fps, fractions.Fraction(1)), fractions.Fraction(MAX_FPS))
        self._fill_parm(s)

    def _fill_parm(self, s) -> None:
        t = s.type
        abi.zero(s)
        s.type = t
        p = s.parm.output
        p.capability = abi.Cap.TIMEPERFRAME
        p.timeperframe.numerator = self.ctx.fps.denominator
        p.timeperframe.denominator = self.ctx.fps.numerator

    # ------------------------------------------------------------ buffers

    def create_bufs_sizes(self, q, fmt):
        self._check(fmt.type)
        mp = fmt.type in MPLANE_TYPES
        pix = fmt.fmt.pix_mp if mp else fmt.fmt.pix
        if mp and pix.num_planes != len(q.plane_sizes):
            raise OSError(errno.EINVAL, f"{pix.num_planes} planes, the format has {len(q.plane_sizes)}")
        want = pix.plane_fmt[0].sizeimage if mp else pix.sizeimage
        need = q.plane_sizes[0]
        if want < need:
            raise OSError(errno.EINVAL, f"sizeimage {want} < {need}")
        return [want]

    def vidioc_qbuf(self, s, mem):
        ctx = self.ctx
        q = self.queue(s.type)
        is_out = q.type in OUTPUT_TYPES
        raw_used = s.bytesused if not q.mplane else None
        with ctx.cv:  # the worker takes buffers under the same lock
            buf = q.qbuf(self, s, mem, timestamp_ns=_ts_ns(s) if is_out else 0)
            if is_out:
                buf.field = abi.Field.NONE
                if raw_used == 0:
                    ctx.log.debug("%s: OUTPUT bytesused 0 taken as the buffer length", ctx.tag)
                if q.mem_type == abi.Memory.USERPTR:
                    p = buf.planes[0]
                    q.view(buf)[:p.bytesused] = mem.read(p.userptr, p.bytesused)
            ctx.cv.notify()

    # ------------------------------------------------------------ encoder commands

    @staticmethod
    def _try_cmd(s) -> None:
        if s.cmd not in (ENC_CMD_START, ENC_CMD_STOP):
            raise OSError(errno.EINVAL, f"encoder command {s.cmd} not supported")
        s.flags = 0  # STOP_AT_GOP_END is not supported: stop right after the queued frames

    def vidioc_try_encoder_cmd(self, s, mem):
        self._try_cmd(s)

    def vidioc_encoder_cmd(self, s, mem):
        self._try_cmd(s)
        self.ctx.encoder_cmd(s.cmd)


EncoderNode.handle_class = EncoderHandle
