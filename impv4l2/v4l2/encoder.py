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

import dataclasses
import enum
import errno
import fractions
import logging
import os
import threading
import time
from typing import Callable

import numpy as np

from ..driver.base import Backend, Codec, EncoderChannel
from ..driver.h264 import NalType, nal_spans
from ..fileops import POLLERR, POLLIN, POLLOUT, POLLPRI, POLLRDNORM, POLLWRNORM
from ..memfd import MemfdMemory, page_align
from . import abi
from .codec_controls import HEADER_MODE_JOINED, HEADER_MODE_SEPARATE, RC_KEYS, STREAM_KEYS, CodecSettings
from .controls import ControlSet, ControlView
from .formats import COLORSPACE, QUANTIZATION, XFER_FUNC, YCBCR_ENC
from .node import Node, NodeHandle
from .queue import MPLANE_TYPES, OUTPUT_TYPES, Buffer, BufferQueue, Plane, State

log = logging.getLogger("impv4l2.v4l2.encoder")

BT = abi.BufType
PF = abi.PixelFormat
BF = abi.BufFlag

ENC_CMD_START, ENC_CMD_STOP, ENC_CMD_PAUSE, ENC_CMD_RESUME = 0, 1, 2, 3

# Picture size limits (T31 AVPU: up to 2624x2048), 4:2:0 needs even sizes.
MIN_W, MAX_W, MIN_H, MAX_H, STEP = 64, 2624, 64, 2048, 2
DEFAULT_W, DEFAULT_H, DEFAULT_FPS = 1280, 720, 30
MAX_FPS = 240
MAX_SIZEIMAGE = 64 << 20
FETCH_RETRY_S = 0.002  # a client-written buffer is still being fetched (FUSE cached/direct mmap)


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

# buffer type -> (is OUTPUT, is multi-planar); the APIs a node offers are data.
API_TYPES = {
    "mplane": (BT.VIDEO_OUTPUT_MPLANE, BT.VIDEO_CAPTURE_MPLANE),
    "splane": (BT.VIDEO_OUTPUT, BT.VIDEO_CAPTURE),
}
API_CAPS = {"mplane": abi.Cap.VIDEO_M2M_MPLANE, "splane": abi.Cap.VIDEO_M2M}


class EncState(enum.Enum):
    """Encoder states (see the module table for their dev-encoder/OpenMAX names)."""

    INITIALIZING = "initializing"
    ENCODING = "encoding"
    DRAINING = "draining"
    STOPPED = "stopped"


# ---------------------------------------------------------------- node memory

class RegionAllocator:
    """Page-aligned regions of the node memfd, one per allocation of a queue
    (every context's buffers live in the one memfd the node file maps)."""

    def __init__(self, memory: MemfdMemory):
        self.memory = memory
        self.lock = threading.Lock()
        self.free: list[tuple[int, int]] = []  # (offset, size), sorted by offset
        self.end = 0

    def alloc(self, size: int) -> int:
        size = page_align(size)
        with self.lock:
            for i, (off, n) in enumerate(self.free):
                if n >= size:
                    self.free[i:i + 1] = [(off + size, n - size)] if n > size else []
                    return off
            off = self.end
            if off + size > self.memory.size:
                self.memory.resize(off + size)  # OSError(ENOMEM) past the reserve
            self.end = off + size
            return off

    def release(self, off: int, size: int) -> None:
        with self.lock:
            self.free.append((off, page_align(size)))
            self.free.sort()
            merged: list[tuple[int, int]] = []
            for o, n in self.free:
                if merged and merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((o, n))
            if merged and merged[-1][0] + merged[-1][1] == self.end:
                self.end = merged.pop()[0]
            self.free = merged


class M2MQueue(BufferQueue):
    """A BufferQueue of one M2M context: buffers in regions of the shared
    node memory, the LAST-buffer state (DQBUF -> EPIPE after LAST) and
    switching between the single- and multi-planar buffer type."""

    def __init__(self, regions: RegionAllocator, *args, **kw):
        super().__init__(*args, **kw)
        self.regions = regions
        self._regions: list[tuple[int, int]] = []
        self.last_dequeued = False

    def _allocate(self, count: int, sizes: list[int]) -> None:
        per = sum(page_align(s) for s in sizes)
        base = self.regions.alloc(per * count)
        self._regions.append((base, per * count))
        end = base
        for _ in range(count):
            planes = []
            for size in sizes:
                planes.append(Plane(end, size))
                end += page_align(size)
            self.buffers.append(Buffer(len(self.buffers), planes))

    def _free(self) -> None:
        super()._free()
        for off, size in self._regions:
            self.regions.release(off, size)
        self._regions = []

    def set_type(self, t: int) -> None:
        if t == self.type:
            return
        with self.lock:
            if self.buffers or self.streaming:
                raise OSError(errno.EINVAL, f"buffers of type {self.type} exist")
            self.type = t
            self.mplane = t in MPLANE_TYPES

    def dqbuf(self, who, b, mem) -> Buffer:
        if self.streaming and self.last_dequeued:
            raise OSError(errno.EPIPE, "last buffer already dequeued")
        buf = super().dqbuf(who, b, mem)
        if buf.flags & BF.LAST:
            self.last_dequeued = True
        return buf

    def streamon(self, who, t: int) -> None:
        super().streamon(who, t)
        self.last_dequeued = False

    def _stop(self) -> None:
        super()._stop()
        self.last_dequeued = False

    def has_queued(self) -> bool:
        return any(b.state == State.QUEUED for b in self._queued)

    def count_queued(self) -> int:
        return sum(b.state == State.QUEUED for b in self._queued)

    def owned_by_driver(self) -> bool:
        """vb2's queued_list is non-empty: a buffer is QUEUED, ACTIVE or DONE."""
        return any(b.state != State.DEQUEUED for b in self.buffers)


# ---------------------------------------------------------------- the session

@dataclasses.dataclass
class PendingAU:
    """The picture part of the first AU in HEADER_MODE_SEPARATE, waiting for
    the CAPTURE buffer after the header-only one."""

    data: bytes
    keyframe: bool
    timestamp_ns: int
    field: int
    last: bool


class EncoderContext:
    """One encoding session (one open file): queues, formats, controls, channel, worker."""

    def __init__(self, node: "EncoderNode", handle: "EncoderHandle"):
        self.node = node
        self.handle = handle
        self.log = logging.LoggerAdapter(log, {})
        self.tag = f"{node.name} pid {handle.caller.pid}"
        mplane = "mplane" in node.apis
        out_t, cap_t = API_TYPES["mplane" if mplane else "splane"]
        qargs = dict(timestamp_flags=BF.TIMESTAMP_COPY, min_buffers=1)
        self.out_q = M2MQueue(node.regions, node.name, out_t, node.memory, log, **qargs)
        self.cap_q = M2MQueue(node.regions, node.name, cap_t, node.memory, log, **qargs)
        for q, d in ((self.out_q, "output"), (self.cap_q, "capture")):
            q.wake = node.wake
            q.on_start = lambda d=d: self._started(d)
            q.on_stop = lambda d=d: self._stopped(d)
        # formats
        self.raw = RAW_FORMATS[0]
        self.coded = CODED_FORMATS[0]
        self.width, self.height = DEFAULT_W, DEFAULT_H
        self.crop = (0, 0, DEFAULT_W, DEFAULT_H)
        self.fps = fractions.Fraction(DEFAULT_FPS)
        self.sizeimage = CodedFormat.sizeimage_range(self.width, self.height)[1]
        # colorimetry of the source, as the client says (passed on to CAPTURE)
        self.colorimetry = (COLORSPACE, XFER_FUNC, YCBCR_ENC, QUANTIZATION)
        # controls (per context, like an m2m driver's per-ctx handler)
        self.settings = CodecSettings(node.defaults, on_change=self._control_changed)
        self.ctrl_set = ControlSet(self.settings.controls(node.menu_allow))
        self.controls = ControlView([self.ctrl_set])
        self.ctrl_set.add_listener(self._post_ctrl_event)
        self._update_sizes()
        # encoding state (guarded by cv)
        self.cv = threading.Condition()
        self.state = EncState.INITIALIZING
        self.drain_left = 0
        self.pending: PendingAU | None = None
        self.channel: EncoderChannel | None = None
        self.reset_channel = False
        self.fresh = True  # the next keyframe is the first of the stream
        self.fatal: str | None = None
        self.out_seq = self.cap_seq = 0
        self.frames = self.lost = self.bad_input = 0
        self._held_out: Buffer | None = None  # taken by the worker, not yet counted for drain
        self._retry = False
        self._stop = False
        self._job_lock = threading.Lock()  # held by the worker while it runs a job
        self._thread: threading.Thread | None = None
        self._scratch: np.ndarray | None = None
        self.busy_s = 0.0  # worker time spent encoding (CPU per frame in benchmarks)

    # ------------------------------------------------------------ formats

    def _update_sizes(self) -> None:
        self.out_q.plane_sizes = [self.raw.layout(self.width, self.height)[1]]
        self.cap_q.plane_sizes = [self.sizeimage]

    def queue_for(self, t: int) -> M2MQueue:
        if t not in self.node.buf_types:
            raise OSError(errno.EINVAL, f"buffer type {t} not supported")
        q = self.out_q if t in OUTPUT_TYPES else self.cap_q
        q.set_type(t)
        return q

    def picture_fields(self) -> dict:
        _, _, cw, ch = self.crop
        return dict(width=cw, height=ch, fps_num=self.fps.numerator, fps_den=self.fps.denominator,
                    pixel_format=self.raw.backend)

    # ------------------------------------------------------------ controls

    def _post_ctrl_event(self, ctrl, value: int, origin: object) -> None:
        h = self.handle
        flags = h.events.subscribed(abi.EventType.CTRL, ctrl.id)
        if flags is None or (origin is h and not flags & abi.EVENT_SUB_FL_ALLOW_FEEDBACK):
            return
        from .events import ctrl_event
        if h.events.post(ctrl_event(ctrl, value, abi.EVENT_CTRL_CH_VALUE)):
            self.node.wake()

    def _control_changed(self, key: str, value: int) -> None:
        """A control changed (ioctl thread): bitrate applies from the next
        frame, FORCE_KEY_FRAME makes the next frame an IDR, the rest at the next IDR."""
        ch = self.channel
        if ch is None:
            return
        try:
            if key == "force_key_frame":
                ch.request_idr()
            elif key in RC_KEYS:
                ch.update(**self.settings.rc_fields())
            elif key in STREAM_KEYS:
                ch.update(**self.settings.stream_fields())
        except ValueError as ex:
            raise OSError(errno.EINVAL, str(ex)) from None

    # ------------------------------------------------------------ streaming

    def _started(self, direction: str) -> None:
        with self.cv:
            if direction == "output":
                self.out_seq = 0
            else:
                self.cap_seq = 0
            if self.out_q.streaming and self.cap_q.streaming and self.state == EncState.INITIALIZING:
                self.state = EncState.ENCODING
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"impv4l2-enc:{self.tag}")
                self._thread.start()
            self.cv.notify()

    def _stopped(self, direction: str) -> None:
        """STREAMOFF: a drain in progress is abandoned (the encoder resumes on
        STREAMON); STREAMOFF(CAPTURE) resets: new SPS/PPS + IDR on restart."""
        # Wait for a job in progress (one encode at most): the buffers go back
        # to the client, and their memory may be freed right after.
        with self._job_lock:
            pass
        with self.cv:
            self.state = EncState.INITIALIZING
            self.drain_left = 0
            if direction == "capture":
                self.pending = None
                self.reset_channel = True
                self.fresh = True
            self.cv.notify()

    def kick(self) -> None:
        with self.cv:
            self.cv.notify()

    # ------------------------------------------------------------ encoder commands

    def encoder_cmd(self, cmd: int) -> None:
        with self.cv:
            if not (self.out_q.streaming and self.cap_q.streaming):
                return  # spec: accepted, but no drain starts (and nothing to resume)
            if cmd == ENC_CMD_STOP:
                if self.state == EncState.DRAINING:
                    raise OSError(errno.EBUSY, "drain already in progress")
                if self.state == EncState.STOPPED:
                    return
                self.state = EncState.DRAINING
                self.drain_left = self.out_q.count_queued() + (self._held_out is not None)
                self.log.debug("%s: drain of %d frames", self.tag, self.drain_left)
            elif cmd == ENC_CMD_START:
                if self.state == EncState.DRAINING:
                    raise OSError(errno.EBUSY, "drain in progress")
                if self.state == EncState.STOPPED:
                    self.state = EncState.ENCODING
                    self.cap_q.last_dequeued = False
            self.cv.notify()

    # ------------------------------------------------------------ worker

    def _run(self) -> None:
        while True:
            with self.cv:
                while True:
                    if self._stop:
                        self._close_channel()
                        return
                    job = None if self.fatal else self._pick()
                    if job is not None:
                        break
                    retry, self._retry = self._retry, False
                    self.cv.wait(FETCH_RETRY_S if retry else None)
            t0 = time.thread_time()
            try:
                with self._job_lock:
                    job()
            except Exception as ex:  # a backend failure: this session is dead
                self.log.exception("%s: encoder failed", self.tag)
                with self.cv:
                    self.fatal = f"{type(ex).__name__}: {ex}"
                self.node.wake()
            self.busy_s += time.thread_time() - t0

    def _pick(self) -> Callable[[], None] | None:
        """The next job, with its buffers taken (called with cv held)."""
        out, cap = self.out_q, self.cap_q
        if not (out.streaming and cap.streaming):
            return None
        if self.pending is not None:
            cb = cap.take()
            return None if cb is None else (lambda: self._write_pending(cb))
        if self.state == EncState.DRAINING and self.drain_left == 0:
            cb = cap.take()
            return None if cb is None else (lambda: self._finish_drain(cb))
        if self.state != EncState.ENCODING and self.state != EncState.DRAINING:
            return None
        if not (out.has_queued() and cap.has_queued()):
            return None
        ob, cb = out.take(), cap.take()
        if ob is None or cb is None:
            for q, b in ((out, ob), (cap, cb)):
                if b is not None:
                    q.cancel(b)
            return None
        self._held_out = ob
        return lambda: self._encode(ob, cb)

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _get_channel(self) -> EncoderChannel:
        with self.cv:
            reset, self.reset_channel = self.reset_channel, False
        if reset:
            self._close_channel()
        pic = self.picture_fields()
        ch = self.channel
        if ch is None:
            params = self.settings.params(**pic)
            self.channel = ch = self.node.backend.encoder.create_channel(params)
            self.fresh = True
            self.log.info("%s: encoder channel %dx%d %s @%s fps, %s %d bit/s, gop %d, %s",
                          self.tag, params.width, params.height, params.pixel_format,
                          self.fps, params.rc_mode.name, params.bitrate, params.gop,
                          params.profile.value)
        elif any(getattr(ch.params, k) != v for k, v in pic.items()):
            ch.update(**pic)  # new input: the backend re-opens with an IDR
        return ch

    def _frame(self, ob: Buffer) -> memoryview | None:
        """The visible picture of an OUTPUT buffer as the backend wants it
        (a view of the buffer; a repacked copy only when cropping)."""
        need = self.raw.layout(self.width, self.height)[1]
        p = ob.planes[0]
        if p.bytesused < need:
            return None
        mem = self.out_q.view(ob)[:need]
        w, h = self.width, self.height
        left, top, cw, ch = self.crop
        if (cw, ch) == (w, h):
            return mem
        a = np.frombuffer(mem, np.uint8)
        size = cw * ch * 3 // 2
        if self._scratch is None or self._scratch.size != size:
            self._scratch = np.empty(size, np.uint8)
        s = self._scratch
        s[:cw * ch].reshape(ch, cw)[:] = a[:w * h].reshape(h, w)[top:top + ch, left:left + cw]
        if self.raw.backend == "nv12":
            s[cw * ch:].reshape(ch // 2, cw)[:] = \
                a[w * h:].reshape(h // 2, w)[top // 2:(top + ch) // 2, left:left + cw]
        else:
            cs, ps = (cw // 2) * (ch // 2), (w // 2) * (h // 2)
            for i in range(2):  # U, V planes
                src = a[w * h + i * ps:w * h + (i + 1) * ps].reshape(h // 2, w // 2)
                s[cw * ch + i * cs:cw * ch + (i + 1) * cs].reshape(ch // 2, cw // 2)[:] = \
                    src[top // 2:(top + ch) // 2, left // 2:(left + cw) // 2]
        return memoryview(s)

    def _encode(self, ob: Buffer, cb: Buffer) -> None:
        out, cap = self.out_q, self.cap_q
        p = ob.planes[0]
        if out.mem_type == abi.Memory.MMAP and not self.node.memory.sync_from_client(p.offset, p.bytesused):
            with self.cv:  # the client's data is still being fetched: retry shortly
                self._held_out = None
                cap.cancel(cb)
                out.cancel(ob)
                self._retry = True
            return
        with self.cv:
            self._held_out = None
            last = False
            if self.state == EncState.DRAINING:
                self.drain_left -= 1
                last = self.drain_left == 0
        ts, field = ob.timestamp_ns, ob.field
        frame = self._frame(ob)
        if frame is None:
            self.bad_input += 1
            self.log.warning("%s: OUTPUT buffer %d has %d bytes, a %dx%d %s frame needs %d: returned "
                             "with ERROR", self.tag, ob.index, p.bytesused, self.width, self.height,
                             self.raw.backend, self.raw.layout(self.width, self.height)[1])
            cap.cancel(cb)
            self._out_done(ob, BF.ERROR)
            return
        ch = self._get_channel()
        dst = cap.view(cb)
        try:
            n, key = ch.encode_into(frame, ts, dst)
        except ValueError as ex:
            if getattr(ex, "needed", None) is None:  # not the backend's OutputTooSmall
                raise
            self.lost += 1
            self.log.warning("%s: CAPTURE buffer %d too small (%s): frame lost, next is an IDR",
                             self.tag, cb.index, ex)
            self._out_done(ob, 0)
            self._cap_done(cb, 0, ts, field, BF.ERROR, last)
            return
        self._out_done(ob, 0)
        self.frames += 1
        if key:
            n, header = self._headers(dst, n)
            if header:
                self.pending = PendingAU(bytes(dst[header:n]), True, ts, field, last)
                self._cap_done(cb, header, ts, field, 0, False)
                return
        self._cap_done(cb, n, ts, field, BF.KEYFRAME if key else BF.PFRAME, last)

    def _headers(self, dst: memoryview, n: int) -> tuple[int, int]:
        """Apply HEADER_MODE / REPEAT_SEQ_HEADER to a keyframe AU in ``dst``.
        Returns (new size, size of a header part to send alone or 0)."""
        fresh, self.fresh = self.fresh, False
        spans = nal_spans(dst[:n])
        hdr = 0
        for s in spans:
            if s.nal_type not in (NalType.SPS, NalType.PPS):
                break
            hdr = s.end
        if not hdr or hdr >= n:
            return n, 0
        if fresh and self.settings.header_separate:
            return n, hdr
        if not fresh and not self.settings.repeat_headers:
            a = np.frombuffer(dst, np.uint8)
            a[:n - hdr] = a[hdr:n]  # numpy handles the overlap
            return n - hdr, 0
        return n, 0

    def _write_pending(self, cb: Buffer) -> None:
        pa = self.pending
        self.pending = None
        if pa is None:
            self.cap_q.cancel(cb)
            return
        dst = self.cap_q.view(cb)
        if len(pa.data) > len(dst):
            self.lost += 1
            self._cap_done(cb, 0, pa.timestamp_ns, pa.field, BF.ERROR, pa.last)
            if self.channel is not None:
                self.channel.request_idr()
            return
        dst[:len(pa.data)] = pa.data
        self._cap_done(cb, len(pa.data), pa.timestamp_ns, pa.field, BF.KEYFRAME, pa.last)

    def _finish_drain(self, cb: Buffer) -> None:
        """Nothing left to encode: an empty CAPTURE buffer carries LAST."""
        self._cap_done(cb, 0, 0, abi.Field.NONE, 0, True)

    def _out_done(self, ob: Buffer, flags: int) -> None:
        seq, self.out_seq = self.out_seq, self.out_seq + 1
        self.out_q.done(ob, [p.bytesused for p in ob.planes], seq, ob.timestamp_ns, flags)

    def _cap_done(self, cb: Buffer, n: int, ts: int, field: int, flags: int, last: bool) -> None:
        seq, self.cap_seq = self.cap_seq, self.cap_seq + 1
        cb.field = field
        if last:
            # EOS is pending before the LAST buffer is done: a client woken by the buffer
            # (POLLIN) must find the event too (the allegro-dvt race v4l2-compliance catches).
            flags |= BF.LAST
            with self.cv:
                if self.state == EncState.DRAINING:
                    self.state = EncState.STOPPED
            ev = abi.v4l2_event()
            ev.type = abi.EventType.EOS
            self.handle.events.post(ev)
            self.log.debug("%s: drained (LAST + EOS)", self.tag)
        self.cap_q.done(cb, n, seq, ts, flags)  # wakes the transports

    # ------------------------------------------------------------ teardown

    def release(self, who) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify()
        for q in (self.out_q, self.cap_q):
            q.release(who)
        self.ctrl_set.remove_listener(self._post_ctrl_event)
        if self._thread is None:
            self._close_channel()

    def status(self) -> str:
        return (f"pid {self.handle.caller.pid}: {self.state.value}, {self.raw.backend} "
                f"{self.width}x{self.height} crop {self.crop} @{self.fps}, "
                f"{self.frames} frames, {self.lost} lost, {self.bad_input} bad input"
                + (f", FAILED: {self.fatal}" if self.fatal else ""))


# ---------------------------------------------------------------- the node

class EncoderNode(Node):
    """The AVPU as a V4L2 stateful M2M H.264 encoder (implements fileops.Device)."""

    card = "impv4l2 encoder"
    bus_info = "platform:impv4l2-encoder"
    event_types = frozenset({abi.EventType.CTRL, abi.EventType.EOS})

    def __init__(self, name: str, backend: Backend, defaults=None, *,
                 apis: tuple[str, ...] = ("mplane",), separate_headers: bool = False):
        super().__init__(name, ControlView([]))
        self.backend = backend
        self.defaults = defaults  # impv4l2.config.EncoderDefaults, read at each open
        self.apis = apis
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
    table = NodeHandle.table.copy()

    def __init__(self, node: EncoderNode, caller):
        super().__init__(node, caller)
        self.ctx = EncoderContext(node, self)

    def ioctl(self, cmd: int, arg: bytearray, mem) -> int:
        if self.ctx.fatal:
            raise OSError(errno.EIO, f"encoder failed: {self.ctx.fatal}")
        return super().ioctl(cmd, arg, mem)

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
        mask = 0
        ctx = self.ctx
        if ctx.fatal:
            return mask | POLLERR
        out, cap = ctx.out_q, ctx.cap_q
        # as v4l2_m2m_poll: an error unless one queue streams with buffers in the driver
        src_ok = out.streaming and out.owned_by_driver()
        dst_ok = cap.streaming and (cap.owned_by_driver() or cap.last_dequeued)
        if not src_ok and not dst_ok:
            return mask | POLLERR
        if out.has_done():
            mask |= POLLOUT | POLLWRNORM
        if cap.has_done() or cap.last_dequeued:
            mask |= POLLIN | POLLRDNORM
        return mask

    # ------------------------------------------------------------ formats

    def _check(self, t: int) -> bool:
        """Validate a buffer type; True for OUTPUT."""
        if t not in self.node.buf_types:
            raise OSError(errno.EINVAL, f"buffer type {t} not supported")
        return t in OUTPUT_TYPES

    @table.ioctl("ENUM_FMT", abi.v4l2_fmtdesc)
    def _enum_fmt(self, s, mem):
        is_out = self._check(s.type)
        fmts = RAW_FORMATS if is_out else CODED_FORMATS
        if s.index >= len(fmts):
            raise OSError(errno.EINVAL, "no more formats")
        f = fmts[s.index]
        index, t = s.index, s.type
        abi.zero(s)
        s.index, s.type, s.pixelformat = index, t, f.fourcc
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
            f = next((x for x in RAW_FORMATS if x.fourcc == pix.pixelformat), RAW_FORMATS[0])
            w = min(max(pix.width, MIN_W), MAX_W) & ~(STEP - 1)
            h = min(max(pix.height, MIN_H), MAX_H) & ~(STEP - 1)
            bpl, size = f.layout(w, h)
            col = _colorimetry(pix)
            self._fill_fmt(s, f.fourcc, w, h, bpl, size, col)
            return f, w, h, col
        f = next((x for x in CODED_FORMATS if x.fourcc == pix.pixelformat), CODED_FORMATS[0])
        want = pix.plane_fmt[0].sizeimage if mp else pix.sizeimage
        lo, default = CodedFormat.sizeimage_range(ctx.width, ctx.height)
        size = default if want < lo else min(page_align(want), MAX_SIZEIMAGE)
        self._fill_fmt(s, f.fourcc, ctx.width, ctx.height, 0, size)
        return f, size

    @table.ioctl("G_FMT", abi.v4l2_format)
    def _g_fmt(self, s, mem):
        ctx = self.ctx
        if self._check(s.type):
            bpl, size = ctx.raw.layout(ctx.width, ctx.height)
            self._fill_fmt(s, ctx.raw.fourcc, ctx.width, ctx.height, bpl, size)
        else:
            self._fill_fmt(s, ctx.coded.fourcc, ctx.width, ctx.height, 0, ctx.sizeimage)

    @table.ioctl("TRY_FMT", abi.v4l2_format)
    def _try_fmt(self, s, mem):
        self._try_fmt_of(s)

    @table.ioctl("S_FMT", abi.v4l2_format, prio=True)
    def _s_fmt(self, s, mem):
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

    @table.ioctl("ENUM_FRAMESIZES", abi.v4l2_frmsizeenum)
    def _enum_framesizes(self, s, mem):
        if not any(f.fourcc == s.pixel_format for f in RAW_FORMATS + CODED_FORMATS):
            raise OSError(errno.EINVAL, "unknown pixel format")
        if s.index != 0:
            raise OSError(errno.EINVAL, "no more sizes")
        pf = s.pixel_format
        abi.zero(s)
        s.pixel_format, s.type = pf, abi.raw.Frmsizetypes.STEPWISE
        sw = s.stepwise
        sw.min_width, sw.max_width, sw.step_width = MIN_W, MAX_W, STEP
        sw.min_height, sw.max_height, sw.step_height = MIN_H, MAX_H, STEP

    # ------------------------------------------------------------ crop (OUTPUT)

    def _sel_type(self, t: int) -> None:
        # as the kernel core: the selection API names OUTPUT for OUTPUT_MPLANE too
        mp = {BT.VIDEO_OUTPUT: BT.VIDEO_OUTPUT_MPLANE, BT.VIDEO_CAPTURE: BT.VIDEO_CAPTURE_MPLANE}
        if t not in self.node.buf_types and mp.get(t) not in self.node.buf_types:
            raise OSError(errno.EINVAL, f"buffer type {t} not supported")
        if t not in OUTPUT_TYPES:
            raise OSError(errno.EINVAL, "the encoder crops on the OUTPUT queue only")

    @table.ioctl("G_SELECTION", abi.raw.v4l2_selection)
    def _g_selection(self, s, mem):
        self._sel_type(s.type)
        ctx = self.ctx
        rects = {abi.raw.SelectionTarget.CROP: ctx.crop,
                 abi.raw.SelectionTarget.CROP_DEFAULT: (0, 0, ctx.width, ctx.height),
                 abi.raw.SelectionTarget.CROP_BOUNDS: (0, 0, ctx.width, ctx.height)}
        r = rects.get(s.target)
        if r is None:
            raise OSError(errno.EINVAL, f"selection target {s.target} not supported")
        s.r.left, s.r.top, s.r.width, s.r.height = r
        abi.zero(s.reserved)

    @table.ioctl("S_SELECTION", abi.raw.v4l2_selection, prio=True)
    def _s_selection(self, s, mem):
        self._sel_type(s.type)
        if s.target != abi.raw.SelectionTarget.CROP:
            raise OSError(errno.EINVAL, f"selection target {s.target} is read-only")
        ctx = self.ctx
        if ctx.out_q.streaming:
            raise OSError(errno.EBUSY, "OUTPUT is streaming")
        w, h = ctx.width, ctx.height
        cw = min(max(s.r.width, MIN_W), w) & ~1
        ch = min(max(s.r.height, MIN_H), h) & ~1
        left = min(max(s.r.left, 0), w - cw) & ~1
        top = min(max(s.r.top, 0), h - ch) & ~1
        ctx.crop = (left, top, cw, ch)
        s.r.left, s.r.top, s.r.width, s.r.height = ctx.crop
        abi.zero(s.reserved)

    # ------------------------------------------------------------ frame rate

    # dev-encoder.rst: the frame rate is the OUTPUT (raw) queue's; the CAPTURE
    # queue has a frame interval of its own only with ENC_CAP_FRAME_INTERVAL,
    # which the AVPU lacks, so G/S_PARM(CAPTURE) is EINVAL (as vicodec).
    def _parm_type(self, t: int) -> None:
        if not self._check(t):
            raise OSError(errno.EINVAL, "G/S_PARM: the coded (CAPTURE) queue has no frame interval of its own")

    @table.ioctl("G_PARM", abi.v4l2_streamparm)
    def _g_parm(self, s, mem):
        self._parm_type(s.type)
        self._fill_parm(s)

    @table.ioctl("S_PARM", abi.v4l2_streamparm, prio=True)
    def _s_parm(self, s, mem):
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

    @table.ioctl("QBUF", abi.v4l2_buffer)
    def _qbuf(self, s, mem):
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

    @table.ioctl("STREAMOFF", abi.c_int, prio=True)
    def _streamoff(self, s, mem):
        self.queue(s.value).streamoff(self, s.value)

    # ------------------------------------------------------------ encoder commands

    @staticmethod
    def _try_cmd(s) -> None:
        if s.cmd not in (ENC_CMD_START, ENC_CMD_STOP):
            raise OSError(errno.EINVAL, f"encoder command {s.cmd} not supported")
        s.flags = 0  # STOP_AT_GOP_END is not supported: stop right after the queued frames
        abi.zero(s.m1)

    @table.ioctl("TRY_ENCODER_CMD", abi.raw.v4l2_encoder_cmd)
    def _try_encoder_cmd(self, s, mem):
        self._try_cmd(s)

    @table.ioctl("ENCODER_CMD", abi.raw.v4l2_encoder_cmd, prio=True)
    def _encoder_cmd(self, s, mem):
        self._try_cmd(s)
        self.ctx.encoder_cmd(s.cmd)


EncoderNode.handle_class = EncoderHandle
