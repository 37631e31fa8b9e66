"""The capture node: one per frame channel (``main``, ``sub``).

``CaptureNode(name, backend, channel)`` is a :class:`impv4l2.fileops.Device`
a transport serves as ``/dev/videoN`` (CUSE) or ``<mount>/videoN`` (FUSE).

Frames: NV12 is written by the backend straight into the client's buffer
(MMAP: the memfd region the client maps; USERPTR: the buffer's memfd
staging region, copied once to the client at DQBUF).  YUYV/YU12 frames are
rendered into a scratch NV12 buffer and converted by swscale into the
buffer.  H.264/MJPEG bind an AVPU channel to the frame channel
(``channel.start_encoded``, IMP's FrameSource->Encoder binding): each buffer
receives one access unit (SPS+PPS before every IDR, no AUD) or one JPEG, with
bytesused and KEYFRAME/PFRAME set.  The encoder controls (MPEG/Codec class and
JPEG quality) always exist on the node; those that do not apply to the
selected format are flagged INACTIVE (all of them for raw formats), and a
flag change is sent as V4L2_EVENT_CTRL with CH_FLAGS.  A client slower than the sensor loses frames: with no buffer
queued ``get_buffer`` answers None, the channel drops the frame and the
sequence numbers of later frames skip it.

Motion detection (Detect class controls, V4L2_EVENT_MOTION_DET) and the
Day/Night Auto/State controls come from :mod:`impv4l2.v4l2.features` where the
backend offers them, shared by every node of the backend like the ISP controls.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import threading

from ..driver.base import (Backend, ChannelMode, Codec, EncoderChannel, EncoderParams,
                           FrameChannel, FrameInfo)
from ..fileops import POLLERR, WouldBlock
from . import abi
from .budget import UNLIMITED, BufferBudget
from .codec_controls import H264_CONTROLS, HEVC_CONTROLS, CodecControl, CodecSettings, codec_table
from . import features as features_mod
from .controls import ControlSet, ControlView, isp_control_set
from .events import motion_event
from .formats import PixFormat, Produce, capture_formats, fill_pix, nearest_size
from .node import Node, NodeHandle
from .queue import Buffer, BufferQueue, FileIO

log = logging.getLogger("impv4l2.v4l2")

CAP = abi.BufType.VIDEO_CAPTURE
READBUFFERS = 4  # buffers of the read() emulation (G_PARM readbuffers)

CID = abi.CID
INACTIVE = abi.CtrlFlag.INACTIVE

# Encoder controls of a capture node: the M2M encoder's table without what only
# an M2M stream has (header mode: a camera stream always joins and repeats
# SPS/PPS; min output buffers), plus JPEG quality.
_M2M_ONLY = frozenset({CID.MPEG_VIDEO_HEADER_MODE, CID.MPEG_VIDEO_REPEAT_SEQ_HEADER,
                       CID.MIN_BUFFERS_FOR_OUTPUT})
JPEG_QUALITY = CodecControl(CID.JPEG_COMPRESSION_QUALITY, "Compression Quality", abi.CtrlType.INTEGER,
                            1, 100, 1, 80, "jpeg_quality", codecs=frozenset({Codec.JPEG}))
CAPTURE_CODEC_CONTROLS: tuple[CodecControl, ...] = (
    tuple(c for c in H264_CONTROLS if c.cid not in _M2M_ONLY) + HEVC_CONTROLS + (JPEG_QUALITY,))

_isp_sets: dict[int, ControlSet] = {}
_isp_lock = threading.Lock()


def isp_controls(backend: Backend) -> ControlSet:
    """The ISP's control set, shared by every node of ``backend``.  With a light meter the
    Day/Night control belongs to the day/night feature (features.DayNightControls)."""
    with _isp_lock:
        cs = _isp_sets.get(id(backend.isp))
        if cs is None:
            skip = ("day_night",) if backend.light_meter is not None else ()
            cs = _isp_sets[id(backend.isp)] = isp_control_set(backend.isp, skip)
        return cs


class CaptureSink:
    """The FrameSink a started channel delivers into (runs on the backend thread)."""

    def __init__(self, node: "CaptureNode"):
        self.node = node
        self.q = node.queue
        self.fmt: PixFormat = node.fmt
        self.converter = None  # a convert.Converter while a CONVERT format streams
        self.inflight: collections.deque[tuple[memoryview, memoryview, Buffer]] = collections.deque()
        self.frames = 0
        self.dropped = 0
        # (capture timestamp, sequence) of the last frames: motion events name their frame
        self.recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=8)

    def prepare(self, fmt: PixFormat, width: int, height: int) -> None:
        # NATIVE and ENCODED: the backend writes into the client's buffer.
        self.fmt = fmt
        self.inflight.clear()
        if fmt.produce == Produce.CONVERT:
            c = self.converter
            if c is None or (c.fmt, c.width, c.height) != (fmt, width, height):
                from .convert import Converter  # PyAV: only when such a format is in use

                self.converter = Converter(fmt, width, height)

    def get_buffer(self) -> memoryview | None:
        buf = self.q.take()
        if buf is None:
            self.dropped += 1
            return None
        dst = self.q.view(buf)
        given = self.converter.scratch() if self.fmt.produce == Produce.CONVERT else dst
        self.inflight.append((given, dst, buf))
        return given

    def frame_done(self, view: memoryview, info: FrameInfo) -> None:
        entry = next((e for e in self.inflight if e[0] is view), None)
        if entry is None:
            if not self.inflight:
                return
            entry = self.inflight[0]
        self.inflight.remove(entry)
        given, dst, buf = entry
        try:
            flags = abi.BufFlag.ERROR if info.error else 0
            produce = self.fmt.produce
            if produce == Produce.CONVERT:
                n = self.converter.convert(given, dst)
                self.converter.release(given)
            elif produce == Produce.ENCODED:
                n = info.bytesused  # 0 with ERROR: the picture did not fit
                if not info.error:  # an errored buffer holds no frame of either kind
                    flags |= abi.BufFlag.KEYFRAME if info.keyframe else abi.BufFlag.PFRAME
            else:
                n = info.bytesused or len(dst)
            self.frames += 1
            self.recent.append((info.timestamp_ns, info.sequence))
            self.q.done(buf, n, info.sequence, info.timestamp_ns, flags)
        except Exception:
            log.exception("%s: frame %d lost", self.node.name, info.sequence)
            self.q.cancel(buf)


class CaptureNode(Node):
    """A V4L2 video capture node over one backend frame channel."""

    device_caps = (abi.Cap.VIDEO_CAPTURE | abi.Cap.EXT_PIX_FORMAT | abi.Cap.READWRITE
                   | abi.Cap.STREAMING)
    event_types = frozenset({abi.EventType.CTRL, abi.EventType.SOURCE_CHANGE})
    formats: tuple[PixFormat, ...] = capture_formats()  # per node: those of the backend's codecs

    def __init__(self, name: str, backend: Backend, channel: FrameChannel,
                 controls: ControlView | None = None, encoder_defaults=None,
                 budget: BufferBudget = UNLIMITED, daynight=None):
        """``encoder_defaults``: an impv4l2.config.EncoderDefaults (or None) for
        the initial encoder control values; ``budget``: the buffer memory it may hold;
        ``daynight``: an impv4l2.config.DayNightConfig (or None: defaults, no GPIOs)."""
        # This node's encoder binding: its own settings (not shared with other nodes).
        self.enc_channel: EncoderChannel | None = None
        self.formats = capture_formats(backend.encoder.codecs)
        self.codec = CodecSettings(encoder_defaults, codec_table(CAPTURE_CODEC_CONTROLS, backend.encoder.codecs),
                                   on_change=self._codec_setting_changed)
        self.codec_set = ControlSet(self.codec.controls())
        self.features = features_mod.features_of(backend, daynight)
        super().__init__(name, controls or ControlView([isp_controls(backend), *self.features.control_sets(),
                                                        self.codec_set]), budget=budget)
        if self.features.motion is not None:
            self.event_types = CaptureNode.event_types | {abi.EventType.MOTION_DET}
            self.features.motion.listeners.append(self._motion)
        self.backend = backend
        self.channel = channel
        self.role = channel.role
        self.card = f"impv4l2 {channel.role} ({backend.name})"
        self.bus_info = f"platform:impv4l2-{channel.role}"
        self.fmt = self.formats[0]
        mode = channel.mode
        self.width, self.height, self.fps = mode.width, mode.height, mode.fps
        self.queue = BufferQueue(name, CAP, self.memory, log, budget=self.budget)
        self.queues[CAP] = self.queue
        self.buf_types = frozenset({CAP})
        self.queue.on_start = self._start
        self.queue.on_stop = self._stop
        self.queue.wake = self.wake  # every transport's waker, not one captured now
        self._update_sizes()
        self.sink = CaptureSink(self)

    def _update_sizes(self) -> None:
        self.queue.plane_sizes = [self.fmt.layout(self.width, self.height)[1]]
        self._update_active()

    # ------------------------------------------------------------ encoder controls

    def _update_active(self) -> None:
        """Flag INACTIVE the encoder controls that do not apply to the selected
        format; subscribers get V4L2_EVENT_CTRL with CH_FLAGS for each change."""
        for c in self.codec_set.controls.values():
            active = self.fmt.codec in {k.value for k in self.codec.codecs_of(c.id)}
            flags = c.flags & ~INACTIVE if active else c.flags | INACTIVE
            if flags == c.flags:
                continue
            c.flags = flags
            value = 0 if c.flags & abi.CtrlFlag.WRITE_ONLY else c.get()
            self.post_ctrl_event(c, value, abi.EVENT_CTRL_CH_FLAGS)

    def _codec_setting_changed(self, key: str, value: int) -> None:
        """A control changed (ioctl thread): forward it to a running encoder
        channel of the codec it applies to.  Bitrate applies from the next
        frame, FORCE_KEY_FRAME makes the next frame an IDR, GOP/profile/level
        apply at the next IDR (the backend's rules)."""
        ch = self.enc_channel
        if ch is None:
            return
        try:
            if key == "force_key_frame":
                ch.request_idr()
                return
            fields = self.codec.update_fields(key, Codec(self.fmt.codec))
            if fields is not None:
                ch.update(**fields)
        except ValueError as ex:
            raise OSError(errno.EINVAL, str(ex)) from None

    def encoder_params(self) -> EncoderParams:
        """The encoder channel parameters of the selected compressed format."""
        p = self.codec.params(self.width, self.height, self.fps, 1, "nv12", Codec(self.fmt.codec))
        return dataclasses.replace(p, jpeg_quality=self.codec.values["jpeg_quality"])

    def busy(self) -> bool:
        q = self.queue
        return bool(q.buffers) or q.streaming or q.fileio is not None

    def _start(self) -> None:
        try:
            self.channel.configure(ChannelMode(self.width, self.height, self.fps))
            self.sink.prepare(self.fmt, self.width, self.height)
            if self.fmt.produce == Produce.ENCODED:
                self.enc_channel = self.channel.start_encoded(self.encoder_params(), self.sink)
            else:
                self.channel.start(self.sink)
        except ValueError as ex:
            raise OSError(errno.EINVAL, str(ex)) from None
        except RuntimeError as ex:
            raise OSError(errno.EBUSY, str(ex)) from None
        log.info("%s: streaming %s %dx%d@%d", self.name, self.fmt.description,
                 self.width, self.height, self.fps)

    def _stop(self) -> None:
        self.enc_channel = None
        self.channel.stop()  # closes the encoder channel
        log.info("%s: stopped (%d frames, %d dropped)", self.name, self.sink.frames, self.sink.dropped)

    def _motion(self, region_mask: int, timestamp_ns: int) -> None:
        """Motion in a frame (backend thread): the event names this node's buffer of it."""
        seq = next((q for t, q in self.sink.recent if t == timestamp_ns), None) \
            if self.queue.streaming else None
        self.post_event(motion_event(region_mask, seq))

    def close(self) -> None:
        f, self.features = self.features, None
        if f is not None:
            if f.motion is not None and self._motion in f.motion.listeners:
                f.motion.listeners.remove(self._motion)
            features_mod.release(f)
        super().close()

    def closed(self, h: NodeHandle) -> None:
        fio = self.queue.fileio
        if fio is not None and fio.owner is h:
            fio.close()
        super().closed(h)

    def find_format(self, fourcc: int) -> PixFormat | None:
        return next((f for f in self.formats if f.fourcc == fourcc), None)

    def log_status(self) -> list[str]:
        q = self.queue
        return super().log_status() + [
            f"format {self.fmt.description} {self.width}x{self.height}@{self.fps}",
            f"queue: {len(q.buffers)} buffers, streaming {q.streaming}, "
            f"frames {self.sink.frames}, dropped {self.sink.dropped}",
        ]


class CaptureHandle(NodeHandle):
    """An open file of a capture node."""

    node: CaptureNode

    # inputs
    def vidioc_enuminput(self, s, mem):
        if s.index != 0:
            raise OSError(errno.EINVAL, f"no input {s.index}")
        abi.set_str(s, "name", "Camera")
        s.type = abi.raw.InputType.CAMERA

    def vidioc_g_input(self, s, mem):
        s.value = 0

    def vidioc_s_input(self, s, mem):
        if s.value != 0:
            raise OSError(errno.EINVAL, f"no input {s.value}")

    # formats
    def vidioc_enum_fmt(self, s, mem):
        formats = self.node.formats
        if s.index >= len(formats):
            raise OSError(errno.EINVAL, "no more formats")
        f = formats[s.index]
        s.flags, s.pixelformat = f.flags, f.fourcc
        abi.set_str(s, "description", f.description)

    def _try(self, s: abi.v4l2_format) -> tuple[PixFormat, int, int]:
        n = self.node
        pix = s.fmt.pix
        f = n.find_format(pix.pixelformat) or n.formats[0]
        w, h = nearest_size(n.channel.sizes(), pix.width, pix.height)
        fill_pix(pix, f, w, h)
        return f, w, h

    def vidioc_g_fmt(self, s, mem):
        n = self.node
        fill_pix(s.fmt.pix, n.fmt, n.width, n.height)

    def vidioc_try_fmt(self, s, mem):
        self._try(s)

    def vidioc_s_fmt(self, s, mem):
        f, w, h = self._try(s)
        n = self.node
        if (f, w, h) == (n.fmt, n.width, n.height):
            return
        if n.busy():
            raise OSError(errno.EBUSY, "buffers allocated or streaming")
        n.fmt, n.width, n.height = f, w, h
        n._update_sizes()

    def create_bufs_sizes(self, q, fmt):
        pix = fmt.fmt.pix
        n = self.node
        need = n.fmt.layout(n.width, n.height)[1]
        if pix.sizeimage < need:
            raise OSError(errno.EINVAL, f"sizeimage {pix.sizeimage} < {need}")
        return [pix.sizeimage]

    def vidioc_enum_framesizes(self, s, mem):
        n = self.node
        if n.find_format(s.pixel_format) is None:
            raise OSError(errno.EINVAL, "unknown pixel format")
        sizes = n.channel.sizes()
        if s.index >= len(sizes):
            raise OSError(errno.EINVAL, "no more sizes")
        s.type = abi.raw.Frmsizetypes.DISCRETE
        s.discrete.width, s.discrete.height = sizes[s.index]

    def vidioc_enum_frameintervals(self, s, mem):
        n = self.node
        if n.find_format(s.pixel_format) is None:
            raise OSError(errno.EINVAL, "unknown pixel format")
        if (s.width, s.height) not in [tuple(x) for x in n.channel.sizes()]:
            raise OSError(errno.EINVAL, f"size {s.width}x{s.height} not supported")
        rates = n.channel.frame_rates()
        if s.index >= len(rates):
            raise OSError(errno.EINVAL, "no more intervals")
        s.type = abi.raw.Frmivaltypes.DISCRETE
        s.discrete.numerator, s.discrete.denominator = 1, rates[s.index]

    # streaming parameters
    def _fill_parm(self, s) -> None:
        abi.zero(s)
        s.type = CAP
        c = s.parm.capture
        c.capability = abi.Cap.TIMEPERFRAME
        c.timeperframe.numerator, c.timeperframe.denominator = 1, self.node.fps
        c.readbuffers = READBUFFERS

    def vidioc_g_parm(self, s, mem):
        self._fill_parm(s)

    def vidioc_s_parm(self, s, mem):
        n = self.node
        tpf = s.parm.capture.timeperframe
        rates = n.channel.frame_rates()
        if tpf.numerator and tpf.denominator:
            want = tpf.denominator / tpf.numerator
            fps = min(rates, key=lambda r: (abs(r - want), -r))
        else:
            fps = n.fps
        if fps != n.fps:
            if n.queue.streaming:
                raise OSError(errno.EBUSY, "cannot change the frame rate while streaming")
            n.fps = fps
        self._fill_parm(s)

    # read() emulation
    def read(self, size: int, offset: int):
        q = self.node.queue
        fio = q.fileio
        if fio is None:
            if q.owner is not None:
                raise OSError(errno.EBUSY, "streaming I/O in use")
            FileIO(q, self, READBUFFERS)
            # The first frame is a frame period away, as with vb2: never hand out one that
            # raced in while streaming started (O_NONBLOCK callers get a stable EAGAIN;
            # blocking ones are re-run by the transport when it arrives).
            raise WouldBlock()
        elif fio.owner is not self:
            raise OSError(errno.EBUSY, "another file handle is reading")
        return fio.read(size, offset)

    def poll_queues(self) -> int:
        # As vb2_core_poll: polling an idle capture queue starts the read() emulation, or a
        # client that polls before its first read() (GStreamer io-mode=rw) waits forever.
        # FUSE_POLL does not say which events are wanted, so a handle watching control events
        # (a control panel polling for POLLPRI) is left alone.
        q = self.node.queue
        if q.owner is None and q.fileio is None and not q.buffers and q.streaming is False \
                and not any(t in (abi.EventType.CTRL, abi.EventType.MOTION_DET) for t, _ in self.events.subs):
            try:
                FileIO(q, self, READBUFFERS)
            except OSError as ex:
                log.info("%s pid %d: poll cannot start read() streaming: %s", self.node.name,
                         self.caller.pid, ex.strerror)
                return POLLERR
        return super().poll_queues()


CaptureNode.handle_class = CaptureHandle
