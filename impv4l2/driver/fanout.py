"""Fan-out: one backend frame channel serving several consumers at once.

A backend channel has at most one raw consumer and one encoded stream per codec
(:class:`~impv4l2.driver.base.FrameChannel`), as the T31 has one FrameSource
channel and one encoder channel per stream in its group.  A :class:`ChannelHub`
shares them: every consumer (a node, or one reader of a shared node) gets a
:class:`ChannelPort`, a FrameChannel of its own; the hub starts the backend's
raw capture or encoded stream for the first consumer and stops it after the
last, and hands each frame to every consumer through a :class:`Fanout` sink.

What a frame costs per consumer (the choice, measured by benchmarks/bench_fanout.py):

* raw: the frame is rendered (sim) or copied out of the FrameSource (t31) once,
  into the first consumer's buffer; every further consumer gets one memcpy of it
  into its own buffer (a buffer is a client's own memory: sharing one page
  between clients would let one see another's next frame being written);
* compressed: one encoder channel per (format, size); the access unit is written
  into the first consumer's buffer by the encoder and copied into the others'
  (an AU is small: 1-100 KiB).  A consumer joining a running H.264/H.265 stream,
  or one that had no buffer free for an AU, gets nothing until the next IDR (with
  its SPS/PPS/VPS; the AVPU repeats them before every IDR) and an IDR is requested
  for it, so its stream always decodes.

The hub knows nothing of V4L2; the sizes of all consumers are the channel's mode,
set by the first one (a port that asks for another mode while the channel runs
gets RuntimeError, which the device model answers with EBUSY).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from typing import Sequence

from .base import (ChannelMode, Codec, EncodedFrame, EncoderChannel, EncoderParams, FrameBuffer,
                   FrameChannel, FrameInfo, MemberSink)

log = logging.getLogger("impv4l2.fanout")

# Codecs whose access units depend on earlier ones: a consumer starts (and resumes) at an IDR.
INTER_CODECS = frozenset({Codec.H264, Codec.HEVC})


@dataclasses.dataclass(eq=False)
class _Member:
    port: "ChannelPort"
    sink: MemberSink
    # The producer's sequence number its own count starts from (vb2: every stream counts from
    # 0); None: from its first frame (a new stream on a channel that already runs).
    base: int | None = 0
    waiting_key: bool = False  # nothing but a key frame until it comes


class Fanout:
    """The FrameSink a backend delivers one consumer's frames into: it lends the producer
    the first member's buffer, and at frame_done copies the frame into the buffers the
    other members lent, then completes each (or cancels it for a member waiting for a
    key frame)."""

    def __init__(self, label: str, inter: bool = False):
        self.label = label
        self.inter = inter  # compressed with inter prediction: members join at key frames
        self.members: list[_Member] = []
        self.encoder: EncoderChannel | None = None  # the shared encoder channel, if compressed
        self.frames = 0  # frames the producer completed
        self.copies = 0  # frame copies made for members beyond the first
        self._idr_asked = False  # an IDR was requested and has not come yet: ask no more
        self._lock = threading.Lock()

    def add(self, member: _Member) -> None:
        with self._lock:
            self.members.append(member)

    def has(self, port: "ChannelPort") -> bool:
        return any(m.port is port for m in self.members)

    def remove(self, port: "ChannelPort") -> None:
        with self._lock:
            self.members = [m for m in self.members if m.port is not port]

    # ---------------------------------------------------------------- FrameSink (backend thread)

    def get_buffer(self) -> FrameBuffer | None:
        with self._lock:
            members = list(self.members)
        lent = [(m, m.sink.get_buffer()) for m in members]
        got = [(m, b) for m, b in lent if b is not None]
        if not got:
            return None  # nobody has a buffer: the producer drops the frame for all
        if self.inter:
            missed = [m for m, b in lent if b is None and not m.waiting_key]
            for m in missed:  # the AU goes to the others: this member's stream breaks here
                m.waiting_key = True
            if missed:
                log.debug("%s: %d consumer(s) without a buffer wait for the next IDR", self.label, len(missed))
            # A member waiting with a buffer at hand (it may have missed the IDR asked for it,
            # having no buffer then) needs one now, not at the end of the GOP.
            if missed or any(m.waiting_key for m, _b in got):
                self.request_idr()
        first = got[0][1]
        return FrameBuffer(first.view, first.index, token=got)

    def frame_done(self, buf: FrameBuffer, info: FrameInfo) -> None:
        got: list[tuple[_Member, FrameBuffer]] = buf.token
        self.frames += 1
        if info.keyframe:
            self._idr_asked = False
        src, n = got[0][1].view, info.bytesused
        deliver, cancel = [], []
        for i, (m, b) in enumerate(got):
            if m.waiting_key:
                if info.error or not info.keyframe:
                    cancel.append((m, b))  # stays queued for this member's first key frame
                    continue
                m.waiting_key = False
            if m.base is None:
                m.base = info.sequence
            mine = dataclasses.replace(info, sequence=info.sequence - m.base) if m.base else info
            if i and n and not info.error:
                if b.view.nbytes < n:
                    mine = dataclasses.replace(mine, error=True, bytesused=0)
                else:
                    b.view[:n] = src[:n]  # the one copy per extra member (memcpy)
                    self.copies += 1
            deliver.append((m, b, mine))
        for m, b, mine in deliver:  # after every copy: the first buffer is the source
            b.sequence = mine.sequence
            m.sink.frame_done(b, mine)
        for m, b in cancel:
            m.sink.cancel(b)

    def cancel(self, buf: FrameBuffer) -> None:
        for m, b in buf.token:
            m.sink.cancel(b)

    def request_idr(self, force: bool = False) -> None:
        """Ask the encoder for an IDR, once until it comes (a slow client missing several
        AUs in a row must not make every frame an IDR for all); ``force``: a control's."""
        if self.encoder is not None and (force or not self._idr_asked):
            self._idr_asked = True
            self.encoder.request_idr()


class _SharedEncoder(EncoderChannel):
    """A port's view of a shared encoder channel: controls reach the one channel (the
    last change wins, as on an IMP channel shared by two streams); close() leaves it."""

    def __init__(self, port: "ChannelPort", fan: Fanout):
        self._port, self._fan = port, fan

    @property
    def params(self) -> EncoderParams:  # type: ignore[override]
        return self._fan.encoder.params  # the channel's, as changes reach it

    def encode(self, nv12: memoryview, timestamp_ns: int) -> EncodedFrame:
        raise RuntimeError("a bound encoder channel takes its frames from the frame channel")

    def request_idr(self) -> None:
        self._fan.request_idr(force=True)

    def update(self, **changes) -> None:
        self._fan.encoder.update(**changes)

    def close(self) -> None:
        self._port.hub.leave_encoded(self._port, self._fan.encoder.params.codec)


class ChannelHub:
    """The consumers of one backend frame channel (see the module doc)."""

    def __init__(self, channel: FrameChannel):
        self.channel = channel
        self._lock = threading.RLock()
        self._raw: Fanout | None = None
        self._streams: dict[Codec, Fanout] = {}
        self.encoders_opened = 0  # encoder channels started on the backend, ever

    def port(self) -> "ChannelPort":
        return ChannelPort(self)

    @property
    def busy(self) -> bool:
        return self._raw is not None or bool(self._streams)

    @property
    def encoders(self) -> dict[Codec, int]:
        """Running encoder channels: codec -> number of consumers."""
        with self._lock:
            return {c: len(f.members) for c, f in self._streams.items()}

    def consumers(self) -> int:
        with self._lock:
            return sum(len(f.members) for f in [*self._streams.values(), *filter(None, [self._raw])])

    def configure(self, mode: ChannelMode) -> None:
        with self._lock:
            if self.busy:
                if mode != self.channel.mode:
                    m = self.channel.mode
                    raise RuntimeError(f"{self.channel.role}: in use at {m.width}x{m.height}@{m.fps}"
                                       " by another consumer")
                return
            self.channel.configure(mode)

    def _member(self, fan: Fanout | None, port: "ChannelPort", sink: MemberSink,
                waiting_key: bool = False) -> _Member:
        """A new consumer of ``fan`` (None: of a new one), lock held.  Its sequence numbers
        count from 0: as the producer's when it starts the channel, else from its first frame."""
        base = 0 if fan is None and not self.busy else None
        return _Member(port, sink, base=base, waiting_key=waiting_key)

    def join_raw(self, port: "ChannelPort", sink: MemberSink) -> None:
        with self._lock:
            fan = self._raw
            if fan is not None:
                if any(m.port is port for m in fan.members):
                    raise RuntimeError(f"{self.channel.role}: raw capture already started")
                fan.add(self._member(fan, port, sink))
                return
            fan = Fanout(f"{self.channel.role} raw")
            fan.add(self._member(None, port, sink))
            self.channel.start(fan)
            self._raw = fan

    def join_encoded(self, port: "ChannelPort", params: EncoderParams, sink: MemberSink) -> EncoderChannel:
        codec = params.codec
        with self._lock:
            fan = self._streams.get(codec)
            if fan is None:
                fan = Fanout(f"{self.channel.role} {codec.value}", inter=codec in INTER_CODECS)
                fan.add(self._member(None, port, sink))
                fan.encoder = self.channel.start_encoded(params, fan)
                self._streams[codec] = fan
                self.encoders_opened += 1
            elif any(m.port is port for m in fan.members):
                raise RuntimeError(f"{self.channel.role}: {codec.value} stream already started")
            else:
                # Joining a running stream: from its next IDR, asked for now.
                fan.add(self._member(fan, port, sink, waiting_key=fan.inter))
                log.info("%s: another consumer joins the running %s stream (%d now)%s",
                         self.channel.role, codec.value, len(fan.members),
                         ", from the next IDR" if fan.inter else "")
                if fan.inter:
                    fan.request_idr()
            return _SharedEncoder(port, fan)

    # The last consumer stops the producer before it leaves: a producer that found no
    # consumer meanwhile would take it for a client without a buffer (t31: an IDR request).
    def leave_raw(self, port: "ChannelPort") -> None:
        with self._lock:
            fan = self._raw
            if fan is None or not fan.has(port):
                return
            if len(fan.members) == 1:
                self._raw = None
                self.channel.stop_raw()
            fan.remove(port)

    def leave_encoded(self, port: "ChannelPort", codec: Codec) -> None:
        with self._lock:
            fan = self._streams.get(codec)
            if fan is None or not fan.has(port):
                return
            if len(fan.members) == 1:
                del self._streams[codec]
                fan.encoder.close()
            fan.remove(port)

    def leave(self, port: "ChannelPort") -> None:
        with self._lock:
            self.leave_raw(port)
            for codec in list(self._streams):
                self.leave_encoded(port, codec)


class ChannelPort(FrameChannel):
    """One consumer's FrameChannel on a shared channel (:class:`ChannelHub`)."""

    def __init__(self, hub: ChannelHub):
        self.hub = hub
        ch = hub.channel
        self.index, self.role = ch.index, ch.role
        self.max_width, self.max_height = ch.max_width, ch.max_height

    def sizes(self) -> Sequence[tuple[int, int]]:
        return self.hub.channel.sizes()

    def frame_rates(self) -> Sequence[int]:
        return self.hub.channel.frame_rates()

    @property
    def mode(self) -> ChannelMode:
        return self.hub.channel.mode

    def configure(self, mode: ChannelMode) -> None:
        self.hub.configure(mode)

    def start(self, sink: MemberSink) -> None:
        self.hub.join_raw(self, sink)

    def start_encoded(self, params: EncoderParams, sink: MemberSink) -> EncoderChannel:
        return self.hub.join_encoded(self, params, sink)

    def stop_raw(self) -> None:
        self.hub.leave_raw(self)

    def stop(self) -> None:
        self.hub.leave(self)


_hubs: "weakref.WeakKeyDictionary[FrameChannel, ChannelHub]" = weakref.WeakKeyDictionary()
_hubs_lock = threading.Lock()


def hub_of(channel: FrameChannel) -> ChannelHub:
    """The one hub of a backend channel: every consumer of it goes through the same hub."""
    if isinstance(channel, ChannelPort):
        return channel.hub
    with _hubs_lock:
        hub = _hubs.get(channel)
        if hub is None:
            hub = _hubs[channel] = ChannelHub(channel)
        return hub
