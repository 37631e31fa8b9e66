"""One stateful-encoder session (one open file of the encoder node): the m2m context.

It owns the context's two :class:`~impv4l2.v4l2.m2m.M2MQueue`, formats, codec controls
and backend encoder channel, and the worker thread that pairs the oldest queued OUTPUT
buffer with the oldest queued CAPTURE buffer; the backend writes the access unit straight
into the CAPTURE buffer's memory.  The drain state machine (:class:`EncState`, the table
in impv4l2.v4l2.encoder) lives here: ENC_CMD_STOP, LAST and V4L2_EVENT_EOS.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fractions
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable


from .. import optional
from ..driver.base import EncoderChannel, OutputTooSmall
from ..driver.h264 import NAL_SYNTAX, header_end, nal_spans
from . import abi
from .codec_controls import H264_CONTROLS, HEVC_CONTROLS, RC_KEYS, STREAM_KEYS, CodecSettings, codec_table
from .controls import ControlSet, ControlView
from .formats import (COLORSPACE, ENCODER_RAW_FORMATS, QUANTIZATION, XFER_FUNC, YCBCR_ENC,
                      CodedFormat)
from .m2m import API_TYPES, M2MQueue
from .queue import OUTPUT_TYPES, Buffer

if TYPE_CHECKING:
    from .encoder import EncoderHandle, EncoderNode

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


class EncState(enum.Enum):
    """Encoder states (see the module table for their dev-encoder/OpenMAX names)."""

    INITIALIZING = "initializing"
    ENCODING = "encoding"
    DRAINING = "draining"
    STOPPED = "stopped"


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
        qargs = dict(timestamp_flags=BF.TIMESTAMP_COPY, min_buffers=1, budget=node.budget)
        self.out_q = M2MQueue(node.regions, node.name, out_t, node.memory, log, **qargs)
        self.cap_q = M2MQueue(node.regions, node.name, cap_t, node.memory, log, **qargs)
        for q, d in ((self.out_q, "output"), (self.cap_q, "capture")):
            q.wake = node.wake
            q.on_start = lambda d=d: self._started(d)
            q.on_stop = lambda d=d: self._stopped(d)
        # formats
        self.raw = ENCODER_RAW_FORMATS[0]
        self.coded = node.coded_formats[0]
        self.width, self.height = DEFAULT_W, DEFAULT_H
        self.crop = (0, 0, DEFAULT_W, DEFAULT_H)
        self.fps = fractions.Fraction(DEFAULT_FPS)
        self.sizeimage = CodedFormat.sizeimage_range(self.width, self.height)[1]
        # colorimetry of the source, as the client says (passed on to CAPTURE)
        self.colorimetry = (COLORSPACE, XFER_FUNC, YCBCR_ENC, QUANTIZATION)
        # controls (per context, like an m2m driver's per-ctx handler)
        table = codec_table(H264_CONTROLS + HEVC_CONTROLS, node.backend.encoder.codecs)
        self.settings = CodecSettings(node.defaults, table, on_change=self._control_changed)
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
        # A client-written OUTPUT buffer still being fetched (FUSE cached/direct mmap): the worker
        # waits until the transport's done() (_fetched) moves past the count it saw before asking.
        self._fetched = 0
        self._wait_fetch: int | None = None
        self._stop = False
        self._job_lock = threading.Lock()  # held by the worker while it runs a job
        self._thread: threading.Thread | None = None
        self._scratch: bytearray | None = None  # the cropped picture (crop ≠ the full frame)
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
        # per-context controls: only this context's handle hears of them
        self.node.post_ctrl_event(ctrl, value, abi.EVENT_CTRL_CH_VALUE, handles=(self.handle,), origin=origin)

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
                ch.update(**self.settings.rc_fields(ch.params.codec))
            elif key in STREAM_KEYS:
                ch.update(**self.settings.stream_fields(ch.params.codec))
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
                    if self._wait_fetch is not None and self._wait_fetch == self._fetched:
                        self.cv.wait()  # woken by the fetch, or by any queue change (then retried)
                        self._wait_fetch = None
                        continue
                    self._wait_fetch = None
                    job = None if self.fatal else self._pick()
                    if job is not None:
                        break
                    self.cv.wait()
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
        if reset or (self.channel is not None and self.channel.params.codec is not self.coded.codec):
            self._close_channel()
        pic = self.picture_fields()
        ch = self.channel
        if ch is None:
            params = self.settings.params(**pic, codec=self.coded.codec)
            self.channel = ch = self.node.backend.encoder.create_channel(params)
            self.fresh = True
            self.log.info("%s: %s encoder channel %dx%d %s @%s fps, %s %d bit/s, gop %d, %s",
                          self.tag, params.codec.value, params.width, params.height, params.pixel_format,
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
        size = cw * ch * 3 // 2
        if self._scratch is None or len(self._scratch) != size:
            self._scratch = bytearray(size)
        s = self._scratch
        if cw == w:  # rows only (1088 -> 1080): two or three contiguous slices, no numpy
            s[:w * ch] = mem[top * w:(top + ch) * w]
            if self.raw.backend == "nv12":
                s[w * ch:] = mem[w * h + top // 2 * w:w * h + (top + ch) // 2 * w]
            else:
                cs, ps, hw = (cw // 2) * (ch // 2), (w // 2) * (h // 2), w // 2
                for i in range(2):  # U, V planes
                    base = w * h + i * ps + top // 2 * hw
                    s[w * ch + i * cs:w * ch + (i + 1) * cs] = mem[base:base + cs]
            return memoryview(s)
        np = optional.module("numpy")  # a column crop is a strided copy (S_SELECTION offers it only with numpy)
        a = np.frombuffer(mem, np.uint8)
        t = np.frombuffer(s, np.uint8)
        t[:cw * ch].reshape(ch, cw)[:] = a[:w * h].reshape(h, w)[top:top + ch, left:left + cw]
        if self.raw.backend == "nv12":
            t[cw * ch:].reshape(ch // 2, cw)[:] = \
                a[w * h:].reshape(h // 2, w)[top // 2:(top + ch) // 2, left:left + cw]
        else:
            cs, ps = (cw // 2) * (ch // 2), (w // 2) * (h // 2)
            for i in range(2):  # U, V planes
                src = a[w * h + i * ps:w * h + (i + 1) * ps].reshape(h // 2, w // 2)
                t[cw * ch + i * cs:cw * ch + (i + 1) * cs].reshape(ch // 2, cw // 2)[:] = \
                    src[top // 2:(top + ch) // 2, left // 2:(left + cw) // 2]
        return memoryview(s)

    def _on_fetched(self) -> None:
        """The transport's fetch of a client-written buffer landed (its thread)."""
        with self.cv:
            self._fetched += 1
            self.cv.notify()

    def _encode(self, ob: Buffer, cb: Buffer) -> None:
        out, cap = self.out_q, self.cap_q
        p = ob.planes[0]
        seen = self._fetched
        if out.mem_type == abi.Memory.MMAP and not self.node.memory.sync_from_client(p.offset, p.bytesused,
                                                                                   self._on_fetched):
            with self.cv:  # the client's data is still being fetched: retry once it has landed
                self._held_out = None
                cap.cancel(cb)
                out.cancel(ob)
                self._wait_fetch = seen
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
        except OutputTooSmall as ex:
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
        syntax = NAL_SYNTAX[self.coded.codec]
        hdr = header_end(nal_spans(dst[:n], syntax), syntax)  # SPS+PPS (HEVC: VPS+SPS+PPS)
        if not hdr or hdr >= n:
            return n, 0
        if fresh and self.settings.header_separate:
            return n, hdr
        if not fresh and not self.settings.repeat_headers:
            dst[:n - hdr] = dst[hdr:n]  # memoryview assignment is a memmove: the overlap is safe
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


