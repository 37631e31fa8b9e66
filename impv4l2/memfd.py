"""Buffer memory of a node: one memfd, mapped once into the driver.

The device model allocates buffers at offsets of it and the backend writes
frames into them in place (numpy views over :meth:`MemfdMemory.view`).  The
transport that serves the node's file attaches *sync hooks*: a FUSE mount in
cached or direct-io mode pushes the bytes into the kernel page cache
(NOTIFY_STORE) or fetches what a client wrote (NOTIFY_RETRIEVE); passthrough
mounts and the preload shim map the memfd itself and need no hook.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from typing import Callable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_NORESERVE = 0x4000


def _map_reserve(fd: int, length: int) -> tuple[int, memoryview]:
    """MAP_SHARED ``length`` bytes of ``fd`` even past its end (Python's mmap refuses that)."""
    addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_NORESERVE, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of buffer memory: {os.strerror(err)}")
    return addr, memoryview((ctypes.c_char * length).from_address(addr)).cast("B")

PAGE = mmap.PAGESIZE

SyncTo = Callable[[int, int], None]
# (offset, length, done): False = a fetch is in flight and done() is called when it lands
SyncFrom = Callable[[int, int, Callable[[], None] | None], bool]


def page_align(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


class MemfdMemory:
    """A growable memfd with a persistent writable mapping (implements fileops.SharedMemory)."""

    def __init__(self, name: str, size: int = 0, reserve: int = 1 << 30):
        self.fd = os.memfd_create(f"impv4l2-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._lock = threading.Lock()
        # Reserve address space once so views stay valid when the file grows.
        self._reserve = reserve
        self._size = 0
        self._map: memoryview | None = None
        self._to_hooks: list[SyncTo] = []
        self._from_hooks: list[SyncFrom] = []
        if size:
            self.resize(size)

    @property
    def size(self) -> int:
        return self._size

    def resize(self, size: int) -> None:
        size = page_align(size)
        with self._lock:
            if size > self._reserve:
                raise OSError(12, f"buffer memory of {size} bytes exceeds the {self._reserve} reserved")
            os.ftruncate(self.fd, size)
            self._size = size
            if self._map is None and size:
                # MAP_SHARED over the reserve: pages past EOF fault only if touched.
                self._addr, self._map = _map_reserve(self.fd, self._reserve)

    def view(self, offset: int, length: int) -> memoryview:
        if offset < 0 or offset + length > self._size:
            raise ValueError(f"view {offset}+{length} outside memory of {self._size}")
        assert self._map is not None
        return self._map[offset:offset + length]

    def add_sync_hooks(self, to_client: SyncTo | None = None, from_client: SyncFrom | None = None) -> None:
        if to_client:
            self._to_hooks.append(to_client)
        if from_client:
            self._from_hooks.append(from_client)

    def remove_sync_hooks(self, to_client: SyncTo | None = None, from_client: SyncFrom | None = None) -> None:
        if to_client in self._to_hooks:
            self._to_hooks.remove(to_client)
        if from_client in self._from_hooks:
            self._from_hooks.remove(from_client)

    def sync_to_client(self, offset: int, length: int) -> None:
        for hook in self._to_hooks:
            hook(offset, length)

    def sync_from_client(self, offset: int, length: int, done: Callable[[], None] | None = None) -> bool:
        return all([hook(offset, length, done) for hook in self._from_hooks])

    def close(self) -> None:
        """Free the memory.  The owner stops every producer and consumer first:
        views taken earlier are dead afterwards."""
        with self._lock:
            if self._map is not None:
                self._map.release()
                self._map = None
                _libc.munmap(self._addr, self._reserve)  # else every closed node leaks 1 GiB of address space
            if self.fd >= 0:
                os.ftruncate(self.fd, 0)
                os.close(self.fd)
                self.fd = -1
