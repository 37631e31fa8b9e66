"""The ioctl dispatch table: one entry per command, keyed by the ioctl number.

A node's handle class builds its table with the :meth:`IoctlTable.ioctl`
decorator; a derived node (the encoder) copies its base's table and adds or
replaces entries.  Commands absent from the table answer ENOTTY.
"""

from __future__ import annotations

import ctypes
import dataclasses
from typing import Callable

from . import abi


@dataclasses.dataclass(frozen=True)
class Ioctl:
    cmd: int
    name: str  # "VIDIOC_S_FMT"
    struct: type | None  # ctypes type laid over the argument bytes (zero copy)
    fn: Callable  # fn(handle, struct_or_None, mem) -> int | None
    prio: bool  # refused with EBUSY when another handle holds a higher priority (INFO_FL_PRIO)
    always_copy: bool = False  # the struct goes back even on failure (INFO_FL_ALWAYS_COPY: error_idx)


class IoctlTable:
    """Command -> :class:`Ioctl`."""

    def __init__(self, entries: dict[int, Ioctl] | None = None):
        self.entries: dict[int, Ioctl] = dict(entries or {})

    def copy(self) -> "IoctlTable":
        return IoctlTable(self.entries)

    def get(self, cmd: int) -> Ioctl | None:
        return self.entries.get(cmd)

    def ioctl(self, name: str, struct: type | None = None, *, prio: bool = False,
              always_copy: bool = False, cmd: int | None = None):
        """Decorator registering a handler method for VIDIOC_<name>.

        ``cmd`` gives the number of a driver-private ioctl (not in linuxpy's table); every
        row's struct must be as large as the number says, private ones too.
        """
        cmd = abi.VIDIOC[name] if cmd is None else cmd
        if struct is not None:
            assert ctypes.sizeof(struct) == abi.ioc_size(cmd), (name, ctypes.sizeof(struct))

        def register(fn: Callable) -> Callable:
            self.entries[cmd] = Ioctl(cmd, "VIDIOC_" + name, struct, fn, prio, always_copy)
            return fn

        return register
