"""Day/night switching: ISP running mode, IR-cut filter and IR LEDs, and the auto mode.

Backend-neutral: it drives the ISP's ``day_night`` control, two GPIO lines
through sysfs (``<root>/gpioN/value``; the root is configurable so tests use
a directory of their own) and reads a :class:`~impv4l2.driver.base.LightMeter`.

Order of the switch, as the vendor/thingino scripts do it: night = IR-cut
filter out, then IR LEDs on, then the ISP's night (monochrome) mode; day = the
reverse (ISP day mode, IR LEDs off, IR-cut filter in).

Auto: a thread samples the meter's total gain every ``interval_ms`` and
switches to night when it has been at or above ``night_gain`` for ``hold``
samples in a row, back to day at or below ``day_gain`` (< night_gain) likewise;
between the two nothing changes, so a scene near one threshold cannot flap.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Callable

from .base import Isp, LightMeter

log = logging.getLogger("impv4l2.daynight")

MODES = ("day", "night", "auto")
DAY, NIGHT, AUTO = range(3)


@dataclasses.dataclass(frozen=True)
class DayNightParams:
    """What [daynight] configures (impv4l2.config.DayNightConfig has the same fields)."""

    ircut_gpio: int = -1  # -1: none
    irled_gpio: int = -1
    ircut_day: int = 1  # line value with the IR-cut filter in (day)
    irled_on: int = 1  # line value with the IR LEDs lit
    gpio_root: str = "/sys/class/gpio"
    night_gain: float = 8.0
    day_gain: float = 2.0
    interval_ms: int = 1000
    hold: int = 3
    mode: str = "day"  # initial mode

    @classmethod
    def of(cls, cfg) -> "DayNightParams":
        """From a config object with (some of) these attributes; None: defaults."""
        if cfg is None:
            return cls()
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})


class SysfsGpio:
    """One output line through /sys/class/gpio (exported on first use)."""

    def __init__(self, root: str, number: int, label: str):
        self.root, self.number, self.label = root, number, label
        self._ready = False

    def set(self, value: int) -> bool:
        """Drive the line; False (and a warning) when sysfs refuses."""
        line = os.path.join(self.root, f"gpio{self.number}")
        try:
            if not self._ready:
                if not os.path.isdir(line):
                    with open(os.path.join(self.root, "export"), "w") as f:
                        f.write(str(self.number))
                with open(os.path.join(line, "direction"), "w") as f:
                    f.write("out")
                self._ready = True
            with open(os.path.join(line, "value"), "w") as f:
                f.write("1" if value else "0")
        except OSError as e:
            log.warning("gpio %d (%s): %s", self.number, self.label, e)
            return False
        log.info("gpio %d (%s) = %d", self.number, self.label, 1 if value else 0)
        return True


class DayNight:
    """The day/night state machine of one camera.

    ``on_switch(night)`` is called after every change of the picture's state
    (from the caller's thread for day/night, from the auto thread in auto mode).
    """

    def __init__(self, isp: Isp, meter: LightMeter | None, params: DayNightParams,
                 on_switch: Callable[[bool], None] = lambda night: None):
        if params.day_gain >= params.night_gain:
            raise ValueError(f"day_gain {params.day_gain} must be below night_gain {params.night_gain}")
        self.isp, self.meter, self.params = isp, meter, params
        self.on_switch = on_switch
        self.ircut = SysfsGpio(params.gpio_root, params.ircut_gpio, "ircut") if params.ircut_gpio >= 0 else None
        self.irled = SysfsGpio(params.gpio_root, params.irled_gpio, "irled") if params.irled_gpio >= 0 else None
        self._lock = threading.Lock()
        self.mode = DAY
        self.night = bool(isp.get("day_night"))
        self._streak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_mode(self, mode: int) -> None:
        """Day, night or auto (an index of MODES)."""
        if mode not in (DAY, NIGHT, AUTO):
            raise ValueError(f"day/night mode {mode}")
        if mode == AUTO and self.meter is None:
            raise ValueError("no light meter: auto day/night unavailable")
        with self._lock:
            self.mode = mode
            self._streak = 0
        if mode == AUTO:
            self._start_thread()
            self.sample()  # decide from the current light without waiting an interval
        else:
            self._stop_thread()
            self._switch(mode == NIGHT)

    def sample(self) -> None:
        """One auto decision from the meter (the auto thread calls this every interval)."""
        with self._lock:
            if self.mode != AUTO or self.meter is None:
                return
            gain = self.meter.total_gain()
            p = self.params
            beyond = gain <= p.day_gain if self.night else gain >= p.night_gain
            self._streak = self._streak + 1 if beyond else 0
            flip = self._streak >= p.hold
            if flip:
                self._streak = 0
        if flip:
            log.info("day/night auto: total gain %.1f -> %s", gain, "day" if self.night else "night")
            self._switch(not self.night)

    def _switch(self, night: bool) -> None:
        with self._lock:
            if night == self.night and self._applied:
                return
            p = self.params
            if night:
                if self.ircut:
                    self.ircut.set(1 - p.ircut_day)
                if self.irled:
                    self.irled.set(p.irled_on)
                self.isp.set("day_night", 1)
            else:
                self.isp.set("day_night", 0)
                if self.irled:
                    self.irled.set(1 - p.irled_on)
                if self.ircut:
                    self.ircut.set(p.ircut_day)
            changed = night != self.night
            self.night = night
            self._applied = True
        if changed:
            self.on_switch(night)

    _applied = False  # lines driven once (the first switch drives them even without a change)

    def _start_thread(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="impv4l2-daynight", daemon=True)
        self._thread.start()

    def _stop_thread(self) -> None:
        t, self._thread = self._thread, None
        if t is not None:
            self._stop.set()
            if t is not threading.current_thread():
                t.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.params.interval_ms / 1000):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - the auto thread must survive a bad readout
                log.exception("day/night auto sample failed")

    def close(self) -> None:
        self._stop_thread()
