"""Camera features shared by every capture node of a backend: motion detection and day/night.

**Motion detection** (:mod:`impv4l2.v4l2.detect`; the kernel's Detect class, as solo6x10/go7007 offer it):
``DETECT_MD_MODE`` (Disabled / Global / Threshold Grid / Region Grid),
``DETECT_MD_GLOBAL_THRESHOLD``, and two array controls over the backend's
:class:`~impv4l2.driver.base.MotionSource` grid (dims ``[rows][cols]``):
``DETECT_MD_THRESHOLD_GRID`` (U16, a threshold per cell) and
``DETECT_MD_REGION_GRID`` (U8, a region 0..3 per cell).  Activity and thresholds
are in per mille of a cell's pixels that changed; a cell moves when its activity
is *above* its threshold (so 1000 never triggers).

===============  ==========================  ==================================
mode             threshold of a cell         region_mask bit of a moving cell
===============  ==========================  ==================================
Global           GLOBAL_THRESHOLD            0
Threshold Grid   THRESHOLD_GRID[cell]        0
Region Grid      GLOBAL_THRESHOLD            REGION_GRID[cell]
===============  ==========================  ==================================

(Region Grid: the kernel speaks of per-region thresholds; with no control for
them every region uses the global one.)  A frame with moving cells posts
V4L2_EVENT_MOTION_DET to each node's subscribers; ``frame_sequence`` (with
MD_FL_HAVE_FRAME_SEQ) is the sequence of that node's buffer holding the same
sensor frame when the node streams and got it, otherwise the flag is clear.
The analysis runs only while the mode is not Disabled; thresholds apply from
the next analysed frame.

**Day/night**: where the backend has a :class:`~impv4l2.driver.base.LightMeter`,
the private Day/Night menu (:data:`~impv4l2.v4l2.controls.CID_DAY_NIGHT`) gains
"Auto" and drives :class:`impv4l2.driver.daynight.DayNight` (ISP mode, IR-cut and
IR-LED GPIOs) instead of the ISP's plain running mode; the read-only Day/Night
State control tells what the picture is and posts V4L2_EVENT_CTRL when it changes.
Backends without these interfaces (t31 for now) show none of this.
"""

from __future__ import annotations

import errno
import logging
import threading

from ..driver.base import Backend
from ..driver.daynight import AUTO, DAY, NIGHT, DayNight, DayNightParams
from . import abi
from .controls import CID_DAY_NIGHT, CID_DAY_NIGHT_STATE, Control, ControlSet

log = logging.getLogger("impv4l2.v4l2")

T = abi.CtrlType
F = abi.CtrlFlag

class DayNightControls:
    """The Day/Night menu with Auto and the Day/Night State control over a DayNight."""

    def __init__(self, backend: Backend, params: DayNightParams):
        self.dn = DayNight(backend.isp, backend.light_meter, params, on_switch=self._switched)
        self.mode_ctrl = Control(CID_DAY_NIGHT, T.MENU, "Day/Night", 0, 2, 1, DAY, 0,
                                 ("Day", "Night", "Auto"), get=lambda: self.dn.mode, set=self._set_mode)
        self.state_ctrl = Control(CID_DAY_NIGHT_STATE, T.MENU, "Day/Night State", 0, 1, 1, DAY, F.READ_ONLY,
                                  ("Day", "Night"), get=lambda: int(self.dn.night))
        self.control_set = ControlSet([self.mode_ctrl, self.state_ctrl])
        initial = {"day": DAY, "night": NIGHT, "auto": AUTO}.get(params.mode, DAY)
        self.dn.set_mode(initial)

    def _set_mode(self, mode: int) -> None:
        try:
            self.dn.set_mode(mode)
        except ValueError as e:
            raise OSError(errno.EINVAL, str(e)) from None

    def _switched(self, night: bool) -> None:
        self.control_set.notify(self.state_ctrl, int(night))

    def close(self) -> None:
        self.dn.close()


class CameraFeatures:
    """The optional features of one backend, shared by its capture nodes."""

    def __init__(self, backend: Backend, daynight=None):
        self.backend = backend
        self.motion = None  # a detect.MotionDetector
        if backend.motion is not None:
            from .detect import MotionDetector  # numpy: only where a motion source exists (not on t31)

            self.motion = MotionDetector(backend)
        else:
            log.debug("%s: no motion source: Detect controls not offered", backend.name)
        self.daynight = None
        if backend.light_meter is not None:
            params = DayNightParams.of(daynight)
            if params.day_gain >= params.night_gain:
                log.error("[daynight] day_gain %s must be below night_gain %s: using the defaults",
                          params.day_gain, params.night_gain)
                params = DayNightParams(**{**params.__dict__, "day_gain": DayNightParams.day_gain,
                                           "night_gain": DayNightParams.night_gain})
            self.daynight = DayNightControls(backend, params)
        if self.daynight is None:
            log.debug("%s: no light meter: Day/Night Auto, IR-cut/IR-LED GPIOs not offered", backend.name)
        self.users = 0

    def control_sets(self) -> list[ControlSet]:
        return [f.control_set for f in (self.motion, self.daynight) if f is not None]

    def close(self) -> None:
        for f in (self.motion, self.daynight):
            if f is not None:
                f.close()


_features: dict[int, CameraFeatures] = {}
_lock = threading.Lock()


def features_of(backend: Backend, daynight=None) -> CameraFeatures:
    """The backend's features (created on first use, with the [daynight] configuration
    ``daynight`` of the first node); each node takes one reference (:func:`release`)."""
    with _lock:
        f = _features.get(id(backend))
        if f is None or f.backend is not backend:
            f = _features[id(backend)] = CameraFeatures(backend, daynight)
        f.users += 1
        return f


def release(f: CameraFeatures) -> None:
    """A node is gone; the last one stops the analysis and the auto thread."""
    with _lock:
        f.users -= 1
        if f.users > 0:
            return
        if _features.get(id(f.backend)) is f:
            del _features[id(f.backend)]
    f.close()
