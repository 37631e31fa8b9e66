"""Stand-in hardware with real kernel uevents: loop block devices a test adds and removes."""

from __future__ import annotations

import errno
import fcntl
import os
import time

LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81


class LoopHardware:
    """A block device loopN that tests add and remove (real uevents)."""

    def __init__(self):
        self.ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        self.number = next(n for n in range(230, 1000) if not os.path.exists(f"/sys/block/loop{n}"))
        self.name = f"loop{self.number}"
        self.present = False

    def add(self) -> None:
        fcntl.ioctl(self.ctl, LOOP_CTL_ADD, self.number)
        self.present = True

    def remove(self) -> None:
        for _ in range(50):  # EBUSY while udev's workers still have it open
            try:
                fcntl.ioctl(self.ctl, LOOP_CTL_REMOVE, self.number)
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.05)
        self.present = False

    def close(self) -> None:
        if self.present:
            self.remove()
        os.close(self.ctl)
