"""System bring-up and teardown of the t31 backend as tables (sample-common.c).

Bring-up is SYSTEM_UP row by row; teardown runs the undo of every row that
succeeded, in SYSTEM_TEARDOWN order.  The sources disagree on that order:
the SDK 1.1.1 sample_system_exit calls IMP_System_Exit first and
IMP_ISP_DisableTuning after DelSensor, while the @attention of imp_isp.h
asks for tuning to be disabled first.  The sample is what runs on every
vendor camera, so it is followed here; the fake accepts both, and swapping
is this one table entry.
"""

from __future__ import annotations

import logging
from ctypes import byref

from . import structs as st
from .capture import Step, run_steps
from .libimp import LibImp, T31Error

log = logging.getLogger("impv4l2.t31")
S = st.native

__all__ = ["INITIAL_RUNNING_MODE", "OSD_POOL_SIZE", "SYSTEM_TEARDOWN", "SYSTEM_UP", "SystemSequence"]

# Bring-up as sample-common.c sample_system_init (SDK 1.1.1) and prudynt IMPSystem::init:
# IMP_OSD_SetPoolSize before IMP_ISP_Open (512 KiB in the sample), the day running mode after
# IMP_ISP_EnableTuning (IMPISP_RUNNING_MODE_DAY = 0).
OSD_POOL_SIZE = 512 * 1024
INITIAL_RUNNING_MODE = 0

# (call, its undo, whether both take the IMPSensorInfo), in bring-up order
SYSTEM_UP: tuple[tuple[str, str, bool], ...] = (
    ("IMP_ISP_Open", "IMP_ISP_Close", False),
    ("IMP_ISP_AddSensor", "IMP_ISP_DelSensor", True),
    ("IMP_ISP_EnableSensor", "IMP_ISP_DisableSensor", False),
    ("IMP_System_Init", "IMP_System_Exit", False),
    ("IMP_ISP_EnableTuning", "IMP_ISP_DisableTuning", False),
)
# sample-common.c sample_system_exit (the one entry to change, see above)
SYSTEM_TEARDOWN: tuple[str, ...] = ("IMP_System_Exit", "IMP_ISP_DisableSensor", "IMP_ISP_DelSensor",
                                    "IMP_ISP_DisableTuning", "IMP_ISP_Close")
assert sorted(SYSTEM_TEARDOWN) == sorted(undo for _, undo, _ in SYSTEM_UP)


class SystemSequence:
    """ISP, sensor and system of one backend: :meth:`up` once, :meth:`down` once."""

    def __init__(self, lib: LibImp, name: str, i2c_addr: int, i2c_adapter: int):
        self.lib = lib
        si = self.sensor_info = S.IMPSensorInfo()
        si.name = name.encode()[:31]
        si.cbus_type = st.TX_SENSOR_CONTROL_INTERFACE_I2C
        si.i2c.type = name.encode()[:19]
        si.i2c.addr, si.i2c.i2c_adapter_id = i2c_addr, i2c_adapter
        self._done: list[str] = []  # undo calls owed

    def up(self, fps: int) -> None:
        """Bring-up; on failure everything done is undone and T31Error raised."""
        lib = self.lib
        if lib.has("osd_pool"):  # before ISP_Open, or OSD can never get rmem (sample-common.c)
            lib.call("IMP_OSD_SetPoolSize", OSD_POOL_SIZE)
        try:
            for call, undo, sensor in SYSTEM_UP:
                lib.call(call, *((byref(self.sensor_info),) if sensor else ()))
                self._done.append(undo)
            if lib.has("day_night"):  # a defined state before any client asks (sample-common.c)
                lib.call("IMP_ISP_Tuning_SetISPRunningMode", INITIAL_RUNNING_MODE)
            if lib.has("sensor_fps"):
                lib.call("IMP_ISP_Tuning_SetSensorFPS", fps, 1)
        except T31Error:
            self.down("t31 bring-up")
            raise

    def down(self, what: str = "t31 close") -> None:
        """The undo of every step done, in SYSTEM_TEARDOWN order (errors logged)."""
        args = {undo: (byref(self.sensor_info),) if sensor else () for _, undo, sensor in SYSTEM_UP}
        steps: list[Step] = [(undo, lambda f=getattr(self.lib, undo), a=args[undo]: f(*a))
                             for undo in SYSTEM_TEARDOWN if undo in self._done]
        self._done.clear()
        run_steps(steps, what)
