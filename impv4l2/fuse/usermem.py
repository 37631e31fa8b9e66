"""The caller's memory as a FUSE request can reach it (fileops.UserMemory implementations).

:class:`VmMemory`: process_vm_readv/writev on the calling pid (restricted FUSE ioctls, and
regions past the kernel's retry limits).  :class:`IoctlLayout` and :class:`RetryMemory`: the
iovecs asked of the kernel with FUSE_IOCTL_RETRY (CUSE's unrestricted ioctls) and the data it
then hands over, with process_vm as the fallback for what it cannot.
"""

from __future__ import annotations

import logging

from ..fileops import NeedMemory
from . import proto as P
from . import sysapi

log = logging.getLogger("impv4l2.fuse")

IOCTL_MAX = 128 << 10             # kernel limit per direction for unrestricted ioctls


def _covered(regions, addr: int, length: int):
    """The (region, index) that holds [addr, addr+length), or None."""
    for i, (a, n) in enumerate(regions):
        if a <= addr and addr + length <= a + n:
            return i
    return None


class VmMemory:
    """Caller memory through process_vm_readv/writev (restricted ioctls)."""

    __slots__ = ("pid",)

    def __init__(self, pid: int):
        self.pid = pid

    def require(self, reads=(), writes=()) -> None:
        return None

    def read(self, addr: int, length: int) -> bytes:
        return bytes(sysapi.vm_read(self.pid, addr, length))

    def write(self, addr: int, data) -> None:
        sysapi.vm_write(self.pid, addr, data)


class IoctlLayout:
    """The iovecs asked of the kernel for one unrestricted ioctl (FUSE_IOCTL_RETRY)."""

    def __init__(self, reads: list, writes: list, vm_reads: list, vm_writes: list):
        self.reads = reads          # in-iovecs, in order: (addr, len)
        self.writes = writes        # out-iovecs, in order
        self.vm_reads = vm_reads    # regions over the kernel limit: process_vm instead
        self.vm_writes = vm_writes
        self.in_size = sum(n for _, n in reads)
        self.out_size = sum(n for _, n in writes)

    @classmethod
    def base(cls, cmd: int, arg: int) -> "IoctlLayout":
        size, d = P.ioc_size(cmd), P.ioc_dir(cmd)
        reads = [(arg, size)] if size and d & P.IOC_WRITE else []
        writes = [(arg, size)] if size and d & P.IOC_READ else []
        return cls(reads, writes, [], [])

    def extend(self, reads, writes, name: str, pid: int) -> "IoctlLayout":
        r, w, vr, vw = list(self.reads), list(self.writes), list(self.vm_reads), list(self.vm_writes)
        for new, kern, vm, total in ((reads, r, vr, self.in_size), (writes, w, vw, self.out_size)):
            for addr, n in new:
                if n <= 0 or _covered(kern, addr, n) is not None or _covered(vm, addr, n) is not None:
                    continue
                if total + n > IOCTL_MAX or len(r) + len(w) >= P.IOCTL_MAX_IOV:
                    log.info("%s pid %d: ioctl region %#x+%d over the kernel's retry limit; using process_vm",
                             name, pid, addr, n)
                    vm.append((addr, n))
                    continue
                kern.append((addr, n))
                total += n
        return IoctlLayout(r, w, vr, vw)

    def iovecs(self) -> bytes:
        return b"".join(P.IOVEC.pack(a, n) for a, n in self.reads + self.writes)


class RetryMemory:
    """Caller memory fetched by the kernel through FUSE_IOCTL_RETRY (CUSE)."""

    def __init__(self, pid: int, layout: IoctlLayout, indata: memoryview):
        self.pid = pid
        self.layout = layout
        self.inbufs: list[bytes] = []
        pos = 0
        for _, n in layout.reads:
            self.inbufs.append(bytes(indata[pos:pos + n]))
            pos += n
        # Out-iovecs are copied back whole: start them from the caller's current bytes.
        self.outbufs: list[bytearray] = []
        for addr, n in layout.writes:
            i = _covered(layout.reads, addr, n)
            if i is not None:
                a = layout.reads[i][0]
                self.outbufs.append(bytearray(self.inbufs[i][addr - a:addr - a + n]))
            else:
                try:
                    self.outbufs.append(sysapi.vm_read(pid, addr, n))
                except OSError:
                    self.outbufs.append(bytearray(n))

    def require(self, reads=(), writes=()) -> None:
        lay = self.layout
        mr = [(a, n) for a, n in reads if n > 0 and _covered(lay.reads, a, n) is None
              and _covered(lay.vm_reads, a, n) is None]
        mw = [(a, n) for a, n in writes if n > 0 and _covered(lay.writes, a, n) is None
              and _covered(lay.vm_writes, a, n) is None]
        if mr or mw:
            raise NeedMemory(mr, mw)

    def read(self, addr: int, length: int) -> bytes:
        i = _covered(self.layout.writes, addr, length)
        if i is not None:
            a = self.layout.writes[i][0]
            return bytes(self.outbufs[i][addr - a:addr - a + length])
        i = _covered(self.layout.reads, addr, length)
        if i is not None:
            a = self.layout.reads[i][0]
            return self.inbufs[i][addr - a:addr - a + length]
        return bytes(sysapi.vm_read(self.pid, addr, length))

    def write(self, addr: int, data) -> None:
        n = len(data)
        i = _covered(self.layout.writes, addr, n)
        if i is None:
            sysapi.vm_write(self.pid, addr, data)
            return
        a = self.layout.writes[i][0]
        self.outbufs[i][addr - a:addr - a + n] = data
