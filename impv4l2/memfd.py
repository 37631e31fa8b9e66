"""Buffer memory of a node: one memfd, mapped once into the driver.

The device model allocates buffers at offsets of it and the backend writes
frames into them in place (numpy views over :meth:`MemfdMemory.view`).  The
transport that serves the node's file attaches *sync hooks*: a FUSE mount in
cached or direct-io mode pushes the bytes into the kernel page cache
(NOTIFY_STORE) or fetches what a client wrote (NOTIFY_RETRIEVE); passthrough
mounts and the preload shim map the memfd itself and need no hook.
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import Callable

PAGE = mmap.PAGESIZE

SyncTo = Callable[[int, int], None]
SyncFrom = Callable[[int, int], bool]


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
        self._map: mmap.mmap | None = None
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
                self._map = mmap.mmap(self.fd, self._reserve, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)

    def view(self, offset: int, length: int) -> memoryview:
        if offset < 0 or offset + length > self._size:
            raise ValueError(f"view {offset}+{length} outside memory of {self._size}")
        assert self._map is not None
        return memoryview(self._map)[offset:offset + length]

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

    def sync_from_client(self, offset: int, length: int) -> bool:
        return all([hook(offset, length) for hook in self._from_hooks])

    def close(self) -> None:
        with self._lock:
            if self._map is not None:
                try:
                    self._map.close()
                except BufferError:
                    pass  # views still exported; the mapping dies with them
                self._map = None
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
