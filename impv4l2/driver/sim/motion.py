"""The sim's motion analysis (IMP IVS move interface) and light meter.

:class:`SimMotionSource` renders the scene, without OSD, at the sub channel's
smallest size on every sensor frame (as IVS reads FrameSource channel 1) and
compares each frame's luma with the previous one: a cell's activity is the per
mille of its pixels whose luma changed by at least ``PIXEL_DELTA``.  Whole-array
numpy work on a small picture; it runs after the channels' delivery of the same
frame (a late clock listener), so a consumer can match the report's timestamp to
the frame it just got.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..base import MOTION_ACTIVITY_MAX, LightMeter, MotionReport, MotionSource
from .isp import Tuning

if TYPE_CHECKING:
    from .backend import SimBackend

log = logging.getLogger("impv4l2.sim.motion")

GRID = (9, 16)  # rows, cols: 20x20-pixel cells at 320x180
PIXEL_DELTA = 16  # luma change that counts a pixel as moved (above sensor noise, codec ringing)
MAX_GAIN = 256.0


class SimMotionSource(MotionSource):
    """Frame differencing of the sub channel's picture over a GRID of cells."""

    def __init__(self, backend: "SimBackend", size: tuple[int, int]):
        self._backend = backend
        self.width, self.height = size
        self.rows, self.cols = GRID
        self._cell = (self.height // self.rows, self.width // self.cols)
        self._lock = threading.Lock()
        self._report: Callable[[MotionReport], None] | None = None
        self._frame = np.empty(self.width * self.height * 3 // 2, np.uint8)
        self._prev: np.ndarray | None = None

    def start(self, report: Callable[[MotionReport], None]) -> None:
        with self._lock:
            if self._report is not None:
                raise RuntimeError("motion source already started")
            self._report = report
            self._prev = None
        self._backend.clock.add(self._on_tick, late=True)
        log.debug("motion analysis on: %dx%d, %dx%d cells", self.width, self.height, self.rows, self.cols)

    def stop(self) -> None:
        self._backend.clock.remove(self._on_tick)
        with self._lock:  # waits for an analysis in progress
            self._report = None
            self._prev = None

    def _on_tick(self, sensor_frame: int, timestamp_ns: int, tuning: Tuning) -> None:
        with self._lock:
            report = self._report
            if report is None:
                return
            self._backend.scene.render(self._frame, self.width, self.height, sensor_frame, tuning)
            ch, cw = self._cell
            y = self._frame[: self.width * self.height].reshape(self.height, self.width)
            y = y[: self.rows * ch, : self.cols * cw].astype(np.int16)
            prev, self._prev = self._prev, y
            if prev is None:
                return
            moved = np.abs(y - prev) >= PIXEL_DELTA
            counts = moved.reshape(self.rows, ch, self.cols, cw).sum(axis=(1, 3))
            activity = (counts * MOTION_ACTIVITY_MAX // (ch * cw)).astype(np.uint16)
        report(MotionReport(timestamp_ns, activity))


class SimLightMeter(LightMeter):
    """The AE's total gain for the scene's light (1 / light, clamped to 1..MAX_GAIN)."""

    def __init__(self, backend: "SimBackend"):
        self._backend = backend

    def total_gain(self) -> float:
        light = getattr(self._backend.scene, "light", 1.0)
        return min(MAX_GAIN, max(1.0, 1.0 / max(light, 1.0 / MAX_GAIN)))
