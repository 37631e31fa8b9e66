"""Motion detection controls (Detect class) over a backend's MotionSource; see
:mod:`impv4l2.v4l2.features` for the semantics.  Needs numpy (imported only where
a backend offers a motion source)."""

from __future__ import annotations

import logging
import threading
from typing import Callable

import numpy as np

from ..driver.base import MOTION_ACTIVITY_MAX, Backend, MotionReport
from . import abi
from .controls import Control, ControlSet

log = logging.getLogger("impv4l2.v4l2")

CID = abi.CID
T = abi.CtrlType
F = abi.CtrlFlag

MD_DISABLED, MD_GLOBAL, MD_THRESHOLD_GRID, MD_REGION_GRID = range(4)
MD_MODE_MENU = ("Disabled", "Global", "Threshold Grid", "Region Grid")
MD_REGIONS = 4
MD_DEFAULT_THRESHOLD = 50

# (id, kernel name, type, min, max, default, value key, array, menu)
DETECT_CONTROLS = (
    (CID.DETECT_MD_MODE, "Motion Detection Mode", T.MENU, 0, 3, MD_DISABLED, "mode", False, MD_MODE_MENU),
    (CID.DETECT_MD_GLOBAL_THRESHOLD, "MD Global Threshold", T.INTEGER, 0, MOTION_ACTIVITY_MAX,
     MD_DEFAULT_THRESHOLD, "global", False, ()),
    (CID.DETECT_MD_THRESHOLD_GRID, "MD Threshold Grid", T.U16, 0, MOTION_ACTIVITY_MAX,
     MD_DEFAULT_THRESHOLD, "thresholds", True, ()),
    (CID.DETECT_MD_REGION_GRID, "MD Region Grid", T.U8, 0, MD_REGIONS - 1, 0, "regions", True, ()),
)
_DTYPE = {T.U16: np.uint16, T.U8: np.uint8}

MotionListener = Callable[[int, int], None]  # (region_mask, frame timestamp_ns)


class MotionDetector:
    """Detect-class controls over one MotionSource, and the fan-out of its reports."""

    def __init__(self, backend: Backend):
        src = backend.motion
        assert src is not None
        self.source = src
        self.dims = (src.rows, src.cols)
        self.values: dict[str, object] = {}
        self._lock = threading.Lock()
        self._running = False
        self.listeners: list[MotionListener] = []
        ctrls = []
        for cid, name, type_, lo, hi, default, key, array, menu in DETECT_CONTROLS:
            self.values[key] = np.full(self.dims, default, _DTYPE[type_]) if array else default
            get = (lambda k=key: self.values[k].tobytes()) if array else (lambda k=key: self.values[k])
            ctrls.append(Control(cid, type_, name, lo, hi, 1, default, F.SLIDER if type_ == T.INTEGER else 0,
                                 menu, get=get, set=lambda v, k=key: self._set(k, v),
                                 dims=self.dims if array else ()))
        self.control_set = ControlSet(ctrls)

    def _set(self, key: str, value) -> None:
        if isinstance(value, bytes):  # arrays: a new array, swapped in whole for the sensor thread
            value = np.frombuffer(value, self.values[key].dtype).reshape(self.dims).copy()
        self.values[key] = value
        if key == "mode":
            self._follow_mode()

    def _follow_mode(self) -> None:
        with self._lock:
            on = self.values["mode"] != MD_DISABLED
            if on == self._running:
                return
            self._running = on
            if on:
                self.source.start(self._report)
            else:
                self.source.stop()
        log.info("motion detection %s", MD_MODE_MENU[self.values["mode"]])

    def _report(self, r: MotionReport) -> None:
        """Backend thread: thresholds and regions -> region mask -> listeners."""
        mode, act = self.values["mode"], r.activity
        if mode == MD_THRESHOLD_GRID:
            mask = int((act > self.values["thresholds"]).any())
        elif mode == MD_REGION_GRID:
            moving = act > self.values["global"]
            mask = int(np.bitwise_or.reduce(np.left_shift(1, self.values["regions"][moving],
                                                          dtype=np.uint32))) if moving.any() else 0
        elif mode == MD_GLOBAL:
            mask = int((act > self.values["global"]).any())
        else:
            return
        if mask:
            for fn in list(self.listeners):
                fn(mask, r.timestamp_ns)

    def close(self) -> None:
        with self._lock:
            if self._running:
                self.source.stop()
                self._running = False
