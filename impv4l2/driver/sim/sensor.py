"""The sim sensor: a frame clock thread and the scenes it captures.

One thread paces the whole sensor with absolute deadlines on
CLOCK_MONOTONIC (``time.monotonic_ns``): frame *n* is due at
``t0 + n * period``; a late wake-up never shifts later frames, and when the
thread falls more than a frame behind the missed frames are skipped (their
numbers are consumed, so consumers see sequence gaps, as with a real sensor
whose ISP overran).  Each tick hands (frame number, timestamp, tuning) to
every started channel, which renders its own size from the scene.

Scenes:

- :class:`SyntheticScene` — the precomputed test pattern (per size, tuned
  once per tuning change), a sliding box, flicker bands;
- :class:`FileScene` — a video or image file decoded with PyAV, looped, and
  scaled per channel with swscale (``VideoReformatter``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Callable, Protocol

import numpy as np

from .isp import Tuning
from .pattern import BOX_YUV, pattern

log = logging.getLogger("impv4l2.sim.sensor")


class Scene(Protocol):
    """What the sensor sees; renders the ISP output for one channel size."""

    def begin_frame(self, sensor_frame: int) -> None: ...

    def render(self, frame: np.ndarray, width: int, height: int,
               sensor_frame: int, tuning: Tuning) -> None:
        """Fill the flat NV12 ``frame`` (tuning applied, OSD not drawn)."""

    def close(self) -> None: ...


class SyntheticScene:
    """Colour bars + ramp + sliding box; per frame one copy and small draws.

    ``moving``: the box slides (default) or stands where it is; ``light``: the
    scene's illumination, 1.0 = well lit, lower darkens the picture (what the
    sim's light meter reports for day/night).  Both may change at any time."""

    def __init__(self, fps: int, moving: bool = True, light: float = 1.0) -> None:
        self.fps = fps
        self._tuned: dict[tuple[int, int], tuple[tuple[int, float], np.ndarray]] = {}
        self.light = light
        self._moving = moving
        self._frozen_at = 0  # sensor frame the box stands at while not moving
        self._offset = 0  # box phase: sensor frames spent standing still
        self._last_frame = 0

    @property
    def moving(self) -> bool:
        return self._moving

    def set_moving(self, moving: bool) -> None:
        """Start or stop the box; it resumes from where it stood."""
        if moving == self._moving:
            return
        if moving:
            self._offset += self._last_frame - self._frozen_at
        else:
            self._frozen_at = self._last_frame
        self._moving = moving

    def box_frame(self, sensor_frame: int) -> int:
        """The frame number that places the box (constant while it stands)."""
        return (sensor_frame - self._offset) if self._moving else (self._frozen_at - self._offset)

    def prepare(self, width: int, height: int, tuning: Tuning) -> np.ndarray:
        """The tuned static base for a size (built on first use, then cached)."""
        key = (tuning.version, self.light)
        cached = self._tuned.get((width, height))
        if cached is not None and cached[0] == key:
            return cached[1]
        base = pattern(width, height).base
        if not tuning.neutral:
            base = base.copy()
            tuning.apply(base, width, height)
        if key[1] < 1.0:
            base = base.copy()
            y = base[: width * height]
            np.take(_dim_lut(key[1]), y, out=y)
        self._tuned[(width, height)] = (key, base)
        return base

    def begin_frame(self, sensor_frame: int) -> None:
        self._last_frame = sensor_frame

    def render(self, frame: np.ndarray, width: int, height: int,
               sensor_frame: int, tuning: Tuning) -> None:
        pat = pattern(width, height)
        np.copyto(frame, self.prepare(width, height, tuning))
        rect = pat.box_rect(self.box_frame(sensor_frame), self.fps, tuning.hflip, tuning.vflip)
        y, u, v = tuning.colour(BOX_YUV)
        if self.light < 1.0:
            y = int(_dim_lut(self.light)[y])
        pat.draw_box(frame, rect, (y, u, v))
        if tuning.band_lut is not None:
            tuning.band(frame[: width * height].reshape(height, width), sensor_frame)

    def close(self) -> None:
        self._tuned.clear()


@functools.lru_cache(maxsize=8)
def _dim_lut(light: float) -> np.ndarray:
    """Luma under ``light`` (0..1) of the reference illumination (limited range)."""
    x = 16 + (np.arange(256) - 16) * max(0.0, light)
    return np.clip(x, 0, 255).round().astype(np.uint8)


class FileScene:
    """A video/image file as the sensor input: decoded, looped, scaled by swscale."""

    def __init__(self, path: str) -> None:
        import av  # noqa: PLC0415 (only this mode needs PyAV)
        from av.video.reformatter import VideoReformatter  # noqa: PLC0415

        self._av = av
        self._reformatter_cls = VideoReformatter
        self.path = path
        self._container = av.open(path)
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        self._frames = self._container.decode(self._stream)
        self._frame = None
        self._decoded = 0
        self._still = False
        self._scalers: dict[tuple[int, int], object] = {}
        self.begin_frame(0)  # fail early on an undecodable file
        if self._frame is None:
            raise ValueError(f"{path}: no video frames")

    def begin_frame(self, sensor_frame: int) -> None:
        if self._still:
            return
        try:
            self._frame = next(self._frames)
            self._decoded += 1
        except StopIteration:
            if self._decoded <= 1:  # a single picture: keep showing it
                self._still = True
                return
            self._container.seek(0)
            self._frames = self._container.decode(self._stream)
            self._decoded = 0
            self.begin_frame(sensor_frame)

    def render(self, frame: np.ndarray, width: int, height: int,
               sensor_frame: int, tuning: Tuning) -> None:
        scaler = self._scalers.get((width, height))
        if scaler is None:
            scaler = self._scalers[(width, height)] = self._reformatter_cls()
        out = scaler.reformat(self._frame, width=width, height=height, format="nv12")
        n = width * height
        for plane, dst, rows in ((out.planes[0], frame[:n], height),
                                 (out.planes[1], frame[n: n * 3 // 2], height // 2)):
            src = np.frombuffer(plane, np.uint8).reshape(rows, plane.line_size)[:, :width]
            np.copyto(dst.reshape(rows, width), src)
        tuning.apply(frame, width, height)
        tuning.band(frame[:n].reshape(height, width), sensor_frame)

    def close(self) -> None:
        self._container.close()


class SensorClock:
    """The sensor's frame thread: ticks at ``fps`` while anyone listens."""

    def __init__(self, fps: int, scene: Scene, tuning: Callable[[], Tuning]) -> None:
        self.fps = fps
        self.period_ns = 1_000_000_000 // fps
        self.scene = scene
        self._tuning = tuning
        self._listeners: list[Callable[[int, int, Tuning], None]] = []
        self._late: set[Callable[[int, int, Tuning], None]] = set()
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._closed = False
        self.frame = 0  # next sensor frame number
        self.skipped = 0  # frames lost to overruns
        self._thread = threading.Thread(target=self._run, name="impv4l2-sim-sensor", daemon=True)
        self._thread.start()

    def add(self, listener: Callable[[int, int, Tuning], None], late: bool = False) -> None:
        """Call ``listener`` every tick; ``late`` ones (analysis) run after every channel's
        delivery of the same frame."""
        with self._cond:
            if late:
                self._late.add(listener)
                self._listeners.append(listener)
            else:
                i = next((k for k, f in enumerate(self._listeners) if f in self._late), len(self._listeners))
                self._listeners.insert(i, listener)
            self._cond.notify_all()

    def remove(self, listener: Callable[[int, int, Tuning], None]) -> None:
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)
            self._late.discard(listener)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._listeners and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            deadline = time.monotonic_ns()
            while True:
                with self._cond:
                    listeners = list(self._listeners)
                    closed = self._closed
                if closed or not listeners:
                    break
                now = time.monotonic_ns()
                if now < deadline:
                    self._wake.wait((deadline - now) / 1e9)
                    continue
                late = (now - deadline) // self.period_ns
                if late:  # overran: skip the frames whose time has passed
                    self.frame += late
                    self.skipped += late
                    deadline += late * self.period_ns
                self._tick(listeners, deadline)  # capture time = the frame's due time
                self.frame += 1
                deadline += self.period_ns

    def _tick(self, listeners: list, timestamp_ns: int) -> None:
        n = self.frame
        try:
            tuning = self._tuning()
            self.scene.begin_frame(n)
        except Exception:  # noqa: BLE001 - the sensor thread must survive
            log.exception("sensor frame %d failed", n)
            return
        for listener in listeners:
            try:
                listener(n, timestamp_ns, tuning)
            except Exception:  # noqa: BLE001
                log.exception("channel delivery of sensor frame %d failed", n)
