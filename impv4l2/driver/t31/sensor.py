"""Which sensor to add: /proc/jz/sensor (thingino's sensor-info), configuration overriding."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from .libimp import T31Error

log = logging.getLogger("impv4l2.t31")

__all__ = ["PROC_SENSOR", "PROC_SENSOR_FILES", "SENSOR_REQUIRED", "SensorSetup", "read_proc_sensor",
           "sensor_setup"]

# The sensor as the kernel's sensor module reports it (thingino's sensor-info: one file per
# value under /proc/jz/sensor/, i2c_addr in hex as "0x37"; read as prudynt's ProcfsSensor):
# (file, backend option it fills, parser).  i2c_bus is optional (prudynt reads it if present).
PROC_SENSOR = "/proc/jz/sensor"
PROC_SENSOR_FILES: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("name", "sensor", str),
    ("i2c_addr", "i2c_addr", lambda v: int(v, 16)),
    ("width", "sensor_width", int),
    ("height", "sensor_height", int),
    ("max_fps", "max_fps", int),
    ("i2c_bus", "i2c_adapter", int),
)
# What AddSensor needs; without /proc/jz/sensor the configuration must give all of it.
SENSOR_REQUIRED = ("sensor", "i2c_addr", "sensor_width", "sensor_height")


@dataclasses.dataclass(frozen=True)
class SensorSetup:
    """The sensor to add: /proc/jz/sensor, configuration overriding it field by field."""

    name: str
    i2c_addr: int
    i2c_adapter: int
    width: int
    height: int
    max_fps: int | None
    source: str  # where it came from, for the start log line


def read_proc_sensor(root: str | Path) -> dict[str, Any] | None:
    """The PROC_SENSOR_FILES values under ``root`` (None: no such directory)."""
    d = Path(root)
    if not d.is_dir():
        return None
    out: dict[str, Any] = {}
    for fname, key, parse in PROC_SENSOR_FILES:
        try:
            text = (d / fname).read_text().strip()
        except OSError:
            continue
        try:
            if text:
                out[key] = parse(text)
        except ValueError:
            log.warning("t31: %s: %r is not a value, ignored", d / fname, text)
    return out


def sensor_setup(proc_root: str | Path, configured: dict[str, Any]) -> SensorSetup:
    """Merge /proc/jz/sensor with the configured sensor options (configuration wins);
    one T31Error naming what is missing and where to set it."""
    proc = read_proc_sensor(proc_root)
    given = {k: v for k, v in configured.items() if v is not None}
    if isinstance(given.get("i2c_addr"), str):
        given["i2c_addr"] = int(given["i2c_addr"], 0)
    merged = {**(proc or {}), **given}
    missing = [k for k in SENSOR_REQUIRED if k not in merged]
    if missing:
        where = (f"there is no {proc_root} (a sensor module without sensor-info)" if proc is None
                 else f"{proc_root} does not give it")
        raise T31Error(f"t31: which sensor? {where}: name it in the [t31] configuration ("
                       + ", ".join(missing) + ")")
    if proc is None:
        source = "configured"
    else:
        over = sorted(k for k in given if k in proc and proc[k] != given[k])
        source = str(proc_root) + (f", configuration overriding {', '.join(over)}" if over else "")
    return SensorSetup(str(merged["sensor"]), int(merged["i2c_addr"]), int(merged.get("i2c_adapter", 0)),
                       int(merged["sensor_width"]), int(merged["sensor_height"]),
                       int(merged["max_fps"]) if "max_fps" in merged else None, source)
