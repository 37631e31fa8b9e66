"""Sim frame channels: scaled NV12 outputs of the sim sensor/ISP.

A started channel is a listener of the sensor clock.  On each sensor tick it
decides (frame-rate decimation) whether the tick is one of its frames, asks
its sink for a buffer, renders the scene at its size straight into that
buffer, burns the OSD and completes it.  Encoded channels render into a
private NV12 buffer, run it through a software AVPU channel and write the
access unit into the sink's buffer.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..base import (ChannelMode, EncoderChannel, EncoderParams, FrameChannel,
                    FrameInfo, FrameSink, OutputTooSmall)
from .isp import Tuning
from .pattern import pattern

if TYPE_CHECKING:
    from .backend import SimBackend

log = logging.getLogger("impv4l2.sim.channel")

ROLE_SIZES = {
    "main": ((1920, 1080), (1280, 720), (960, 540), (640, 360)),
    "sub": ((640, 360), (320, 180)),
}
RATES = (30, 25, 20, 15, 10, 5)


class SimFrameChannel(FrameChannel):
    """One frame channel (``main`` or ``sub``) of the sim backend."""

    def __init__(self, backend: "SimBackend", index: int, role: str,
                 max_size: tuple[int, int]) -> None:
        self._backend = backend
        self.index = index
        self.role = role
        self.max_width, self.max_height = max_size
        sensor = backend.isp.sensor
        self._sizes = tuple(s for s in ROLE_SIZES[role]
                            if s[0] <= self.max_width and s[1] <= self.max_height) or (max_size,)
        self._rates = tuple(sorted({sensor.fps, *(r for r in RATES if r <= sensor.fps)}, reverse=True))
        self._mode = ChannelMode(*self._sizes[0], sensor.fps)
        self._lock = threading.RLock()  # held while delivering; stop() waits on it
        self._sink: FrameSink | None = None
        self._encoder: EncoderChannel | None = None
        self._scratch: np.ndarray | None = None
        self._first_frame = 0
        self._next_seq = 0

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
        return self._sink is not None

    def configure(self, mode: ChannelMode) -> None:
        if (mode.width, mode.height) not in self._sizes:
            raise ValueError(f"{self.role}: unsupported size {mode.width}x{mode.height}")
        if mode.fps not in self._rates:
            raise ValueError(f"{self.role}: unsupported rate {mode.fps}")
        with self._lock:
            if self._sink is not None:
                raise RuntimeError(f"{self.role}: configure while streaming")
            self._mode = mode

    # ---------------------------------------------------------------- streaming

    def start(self, sink: FrameSink) -> None:
        self._start(sink, None)

    def start_encoded(self, params: EncoderParams, sink: FrameSink) -> EncoderChannel:
        m = self._mode
        if (params.width, params.height, params.fps_num, params.fps_den) != (m.width, m.height, m.fps, 1):
            log.debug("%s: encoder params follow the channel mode %s", self.role, m)
            params = dataclasses.replace(params, width=m.width, height=m.height,
                                         fps_num=m.fps, fps_den=1)
        enc = self._backend.encoder.create_channel(params)
        self._start(sink, enc)
        return enc

    def _start(self, sink: FrameSink, encoder: EncoderChannel | None) -> None:
        clock = self._backend.clock
        with self._lock:
            if self._sink is not None:
                if encoder is not None:
                    encoder.close()
                raise RuntimeError(f"{self.role}: already streaming")
            m = self._mode
            pattern(m.width, m.height)  # build the base now rather than on the first tick
            self._scratch = np.empty(self.frame_bytes, np.uint8) if encoder else None
            self._encoder = encoder
            self._sink = sink
            self._first_frame = -1  # set on the first tick
            self._next_seq = 0
        clock.add(self._on_tick)

    def stop(self) -> None:
        self._backend.clock.remove(self._on_tick)
        with self._lock:  # waits for a delivery in progress
            enc, self._encoder = self._encoder, None
            self._sink = None
            self._scratch = None
        if enc is not None:
            enc.close()

    # ---------------------------------------------------------------- sensor thread

    def _on_tick(self, sensor_frame: int, timestamp_ns: int, tuning: Tuning) -> None:
        with self._lock:
            sink = self._sink
            if sink is None:
                return
            if self._first_frame < 0:
                self._first_frame = sensor_frame
            # decimation: channel frame k is the first sensor frame at or after k/fps
            rel = sensor_frame - self._first_frame
            seq = rel * self._mode.fps // self._backend.clock.fps
            if seq < self._next_seq:
                return
            self._next_seq = seq + 1
            buf = sink.get_buffer()
            if buf is None:
                return  # dropped: the sequence still advances
            if self._encoder is None:
                if memoryview(buf).nbytes < self.frame_bytes:
                    log.error("%s: sink buffer of %d bytes < frame of %d",
                              self.role, memoryview(buf).nbytes, self.frame_bytes)
                    sink.frame_done(buf, FrameInfo(timestamp_ns, seq, error=True))
                    return
                self._render(np.frombuffer(buf, np.uint8, self.frame_bytes), sensor_frame,
                             seq, timestamp_ns, tuning)
                sink.frame_done(buf, FrameInfo(timestamp_ns, seq, bytesused=self.frame_bytes))
                return
            self._render(self._scratch, sensor_frame, seq, timestamp_ns, tuning)
            used, keyframe, error = self._encode(buf, timestamp_ns)
            sink.frame_done(buf, FrameInfo(timestamp_ns, seq, error=error,
                                           bytesused=used, keyframe=keyframe))

    def _encode(self, buf: memoryview, timestamp_ns: int) -> tuple[int, bool, bool]:
        """Encode the scratch frame into ``buf``: (bytesused, keyframe, error)."""
        enc, frame = self._encoder, memoryview(self._scratch)
        out = memoryview(buf).cast("B")
        try:  # the sim AVPU writes the access unit straight into the buffer
            used, keyframe = enc.encode_into(frame, timestamp_ns, out)
            return used, keyframe, False
        except OutputTooSmall as e:
            log.warning("%s: %s", self.role, e)
            return 0, False, True

    def _render(self, frame: np.ndarray, sensor_frame: int, seq: int,
                timestamp_ns: int, tuning: Tuning) -> None:
        m = self._mode
        self._backend.scene.render(frame, m.width, m.height, sensor_frame, tuning)
        pattern(m.width, m.height).draw_osd(frame, seq, timestamp_ns)
