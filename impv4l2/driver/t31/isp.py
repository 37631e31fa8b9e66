"""ISP tuning controls of the t31 backend: one table row per control."""

from __future__ import annotations

from ctypes import byref
from typing import Callable, Sequence

from ..base import ControlKind, ControlSpec, Isp, SensorInfo
from .libimp import LibImp, T31Error

__all__ = ["ISP_CONTROLS", "T31Isp"]

# (control, setter, getter, spec).  A control exists only when its setter
# resolved in libimp; the getter (optional too) seeds the cached value.
_U8 = dict(kind=ControlKind.INTEGER, minimum=0, maximum=255, default=128)
ISP_CONTROLS: tuple[tuple[str, str, str, ControlSpec], ...] = (
    ("brightness", "IMP_ISP_Tuning_SetBrightness", "IMP_ISP_Tuning_GetBrightness",
     ControlSpec("brightness", **_U8)),
    ("contrast", "IMP_ISP_Tuning_SetContrast", "IMP_ISP_Tuning_GetContrast",
     ControlSpec("contrast", **_U8)),
    ("saturation", "IMP_ISP_Tuning_SetSaturation", "IMP_ISP_Tuning_GetSaturation",
     ControlSpec("saturation", **_U8)),
    ("sharpness", "IMP_ISP_Tuning_SetSharpness", "IMP_ISP_Tuning_GetSharpness",
     ControlSpec("sharpness", **_U8)),
    ("hue", "IMP_ISP_Tuning_SetBcshHue", "IMP_ISP_Tuning_GetBcshHue", ControlSpec("hue", **_U8)),
    ("hflip", "IMP_ISP_Tuning_SetISPHflip", "IMP_ISP_Tuning_GetISPHflip",
     ControlSpec("hflip", ControlKind.BOOLEAN)),
    ("vflip", "IMP_ISP_Tuning_SetISPVflip", "IMP_ISP_Tuning_GetISPVflip",
     ControlSpec("vflip", ControlKind.BOOLEAN)),
    # IMPISPAntiflickerAttr: DISABLE, 50HZ, 60HZ (= V4L2's menu order)
    ("power_line_frequency", "IMP_ISP_Tuning_SetAntiFlickerAttr", "IMP_ISP_Tuning_GetAntiFlickerAttr",
     ControlSpec("power_line_frequency", ControlKind.MENU, 0, 2, 1, 1, ("Disabled", "50 Hz", "60 Hz"))),
    # IMPISPRunningMode: DAY=0, NIGHT=1
    ("day_night", "IMP_ISP_Tuning_SetISPRunningMode", "IMP_ISP_Tuning_GetISPRunningMode",
     ControlSpec("day_night", ControlKind.MENU, 0, 1, 1, 0, ("Day", "Night"))),
    # AE compensation (128 = neutral) stands in for exposure; max analog gain for gain.
    ("exposure", "IMP_ISP_Tuning_SetAeComp", "IMP_ISP_Tuning_GetAeComp",
     ControlSpec("exposure", **_U8)),
    ("gain", "IMP_ISP_Tuning_SetMaxAgain", "IMP_ISP_Tuning_GetMaxAgain",
     ControlSpec("gain", ControlKind.INTEGER, 0, 160, 1, 160)),
)


class T31Isp(Isp):
    """ISP tuning through IMP_ISP_Tuning_* (only the setters the library has)."""

    def __init__(self, lib: LibImp, sensor: SensorInfo):
        self.lib = lib
        self.sensor = sensor
        self._setters: dict[str, Callable] = {}
        self._values: dict[str, int] = {}
        specs = []
        for name, setter, getter, spec in ISP_CONTROLS:
            fn = getattr(lib, setter)
            if fn is None:
                continue
            self._setters[name] = fn
            specs.append(spec)
            self._values[name] = self._read(getter, spec)
        self._specs = tuple(specs)

    def _read(self, getter: str, spec: ControlSpec) -> int:
        fn = getattr(self.lib, getter)
        if fn is None:
            return spec.default
        out = fn.argtypes[0]._type_()
        if fn(byref(out)) < 0:
            return spec.default
        return min(max(int(out.value), spec.minimum), spec.maximum)

    @property
    def controls(self) -> Sequence[ControlSpec]:
        return self._specs

    def get(self, name: str) -> int:
        return self._values[name]

    def set(self, name: str, value: int) -> None:
        fn = self._setters.get(name)
        if fn is None:
            raise KeyError(name)
        ret = fn(int(value))
        if ret < 0:
            raise T31Error(f"{fn.__name__}({value}) failed ({ret})")
        self._values[name] = int(value)
