"""Binding of libimp.so from one symbol table (Chromium dlopen-stub style).

Every symbol of :data:`SYMBOLS` is resolved when the library is loaded.  A
missing *required* symbol is one start-up error naming it; a missing
*optional* symbol sets its attribute to ``None`` and disables only the
feature that needs it (:meth:`LibImp.has`).  Nothing is looked up lazily, so
nothing can fail half-way through streaming.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from ctypes import POINTER, c_bool, c_int, c_int64, c_ubyte, c_uint16, c_uint32
from pathlib import Path
from typing import Any

from .structs import native as S

log = logging.getLogger("impv4l2.t31.libimp")

ENV_LIBIMP = "IMPV4L2_LIBIMP"
# Libraries whose symbols the vendor libimp.so uses without naming them all in its DT_NEEDED
# (issue 10, from the undefined symbols of the SDK 1.1.1 lib/uclibc/libimp.so; libsysutils as
# prudynt links it beside libimp): (file names tried, in order; symbols it provides).  Each is
# loaded RTLD_GLOBAL before libimp, from libimp's directory first, unless the process already
# has its symbols (glibc 2.34+ and musl carry librt in libc); when libimp then fails to load,
# the error names what was found nowhere.
PRELOAD: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("libalog.so",), ("imp_log_fun", "IMP_Log_Get_Option")),
    (("librt.so.1", "librt.so.0", "librt.so"), ("shm_open", "sem_open")),
    (("libm.so.6", "libm.so.0", "libm.so"), ("log10", "pow", "sqrt")),
    (("libsysutils.so",), ("SU_Base_GetVersion",)),
)


class T31Error(RuntimeError):
    """The T31 hardware / libimp could not be brought up or driven."""


REQUIRED = None  # feature name for symbols without which nothing works

_p = POINTER
# (symbol, restype, argtypes, feature or REQUIRED)
SYMBOLS: tuple[tuple[str, Any, tuple, str | None], ...] = (
    # system + ISP bring-up
    ("IMP_ISP_Open", c_int, (), REQUIRED),
    ("IMP_ISP_Close", c_int, (), REQUIRED),
    ("IMP_ISP_AddSensor", c_int, (_p(S.IMPSensorInfo),), REQUIRED),
    ("IMP_ISP_DelSensor", c_int, (_p(S.IMPSensorInfo),), REQUIRED),
    ("IMP_ISP_EnableSensor", c_int, (), REQUIRED),
    ("IMP_ISP_DisableSensor", c_int, (), REQUIRED),
    ("IMP_System_Init", c_int, (), REQUIRED),
    ("IMP_System_Exit", c_int, (), REQUIRED),
    ("IMP_System_Bind", c_int, (_p(S.IMPCell), _p(S.IMPCell)), REQUIRED),
    ("IMP_System_UnBind", c_int, (_p(S.IMPCell), _p(S.IMPCell)), REQUIRED),
    ("IMP_System_GetTimeStamp", c_int64, (), "timestamps"),
    ("IMP_System_GetVersion", c_int, (_p(S.IMPVersion),), "version"),  # "IMP-1.1.x"
    ("IMP_OSD_SetPoolSize", c_int, (c_int,), "osd_pool"),  # before ISP_Open (sample-common.c)
    ("IMP_ISP_EnableTuning", c_int, (), REQUIRED),
    ("IMP_ISP_DisableTuning", c_int, (), REQUIRED),
    ("IMP_ISP_Tuning_SetSensorFPS", c_int, (c_uint32, c_uint32), "sensor_fps"),
    # frame source
    ("IMP_FrameSource_CreateChn", c_int, (c_int, _p(S.IMPFSChnAttr)), REQUIRED),
    ("IMP_FrameSource_DestroyChn", c_int, (c_int,), REQUIRED),
    ("IMP_FrameSource_SetChnAttr", c_int, (c_int, _p(S.IMPFSChnAttr)), REQUIRED),
    ("IMP_FrameSource_EnableChn", c_int, (c_int,), REQUIRED),
    ("IMP_FrameSource_DisableChn", c_int, (c_int,), REQUIRED),
    ("IMP_FrameSource_SetFrameDepth", c_int, (c_int, c_int), "raw"),
    ("IMP_FrameSource_GetFrame", c_int, (c_int, _p(_p(S.IMPFrameInfo))), "raw"),
    ("IMP_FrameSource_ReleaseFrame", c_int, (c_int, _p(S.IMPFrameInfo)), "raw"),
    # encoder
    ("IMP_Encoder_CreateGroup", c_int, (c_int,), REQUIRED),
    ("IMP_Encoder_DestroyGroup", c_int, (c_int,), REQUIRED),
    ("IMP_Encoder_SetDefaultParam", c_int,
     (_p(S.IMPEncoderChnAttr), c_int, c_int, c_uint16, c_uint16, c_uint32, c_uint32, c_uint32,
      c_int, c_int, c_uint32), REQUIRED),
    ("IMP_Encoder_CreateChn", c_int, (c_int, _p(S.IMPEncoderChnAttr)), REQUIRED),
    ("IMP_Encoder_DestroyChn", c_int, (c_int,), REQUIRED),
    ("IMP_Encoder_RegisterChn", c_int, (c_int, c_int), REQUIRED),
    ("IMP_Encoder_UnRegisterChn", c_int, (c_int,), REQUIRED),
    ("IMP_Encoder_StartRecvPic", c_int, (c_int,), REQUIRED),
    ("IMP_Encoder_StopRecvPic", c_int, (c_int,), REQUIRED),
    ("IMP_Encoder_PollingStream", c_int, (c_int, c_uint32), REQUIRED),
    ("IMP_Encoder_GetStream", c_int, (c_int, _p(S.IMPEncoderStream), c_bool), REQUIRED),
    ("IMP_Encoder_ReleaseStream", c_int, (c_int, _p(S.IMPEncoderStream)), REQUIRED),
    ("IMP_Encoder_RequestIDR", c_int, (c_int,), "idr"),
    ("IMP_Encoder_FlushStream", c_int, (c_int,), "flush"),
    ("IMP_Encoder_SetChnBitRate", c_int, (c_int, c_int, c_int), "bitrate"),
    ("IMP_Encoder_SetChnGopLength", c_int, (c_int, c_int), "gop"),
    # ISP tuning (each one control)
    ("IMP_ISP_Tuning_SetBrightness", c_int, (c_ubyte,), "brightness"),
    ("IMP_ISP_Tuning_GetBrightness", c_int, (_p(c_ubyte),), "brightness.get"),
    ("IMP_ISP_Tuning_SetContrast", c_int, (c_ubyte,), "contrast"),
    ("IMP_ISP_Tuning_GetContrast", c_int, (_p(c_ubyte),), "contrast.get"),
    ("IMP_ISP_Tuning_SetSaturation", c_int, (c_ubyte,), "saturation"),
    ("IMP_ISP_Tuning_GetSaturation", c_int, (_p(c_ubyte),), "saturation.get"),
    ("IMP_ISP_Tuning_SetSharpness", c_int, (c_ubyte,), "sharpness"),
    ("IMP_ISP_Tuning_GetSharpness", c_int, (_p(c_ubyte),), "sharpness.get"),
    ("IMP_ISP_Tuning_SetBcshHue", c_int, (c_ubyte,), "hue"),  # SDK >= 1.1.6
    ("IMP_ISP_Tuning_GetBcshHue", c_int, (_p(c_ubyte),), "hue.get"),
    ("IMP_ISP_Tuning_SetISPHflip", c_int, (c_int,), "hflip"),
    ("IMP_ISP_Tuning_GetISPHflip", c_int, (_p(c_int),), "hflip.get"),
    ("IMP_ISP_Tuning_SetISPVflip", c_int, (c_int,), "vflip"),
    ("IMP_ISP_Tuning_GetISPVflip", c_int, (_p(c_int),), "vflip.get"),
    ("IMP_ISP_Tuning_SetAntiFlickerAttr", c_int, (c_int,), "power_line_frequency"),
    ("IMP_ISP_Tuning_GetAntiFlickerAttr", c_int, (_p(c_int),), "power_line_frequency.get"),
    ("IMP_ISP_Tuning_SetISPRunningMode", c_int, (c_int,), "day_night"),
    ("IMP_ISP_Tuning_GetISPRunningMode", c_int, (_p(c_int),), "day_night.get"),
    ("IMP_ISP_Tuning_SetAeComp", c_int, (c_int,), "exposure"),
    ("IMP_ISP_Tuning_GetAeComp", c_int, (_p(c_int),), "exposure.get"),
    ("IMP_ISP_Tuning_SetMaxAgain", c_int, (c_uint32,), "gain"),
    ("IMP_ISP_Tuning_GetMaxAgain", c_int, (_p(c_uint32),), "gain.get"),
)


def candidates(lib_path: str | os.PathLike | None) -> list[str]:
    """Where libimp is looked for, in order: option, environment, system."""
    if lib_path:
        return [os.fspath(lib_path)]
    if os.environ.get(ENV_LIBIMP):
        return [os.environ[ENV_LIBIMP]]
    found = ctypes.util.find_library("imp")
    return [p for p in (found, "libimp.so") if p]


class LibImp:
    """libimp.so with every table symbol resolved (``None`` when optional and absent)."""

    def __init__(self, lib_path: str | os.PathLike | None = None):
        tried = candidates(lib_path)
        self._preloaded, self.preload_missing = self._preload(tried)
        self.path, self.cdll, errors, found = None, None, [], False
        for name in tried:
            if os.sep in name and not os.path.exists(name):
                errors.append(f"{name}: no such file")
                continue
            try:
                self.cdll = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
                self.path = name
                break
            except OSError as e:
                errors.append(str(e))
                found = found or "No such file" not in str(e)
        if self.cdll is None:
            missing = "".join(f"; {names[0]} ({', '.join(syms)}) not found to preload"
                              for names, syms in self.preload_missing if found)
            raise T31Error("cannot load libimp.so (tried %s; set lib_path= or $%s): %s%s"
                           % (", ".join(tried), ENV_LIBIMP, "; ".join(errors), missing))
        self.features: dict[str, bool] = {}
        missing_required = []
        for sym, restype, argtypes, feature in SYMBOLS:
            fn = getattr(self.cdll, sym, None)
            if fn is not None:
                fn.restype, fn.argtypes = restype, list(argtypes)
            elif feature is REQUIRED:
                missing_required.append(sym)
            setattr(self, sym, fn)
            if feature is not REQUIRED:
                self.features[feature] = self.features.get(feature, True) and fn is not None
        if missing_required:
            raise T31Error("%s lacks required symbol%s %s" % (
                self.path, "s" if len(missing_required) > 1 else "", ", ".join(missing_required)))
        absent = sorted(f for f, ok in self.features.items() if not ok)
        if absent:
            log.info("%s: optional features absent: %s", self.path, ", ".join(absent))

    @staticmethod
    def _preload(tried: list[str]) -> tuple[list[str], list[tuple[tuple[str, ...], tuple[str, ...]]]]:
        """Load PRELOAD RTLD_GLOBAL: (paths loaded, entries found nowhere)."""
        dirs = list(dict.fromkeys(os.path.dirname(p) for p in tried if os.sep in p))
        present = ctypes.CDLL(None)  # the process's global scope
        loaded, missing = [], []
        for names, syms in PRELOAD:
            if all(hasattr(present, sym) for sym in syms):
                continue
            for path in [os.path.join(d, n) for n in names for d in dirs] + list(names):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    loaded.append(path)
                    break
                except OSError:
                    continue
            else:
                missing.append((names, syms))
        return loaded, missing

    def has(self, feature: str) -> bool:
        return self.features.get(feature, False)

    def call(self, sym: str, *args) -> int:
        """Call a resolved symbol; a negative return raises T31Error naming it."""
        ret = getattr(self, sym)(*args)
        if ret < 0:
            raise T31Error(f"{sym} failed ({ret})")
        return ret


def find_symbols(path: str | Path) -> set[str]:
    """Table symbols a library exports (diagnostics: `impv4l2 ... --check`)."""
    lib = ctypes.CDLL(os.fspath(path))
    return {sym for sym, *_ in SYMBOLS if hasattr(lib, sym)}


__all__ = ["LibImp", "T31Error", "SYMBOLS", "REQUIRED", "ENV_LIBIMP", "candidates", "find_symbols"]
