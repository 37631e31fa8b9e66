"""Sim frame channels: scaled NV12 outputs of the sim sensor/ISP.

A started channel is a listener of the sensor clock.  On each sensor tick it
decides (frame-rate decimation) whether the tick is one of its frames and
renders the scene at its size ONCE: straight into the raw consumer's buffer
when it has one, else into a private NV12 buffer.  Every encoded stream (one
software AVPU channel per codec, as the T31 binds one encoder channel per
stream to a FrameSource) encodes that same picture into its sink's buffer;
the raw frame is completed last, so no client can touch the picture while an
encoder still reads it.

The channel needs the sensor clock, the scene, the sensor's description and a
way to make AVPU channels, not the backend (:class:`SimFrameChannel` args).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable, Sequence

import numpy as np

from ..base import (ChannelMode, Codec, EncoderChannel, EncoderParams, FrameBuffer, FrameChannel,
                    FrameInfo, FrameSink, OutputTooSmall, SensorInfo)
from .isp import Tuning
from .pattern import pattern
from .sensor import Scene, SensorClock

log = logging.getLogger("impv4l2.sim.channel")

ROLE_SIZES = {
    "main": ((1920, 1080), (1280, 720), (960, 540), (640, 360)),
    "sub": ((640, 360), (320, 180)),
}
RATES = (30, 25, 20, 15, 10, 5)

EncoderFactory = Callable[[EncoderParams], EncoderChannel]


@dataclasses.dataclass
class _Stream:
    """One encoded consumer: its AVPU channel and where its access units go."""

    encoder: EncoderChannel
    sink: FrameSink


class _BoundEncoder(EncoderChannel):
    """The EncoderChannel handed to the caller of start_encoded: the AVPU channel, whose
    close() also unbinds it from the frame channel (as IMP's UnBind + DestroyChn)."""

    def __init__(self, channel: "SimFrameChannel", encoder: EncoderChannel):
        self._channel, self._encoder = channel, encoder
        self._codec = encoder.params.codec

    @property
    def params(self) -> EncoderParams:  # type: ignore[override]
        return self._encoder.params  # the AVPU channel's, as changes reach it

    def encode(self, nv12, timestamp_ns):
        return self._encoder.encode(nv12, timestamp_ns)

    def encode_into(self, nv12, timestamp_ns, out):
        return self._encoder.encode_into(nv12, timestamp_ns, out)

    def request_idr(self) -> None:
        self._encoder.request_idr()

    def update(self, **changes) -> None:
        self._encoder.update(**changes)

    def close(self) -> None:
        self._channel.stop_encoded(self._codec)

    def __getattr__(self, name: str):  # the AVPU channel's own attributes (counters, state)
        return getattr(self._encoder, name)


class SimFrameChannel(FrameChannel):
    """One frame channel (``main`` or ``sub``) of the sim backend."""

    def __init__(self, index: int, role: str, max_size: tuple[int, int], *,
                 clock: SensorClock, scene: Callable[[], Scene], sensor: SensorInfo,
                 encoders: EncoderFactory) -> None:
        """``scene``: the scene now (the backend may swap it); ``encoders`` makes one AVPU
        channel for the given parameters."""
        self._clock, self._scene, self._new_encoder = clock, scene, encoders
        self.index = index
        self.role = role
        self.max_width, self.max_height = max_size
        self._sizes = tuple(s for s in ROLE_SIZES[role]
                            if s[0] <= self.max_width and s[1] <= self.max_height) or (max_size,)
        self._rates = tuple(sorted({sensor.fps, *(r for r in RATES if r <= sensor.fps)}, reverse=True))
        self._mode = ChannelMode(*self._sizes[0], sensor.fps)
        self._lock = threading.RLock()  # held while delivering; stop() waits on it
        self._raw: FrameSink | None = None
        self._streams: dict[Codec, _Stream] = {}
        self._scratch: np.ndarray | None = None
        self._ticking = False
        self._first_frame = 0
        self._next_seq = 0
        # channel frames that came due, and pictures rendered for them: one render per frame
        # however many consumers (what tests and benchmarks/bench_fanout.py check)
        self.frames_due = 0
        self.renders = 0

    # ---------------------------------------------------------------- modes

    def sizes(self) -> Sequence[tuple[int, int]]:
        return self._sizes

    def frame_rates(self) -> Sequence[int]:
        return self._rates

    @property
    def mode(self) -> ChannelMode:
        return self._mode

    @property
    def frame_bytes(self) -> int:
        return self._mode.width * self._mode.height * 3 // 2

    @property
    def streaming(self) -> bool:
        return self._raw is not None or bool(self._streams)

    def configure(self, mode: ChannelMode) -> None:
        if (mode.width, mode.height) not in self._sizes:
            raise ValueError(f"{self.role}: unsupported size {mode.width}x{mode.height}")
        if mode.fps not in self._rates:
            raise ValueError(f"{self.role}: unsupported rate {mode.fps}")
        with self._lock:
            if self.streaming:
                raise RuntimeError(f"{self.role}: configure while streaming")
            self._mode = mode

    # ---------------------------------------------------------------- streaming

    def start(self, sink: FrameSink) -> None:
        with self._lock:
            if self._raw is not None:
                raise RuntimeError(f"{self.role}: raw capture already started")
            self._raw = sink
            self._begin()

    def start_encoded(self, params: EncoderParams, sink: FrameSink) -> EncoderChannel:
        m = self._mode
        if (params.width, params.height, params.fps_num, params.fps_den) != (m.width, m.height, m.fps, 1):
            log.debug("%s: encoder params follow the channel mode %s", self.role, m)
            params = dataclasses.replace(params, width=m.width, height=m.height,
                                         fps_num=m.fps, fps_den=1)
        with self._lock:
            if params.codec in self._streams:
                raise RuntimeError(f"{self.role}: {params.codec.value} stream already started")
            enc = self._new_encoder(params)
            self._streams[params.codec] = _Stream(enc, sink)
            self._begin()
        return _BoundEncoder(self, enc)

    def _begin(self) -> None:
        """A consumer was added (lock held): start ticking if this is the first."""
        if self._ticking:
            return
        m = self._mode
        pattern(m.width, m.height)  # build the base now rather than on the first tick
        self._first_frame = -1  # set on the first tick
        self._next_seq = 0
        self._ticking = True
        self._clock.add(self._on_tick)

    def stop_encoded(self, codec: Codec) -> None:
        with self._lock:  # waits for a delivery in progress
            stream = self._streams.pop(codec, None)
            self._end_if_idle()
        if stream is not None:
            stream.encoder.close()

    def stop_raw(self) -> None:
        with self._lock:
            self._raw = None
            self._end_if_idle()

    def stop(self) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            self._raw = None
            self._end_if_idle()
        for s in streams:
            s.encoder.close()

    def _end_if_idle(self) -> None:
        if self.streaming or not self._ticking:
            return
        self._ticking = False
        self._clock.remove(self._on_tick)
        self._scratch = None

    # ---------------------------------------------------------------- sensor thread

    def _on_tick(self, sensor_frame: int, timestamp_ns: int, tuning: Tuning) -> None:
        with self._lock:
            if not self.streaming:
                return
            if self._first_frame < 0:
                self._first_frame = sensor_frame
            # decimation: channel frame k is the first sensor frame at or after k/fps
            rel = sensor_frame - self._first_frame
            seq = rel * self._mode.fps // self._clock.fps
            if seq < self._next_seq:
                return
            self._next_seq = seq + 1
            self.frames_due += 1
            raw = self._raw.get_buffer() if self._raw is not None else None
            if raw is not None and raw.view.nbytes < self.frame_bytes:
                log.error("%s: sink buffer of %d bytes < frame of %d",
                          self.role, raw.view.nbytes, self.frame_bytes)
                self._raw.frame_done(raw, FrameInfo(timestamp_ns, seq, error=True))
                raw = None
            coded = [(s, s.sink.get_buffer()) for s in self._streams.values()]
            coded = [(s, b) for s, b in coded if b is not None]
            if raw is None and not coded:
                return  # dropped by everyone: the sequence still advances
            # The one render of this frame: into the raw client's buffer, else the scratch.
            if raw is not None:
                frame = np.frombuffer(raw.view, np.uint8, self.frame_bytes)
            else:
                if self._scratch is None:
                    self._scratch = np.empty(self.frame_bytes, np.uint8)
                frame = self._scratch
            self._render(frame, sensor_frame, seq, timestamp_ns, tuning)
            for stream, buf in coded:
                used, keyframe, error = self._encode(stream.encoder, frame, buf, timestamp_ns)
                stream.sink.frame_done(buf, FrameInfo(timestamp_ns, seq, error=error,
                                                      bytesused=used, keyframe=keyframe))
            if raw is not None:
                self._raw.frame_done(raw, FrameInfo(timestamp_ns, seq, bytesused=self.frame_bytes))

    def _encode(self, enc: EncoderChannel, frame: np.ndarray, buf: FrameBuffer,
                timestamp_ns: int) -> tuple[int, bool, bool]:
        """Encode ``frame`` into ``buf``: (bytesused, keyframe, error)."""
        out = memoryview(buf.view).cast("B")
        try:  # the sim AVPU writes the access unit straight into the buffer
            used, keyframe = enc.encode_into(memoryview(frame), timestamp_ns, out)
            return used, keyframe, False
        except OutputTooSmall as e:
            log.warning("%s: %s", self.role, e)
            return 0, False, True

    def _render(self, frame: np.ndarray, sensor_frame: int, seq: int,
                timestamp_ns: int, tuning: Tuning) -> None:
        m = self._mode
        self._scene().render(frame, m.width, m.height, sensor_frame, tuning)
        pattern(m.width, m.height).draw_osd(frame, seq, timestamp_ns)
        self.renders += 1
