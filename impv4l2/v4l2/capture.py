"""The capture node: one or more per frame channel (``main``, ``main-2`` ..., ``sub`` ...).

``CaptureNode(name, backend, channel)`` is a :class:`impv4l2.fileops.Device`
a transport serves as ``/dev/videoN`` (CUSE) or ``<mount>/videoN`` (FUSE).
Every node of a channel consumes it through the channel's
:class:`~impv4l2.driver.fanout.ChannelHub` (fan-out: one frame delivery and one
encoder channel per format, whatever the number of nodes streaming).

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
import weakref

from ..driver.base import (Backend, ChannelMode, Codec, EncoderChannel, EncoderParams, FrameBuffer,
                           FrameChannel, FrameInfo)
from ..driver.fanout import ChannelHub, hub_of
from ..fileops import POLLERR, WouldBlock
from . import abi
from .budget import UNLIMITED, BufferBudget
from .codec_controls import H264_CONTROLS, HEVC_CONTROLS, CodecControl, CodecSettings, codec_table
from . import features as features_mod
from .controls import ControlSet, ControlView, isp_control_set
from .events import motion_event
from .formats import PixFormat, Produce, capture_formats, fill_pix, nearest_size
from .node import Node, NodeHandle, Priorities
from .queue import BufferQueue, FileIO

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


_prio_states: "weakref.WeakKeyDictionary[ChannelHub, Priorities]" = weakref.WeakKeyDictionary()


def channel_priorities(hub: ChannelHub) -> Priorities:
    """The priority state of every node of one frame channel."""
    with _isp_lock:
        p = _prio_states.get(hub)
        if p is None:
            p = _prio_states[hub] = Priorities()
        return p


class CaptureSink:
    """The FrameSink a started channel delivers into (runs on the backend thread): the
    buffer it lends travels back as the token, carrying the queue buffer it stands for."""

    def __init__(self, node: "CaptureNode", queue: BufferQueue):
        self.node = node
        self.q = queue
        self.fmt: PixFormat = node.fmt
        self.converter = None  # a convert.Converter while a CONVERT format streams
        self.frames = 0
        self.dropped = 0
        # (capture timestamp, sequence) of the last frames: motion events name their frame
        self.recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=8)

    def prepare(self, fmt: PixFormat, width: int, height: int) -> None:
        # NATIVE and ENCODED: the backend writes into the client's buffer.
        self.fmt = fmt
        if fmt.produce == Produce.CONVERT:
            c = self.converter
            if c is None or (c.fmt, c.width, c.height) != (fmt, width, height):
                from .convert import Converter  # PyAV: only when such a format is in use

                self.converter = Converter(fmt, width, height)

    def get_buffer(self) -> FrameBuffer | None:
        buf = self.q.take()
        if buf is None:
            self.dropped += 1
            return None
        dst = self.q.view(buf)
        given = self.converter.scratch() if self.fmt.produce == Produce.CONVERT else dst
        return FrameBuffer(given, buf.index, token=(dst, buf))

    def cancel(self, fb: FrameBuffer) -> None:
        dst, buf = fb.token
        if self.fmt.produce == Produce.CONVERT:
            self.converter.release(fb.view)
        self.q.cancel(buf)

    def frame_done(self, fb: FrameBuffer, info: FrameInfo) -> None:
        dst, buf = fb.token
        fb.sequence = info.sequence
        try:
            flags = abi.BufFlag.ERROR if info.error else 0
            produce = self.fmt.produce
            if produce == Produce.CONVERT:
                n = self.converter.convert(fb.view, dst)
                self.converter.release(fb.view)
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


class CaptureStream:
    """One consumer of the node's frame channel: a buffer queue, the sink filling it, the
    channel port it takes frames from and, while it streams a compressed format, its
    binding to the (shared) encoder channel.  A vb2 node has one; a node with shared
    readers one per open file (:mod:`impv4l2.v4l2.readers`)."""

    def __init__(self, node: "CaptureNode", queue: BufferQueue, port: FrameChannel):
        self.node, self.queue, self.port = node, queue, port
        self.sink = CaptureSink(node, queue)
        self.enc_channel: EncoderChannel | None = None
        queue.on_start = self.start
        queue.on_stop = self.stop
        queue.wake = node.wake  # every transport's waker, not one captured now
        queue.plane_sizes = node.plane_sizes()

    def busy(self) -> bool:
        q = self.queue
        return bool(q.buffers) or q.streaming or q.fileio is not None

    def start(self) -> None:
        n = self.node
        try:
            self.port.configure(ChannelMode(n.width, n.height, n.fps))
            self.sink.prepare(n.fmt, n.width, n.height)
            if n.fmt.produce == Produce.ENCODED:
                self.enc_channel = self.port.start_encoded(n.encoder_params(), self.sink)
            else:
                self.port.start(self.sink)
        except ValueError as ex:
            raise OSError(errno.EINVAL, str(ex)) from None
        except RuntimeError as ex:
            raise OSError(errno.EBUSY, str(ex)) from None
        log.info("%s: streaming %s %dx%d@%d", n.name, n.fmt.description, n.width, n.height, n.fps)

    def stop(self) -> None:
        self.enc_channel = None
        self.port.stop()  # leaves the channel (the last consumer stops it)
        log.info("%s: stopped (%d frames, %d dropped)", self.node.name, self.sink.frames, self.sink.dropped)


class CaptureNode(Node):
    """A V4L2 video capture node over one backend frame channel."""

    device_caps = (abi.Cap.VIDEO_CAPTURE | abi.Cap.EXT_PIX_FORMAT | abi.Cap.READWRITE
                   | abi.Cap.STREAMING)
    event_types = frozenset({abi.EventType.CTRL, abi.EventType.SOURCE_CHANGE})
    formats: tuple[PixFormat, ...] = capture_formats()  # per node: those of the backend's codecs

    def __init__(self, name: str, backend: Backend, channel: FrameChannel,
                 controls: ControlView | None = None, encoder_defaults=None,
                 budget: BufferBudget = UNLIMITED, daynight=None, role: str | None = None):
        """``channel``: the backend's frame channel (every node of it shares it through one
        :class:`~impv4l2.driver.fanout.ChannelHub`); ``role``: the node's (default the
        channel's: ``main``; ``main-2`` ... for more nodes of it); ``encoder_defaults``: an
        impv4l2.config.EncoderDefaults (or None) for the initial encoder control values;
        ``budget``: the buffer memory it may hold; ``daynight``: an
        impv4l2.config.DayNightConfig (or None: defaults, no GPIOs).  One file at a time
        owns its queue, as vb2's; :mod:`impv4l2.v4l2.readers` has the shared kind."""
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
        self.hub = hub_of(channel)
        # This node's consumer of the channel (sizes, rates, mode; its vb2 stream's port).
        self.channel: FrameChannel = self.hub.port()
        self.role = role or channel.role
        self.card = f"impv4l2 {self.role} ({backend.name})"
        self.bus_info = f"platform:impv4l2-{self.role}"
        # V4L2 priorities are the v4l2_device's (vdev->prio): the nodes of one channel share
        # them, so a RECORD-priority client locks format changes of the channel for all.
        self.prio_state = channel_priorities(self.hub)
        self.fmt = self.formats[0]
        mode = channel.mode
        self.width, self.height, self.fps = mode.width, mode.height, mode.fps
        self.buf_types = frozenset({CAP})
        self.streams: list[CaptureStream] = []
        self._make_streams()
        self._update_active()

    def _make_streams(self) -> None:
        """vb2: the node's one queue, owned by one file at a time."""
        self.queue = BufferQueue(self.name, CAP, self.memory, log, budget=self.budget)
        self.queues[CAP] = self.queue
        self.stream = CaptureStream(self, self.queue, self.channel)
        self.streams.append(self.stream)
        self.sink = self.stream.sink

    @property
    def enc_channel(self) -> EncoderChannel | None:
        """The encoder channel this node streams from (shared by all its streams)."""
        return next((st.enc_channel for st in self.streams if st.enc_channel is not None), None)

    def plane_sizes(self) -> list[int]:
        return [self.fmt.layout(self.width, self.height)[1]]

    def _update_sizes(self) -> None:
        for st in self.streams:
            st.queue.plane_sizes = self.plane_sizes()
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
        apply at the next IDR (the backend's rules).  An encoder channel shared
        with other nodes takes the change for all of them (the last one wins)."""
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
        return any(st.busy() for st in self.streams)

    def streaming(self) -> bool:
        return any(st.queue.streaming for st in self.streams)

    def _motion(self, region_mask: int, timestamp_ns: int) -> None:
        """Motion in a frame (backend thread): the event names this node's buffer of it."""
        seq = next((q for st in self.streams if st.queue.streaming
                    for t, q in st.sink.recent if t == timestamp_ns), None)
        self.post_event(motion_event(region_mask, seq))

    def close(self) -> None:
        f, self.features = self.features, None
        if f is not None:
            if f.motion is not None and self._motion in f.motion.listeners:
                f.motion.listeners.remove(self._motion)
            features_mod.release(f)
        super().close()

    def closed(self, h: NodeHandle) -> None:
        for st in self.streams:
            fio = st.queue.fileio
            if fio is not None and fio.owner is h:
                fio.close()
        super().closed(h)

    def find_format(self, fourcc: int) -> PixFormat | None:
        return next((f for f in self.formats if f.fourcc == fourcc), None)

    def log_status(self) -> list[str]:
        return super().log_status() + [
            f"format {self.fmt.description} {self.width}x{self.height}@{self.fps}",
            f"channel {self.hub.channel.role}: {self.hub.consumers()} consumers, encoders {self.hub.encoders}",
        ] + [f"queue: {len(st.queue.buffers)} buffers, streaming {st.queue.streaming}, "
             f"frames {st.sink.frames}, dropped {st.sink.dropped}" for st in self.streams]


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
            if n.streaming():
                raise OSError(errno.EBUSY, "cannot change the frame rate while streaming")
            n.fps = fps
        self._fill_parm(s)

    # read() emulation
    def read(self, size: int, offset: int):
        q = self.queue(CAP)
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
        q = self.queue(CAP)
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
