"""The sim backend's software ISP: tuning controls and their effect on NV12.

Controls follow the T31 IMP_ISP_Tuning_* ranges (0..255, default 128 for the
BCSH + sharpness set).  A set of control values compiles into an immutable
:class:`Tuning` (lookup tables built once), which the sensor applies:

- to the static part of the synthetic scene once per (size, tuning) — the
  result is cached, so per-frame cost does not depend on the tuning;
- to every frame for file input (and for the moving box: its colour goes
  through the same tables; flips move it).

Only non-neutral stages run: a 256-entry luma LUT (exposure/gain, contrast,
brightness), a 64 Ki-entry UV LUT on the interleaved chroma viewed as
uint16 (saturation, hue), UV=128 in night mode, flips, and an unsharp mask.
Power-line banding is per frame (it rolls): a darkening LUT on the rows of
the dark bands, only when the anti-flicker setting is wrong for the mains.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Sequence

import numpy as np

from ..base import ControlKind, ControlSpec, Isp, SensorInfo

EXPOSURE_AUTO = ("auto", "manual")
POWER_LINE = ("disabled", "50 Hz", "60 Hz", "auto")
DAY_NIGHT = ("day", "night")
GAIN_UNITY = 16  # gain is in 1/16 steps: 16 = x1
BAND_DEPTH = 0.08  # faint flicker banding: dark bands lose 8 % of luma


def control_specs(fps: int) -> tuple[ControlSpec, ...]:
    """The ISP controls; exposure limits follow the frame period."""
    frame_us = 1_000_000 // fps
    i, b, m = ControlKind.INTEGER, ControlKind.BOOLEAN, ControlKind.MENU
    return (
        ControlSpec("brightness", i, 0, 255, 1, 128),
        ControlSpec("contrast", i, 0, 255, 1, 128),
        ControlSpec("saturation", i, 0, 255, 1, 128),
        ControlSpec("hue", i, 0, 255, 1, 128),
        ControlSpec("sharpness", i, 0, 255, 1, 128),
        ControlSpec("hflip", b, 0, 1, 1, 0),
        ControlSpec("vflip", b, 0, 1, 1, 0),
        ControlSpec("exposure_auto", m, 0, 1, 1, 0, EXPOSURE_AUTO),
        ControlSpec("exposure", i, 10, frame_us, 1, frame_us // 4),
        ControlSpec("gain_auto", b, 0, 1, 1, 1),
        ControlSpec("gain", i, GAIN_UNITY, 255, 1, GAIN_UNITY),
        ControlSpec("power_line_frequency", m, 0, 3, 1, 3, POWER_LINE),
        ControlSpec("day_night", m, 0, 1, 1, 0, DAY_NIGHT),
    )


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Compiled control values (immutable; shared with the sensor thread)."""

    version: int
    ylut: np.ndarray | None  # 256 uint8, None when neutral
    uvlut: np.ndarray | None  # 65536 '<u2' (U | V << 8), None when neutral
    gray: bool
    hflip: bool
    vflip: bool
    sharpen: float  # -1 (blur) .. +1 (sharpen), 0 = off
    band_lut: np.ndarray | None  # darkening LUT for flicker bands, None = no banding
    bands_per_frame: float = 0.0

    @property
    def neutral(self) -> bool:
        return (self.ylut is None and self.uvlut is None and not self.gray
                and not self.hflip and not self.vflip and not self.sharpen)

    # ------------------------------------------------------------ application

    def apply(self, frame: np.ndarray, width: int, height: int) -> None:
        """Apply the static stages to a flat NV12 frame in place."""
        n = width * height
        y = frame[:n].reshape(height, width)
        uv = frame[n: n * 3 // 2].reshape(height // 2, width // 2, 2)
        if self.vflip:
            y[:] = y[::-1]
            uv[:] = uv[::-1]
        if self.hflip:
            y[:] = y[:, ::-1]
            uv[:] = uv[:, ::-1]
        if self.sharpen:
            _unsharp(y, self.sharpen)
        if self.ylut is not None:
            np.take(self.ylut, y, out=y, mode="clip")
        if self.gray:
            uv.fill(128)
        elif self.uvlut is not None:
            uv16 = frame[n: n * 3 // 2].view("<u2")
            np.take(self.uvlut, uv16, out=uv16, mode="clip")

    def colour(self, yuv: tuple[int, int, int]) -> tuple[int, int, int]:
        """A flat colour through the same tables (for drawn objects)."""
        y, u, v = yuv
        if self.ylut is not None:
            y = int(self.ylut[y])
        if self.gray:
            u = v = 128
        elif self.uvlut is not None:
            packed = int(self.uvlut[u | (v << 8)])
            u, v = packed & 0xFF, packed >> 8
        return y, u, v

    def band(self, y_plane: np.ndarray, sensor_frame: int) -> None:
        """Darken the flicker bands of this frame (rolling with the frame number)."""
        if self.band_lut is None:
            return
        h = y_plane.shape[0]
        phase = (sensor_frame * self.bands_per_frame) % 1.0
        # dark half of each flicker cycle: rows whose cycle position is in [0, .5)
        cycle_rows = h / self.bands_per_frame
        start = -phase * cycle_rows
        while start < h:
            r0, r1 = max(0, int(start)), min(h, int(start + cycle_rows / 2))
            if r1 > r0:
                rows = y_plane[r0:r1]
                np.take(self.band_lut, rows, out=rows, mode="clip")
            start += cycle_rows


def _unsharp(y: np.ndarray, amount: float) -> None:
    """Sharpen (amount > 0) or soften (< 0) with a 3x3 [1 2 1] blur."""
    f = y.astype(np.float32)
    blur = f.copy()
    blur[:, 1:-1] = (f[:, :-2] + 2 * f[:, 1:-1] + f[:, 2:]) / 4
    b2 = blur.copy()
    b2[1:-1] = (blur[:-2] + 2 * blur[1:-1] + blur[2:]) / 4
    out = f + 2 * amount * (f - b2) if amount > 0 else f + (-amount) * (b2 - f)
    np.clip(out, 0, 255, out=out)
    y[:] = out.round().astype(np.uint8)


def compile_tuning(values: dict[str, int], version: int, fps: int,
                   exposure_ref: int, mains_hz: int) -> Tuning:
    """Build the tables for a set of control values."""
    x = np.arange(256, dtype=np.float64)
    ylut_neutral = True
    scale = 1.0
    if values["exposure_auto"] == 1:  # manual
        scale *= values["exposure"] / exposure_ref
    if not values["gain_auto"]:
        scale *= values["gain"] / GAIN_UNITY
    if scale != 1.0:
        x = 16 + (x - 16) * scale
        ylut_neutral = False
    if values["contrast"] != 128:
        x = 128 + (x - 128) * (values["contrast"] / 128)
        ylut_neutral = False
    if values["brightness"] != 128:
        x = x + (values["brightness"] - 128)
        ylut_neutral = False
    ylut = None if ylut_neutral else np.clip(x, 0, 255).round().astype(np.uint8)

    uvlut = None
    sat, hue = values["saturation"], values["hue"]
    if sat != 128 or hue != 128:
        s = sat / 128
        theta = (hue - 128) / 128 * math.pi
        c, sn = s * math.cos(theta), s * math.sin(theta)
        packed = np.arange(65536)
        du = (packed & 0xFF) - 128.0
        dv = (packed >> 8) - 128.0
        u2 = np.clip(128 + c * du - sn * dv, 0, 255).round().astype(np.uint16)
        v2 = np.clip(128 + sn * du + c * dv, 0, 255).round().astype(np.uint16)
        uvlut = (u2 | (v2 << 8)).astype("<u2")

    # Anti-flicker: light flickers at 2x mains; when the setting does not
    # match the mains (or is off) the rolling shutter shows bands.
    setting = POWER_LINE[values["power_line_frequency"]]
    band_lut, bands = None, 0.0
    if setting == "disabled" or setting not in ("auto", f"{mains_hz} Hz"):
        band_lut = np.clip(16 + (np.arange(256) - 16) * (1 - BAND_DEPTH), 0, 255).round().astype(np.uint8)
        bands = 2 * mains_hz / fps

    return Tuning(
        version=version, ylut=ylut, uvlut=uvlut,
        gray=values["day_night"] == 1,
        hflip=bool(values["hflip"]), vflip=bool(values["vflip"]),
        sharpen=(values["sharpness"] - 128) / 128,
        band_lut=band_lut, bands_per_frame=bands,
    )


class SimIsp(Isp):
    """Software ISP: thread-safe control store compiling to :class:`Tuning`."""

    def __init__(self, sensor: SensorInfo, mains_hz: int = 50) -> None:
        self.sensor = sensor
        self.mains_hz = mains_hz
        self._specs = control_specs(sensor.fps)
        self._by_name = {s.name: s for s in self._specs}
        self._values = {s.name: s.default for s in self._specs}
        self._exposure_ref = self._by_name["exposure"].default
        self._lock = threading.Lock()
        self._version = 0
        self._tuning: Tuning | None = None

    @property
    def controls(self) -> Sequence[ControlSpec]:
        return self._specs

    def get(self, name: str) -> int:
        with self._lock:
            return self._values[name]

    def set(self, name: str, value: int) -> None:
        spec = self._by_name[name]  # KeyError for unknown names
        value = min(max(int(value), spec.minimum), spec.maximum)
        with self._lock:
            if self._values[name] != value:
                self._values[name] = value
                self._version += 1

    def tuning(self) -> Tuning:
        """The compiled tuning for the current values (cached per version)."""
        with self._lock:
            t = self._tuning
            if t is not None and t.version == self._version:
                return t
            values, version = dict(self._values), self._version
        t = compile_tuning(values, version, self.sensor.fps, self._exposure_ref, self.mains_hz)
        with self._lock:
            if self._version == version:
                self._tuning = t
        return t
