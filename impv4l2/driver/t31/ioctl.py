"""ioctl request numbers for the T31 kernel nodes, per architecture.

The Linux _IOC encoding is not universal: MIPS (and PowerPC/SPARC/Alpha) use
3 direction bits at bit 29 and a 13-bit size, with NONE=1, READ=2, WRITE=4;
x86/ARM use 2 direction bits at bit 30 and a 14-bit size, NONE=0, WRITE=1,
READ=2.  Numbers are computed for the running machine unless an arch is given.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class IocEncoding:
    sizebits: int
    none: int
    write: int
    read: int
    nrbits: int = 8
    typebits: int = 8

    @property
    def sizeshift(self) -> int:
        return self.nrbits + self.typebits

    @property
    def dirshift(self) -> int:
        return self.sizeshift + self.sizebits

    def ioc(self, direction: int, typ: int | str, nr: int, size: int) -> int:
        t = ord(typ) if isinstance(typ, str) else typ
        if not 0 <= size < (1 << self.sizebits):
            raise ValueError(f"ioctl size {size} does not fit in {self.sizebits} bits")
        return (direction << self.dirshift) | (size << self.sizeshift) | (t << self.nrbits) | nr

    def IO(self, typ, nr: int) -> int:
        return self.ioc(self.none, typ, nr, 0)

    def IOR(self, typ, nr: int, size: int) -> int:
        return self.ioc(self.read, typ, nr, size)

    def IOW(self, typ, nr: int, size: int) -> int:
        return self.ioc(self.write, typ, nr, size)

    def IOWR(self, typ, nr: int, size: int) -> int:
        return self.ioc(self.read | self.write, typ, nr, size)


GENERIC = IocEncoding(sizebits=14, none=0, write=1, read=2)
MIPS = IocEncoding(sizebits=13, none=1, write=4, read=2)

_BY_MACHINE = {"mips": MIPS, "mips64": MIPS, "ppc": MIPS, "ppc64": MIPS, "ppc64le": MIPS,
               "sparc": MIPS, "sparc64": MIPS, "alpha": MIPS}


def encoding(machine: str | None = None) -> IocEncoding:
    """The encoding for ``machine`` (``os.uname().machine`` by default)."""
    m = (machine or os.uname().machine).lower()
    if m.startswith("mips"):
        return MIPS
    return _BY_MACHINE.get(m, GENERIC)
