"""The one place that knows how ioctl numbers are built (_IOC), per architecture.

The Linux _IOC encoding is not universal: MIPS (and PowerPC/SPARC/Alpha) use
3 direction bits at bit 29 and a 13-bit size, with NONE=1, READ=2, WRITE=4;
x86/ARM use 2 direction bits at bit 30 and a 14-bit size, NONE=0, WRITE=1,
READ=2.  :data:`NATIVE` is the running machine's; the FUSE transport decodes
with it, the V4L2 ABI re-encodes linuxpy's (asm-generic) numbers with it, the
shim, install and t31 modules build theirs with it.  Standard library only:
this runs on the camera.

Decoding returns the direction as :data:`READ`/:data:`WRITE` flags (the kernel's
meaning: READ = the kernel writes the caller's memory), whatever the encoding.
"""

from __future__ import annotations

import os


class IocEncoding:
    """One architecture's _IOC layout (no dataclasses: udev-info imports this per node)."""

    __slots__ = ("name", "sizebits", "none", "write", "read", "nrbits", "typebits", "sizeshift", "dirshift")

    def __init__(self, name: str, sizebits: int, none: int, write: int, read: int) -> None:
        self.name = name
        self.sizebits, self.none, self.write, self.read = sizebits, none, write, read
        self.nrbits = self.typebits = 8
        self.sizeshift = self.nrbits + self.typebits
        self.dirshift = self.sizeshift + self.sizebits

    def __repr__(self) -> str:
        return f"IocEncoding({self.name})"

    def ioc(self, direction: int, typ: int | str, nr: int, size: int) -> int:
        t = ord(typ) if isinstance(typ, str) else typ
        if not 0 <= size < (1 << self.sizebits):
            raise ValueError(f"ioctl size {size} does not fit in {self.sizebits} bits")
        return (direction << self.dirshift) | (size << self.sizeshift) | (t << self.nrbits) | nr

    def dir_flags(self, cmd: int) -> int:
        """_IOC_DIR of ``cmd`` as READ|WRITE flags (0 for none)."""
        d = (cmd >> self.dirshift) & ((1 << (32 - self.dirshift)) - 1)
        return (READ if d & self.read else 0) | (WRITE if d & self.write else 0)

    def size(self, cmd: int) -> int:
        """_IOC_SIZE of ``cmd``."""
        return (cmd >> self.sizeshift) & ((1 << self.sizebits) - 1)

    def flags_to_dir(self, flags: int) -> int:
        """READ|WRITE flags -> this encoding's direction bits."""
        d = (self.read if flags & READ else 0) | (self.write if flags & WRITE else 0)
        return d or self.none

    def recode(self, cmd: int, source: "IocEncoding") -> int:
        """``cmd`` built with ``source`` (e.g. linuxpy's asm-generic numbers) in this encoding."""
        cmd &= 0xFFFFFFFF
        if source is self:
            return cmd
        nr, typ = cmd & 0xFF, (cmd >> 8) & 0xFF
        return self.ioc(self.flags_to_dir(source.dir_flags(cmd)), typ, nr, source.size(cmd))

    def IO(self, typ, nr: int) -> int:
        return self.ioc(self.none, typ, nr, 0)

    def IOR(self, typ, nr: int, size: int) -> int:
        return self.ioc(self.read, typ, nr, size)

    def IOW(self, typ, nr: int, size: int) -> int:
        return self.ioc(self.write, typ, nr, size)

    def IOWR(self, typ, nr: int, size: int) -> int:
        return self.ioc(self.read | self.write, typ, nr, size)


READ, WRITE = 2, 1  # decoded direction flags (the asm-generic values)

GENERIC = IocEncoding("asm-generic", sizebits=14, none=0, write=1, read=2)
MIPS = IocEncoding("mips", sizebits=13, none=1, write=4, read=2)

_BY_MACHINE = {"mips": MIPS, "mips64": MIPS, "ppc": MIPS, "ppc64": MIPS, "ppc64le": MIPS,
               "sparc": MIPS, "sparc64": MIPS, "alpha": MIPS}


def encoding(machine: str | None = None) -> IocEncoding:
    """The encoding for ``machine`` (``os.uname().machine`` by default)."""
    m = (machine or os.uname().machine).lower()
    if m.startswith("mips"):
        return MIPS
    return _BY_MACHINE.get(m, GENERIC)


NATIVE = encoding()
