"""The file-operations interface between a transport and a device.

This is the only contract between ``impv4l2.fuse`` (which speaks the FUSE/CUSE
kernel protocol and knows nothing of V4L2) and ``impv4l2.v4l2`` (the device
model, which never touches ``/dev/fuse``).  It mirrors the kernel's
``struct file_operations``: a :class:`Device` is opened into a :class:`Handle`,
and the handle receives ioctl/read/write/poll/release calls.

Rules for implementers of Device/Handle:

* Calls are made from transport threads and must return quickly: never sleep,
  never wait for a frame.  An operation that has to wait raises
  :class:`WouldBlock`; the transport answers ``EAGAIN`` for O_NONBLOCK handles,
  otherwise parks the request and calls the operation again after the device
  calls the ``wake`` callback it was given (or answers ``EINTR`` when the
  caller is interrupted).  An operation that raises WouldBlock must have had
  no side effect.
* Errors are raised as ``OSError(errno, message)``; the transport replies with
  that errno and logs the message.
* Caller memory beyond the ioctl's top-level struct is reached only through the
  :class:`UserMemory` given to :meth:`Handle.ioctl`.  Call
  :meth:`UserMemory.require` with every region an ioctl will read or write
  *before* any side effect: on CUSE that may raise :class:`NeedMemory`, which
  makes the transport ask the kernel for those regions (FUSE_IOCTL_RETRY) and
  call the ioctl again from the start.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Iterable, Protocol, runtime_checkable

Region = tuple[int, int]  # (user address, length)

POLLIN = 0x001
POLLPRI = 0x002
POLLOUT = 0x004
POLLERR = 0x008
POLLHUP = 0x010
POLLRDNORM = 0x040
POLLWRNORM = 0x100


class WouldBlock(Exception):
    """The operation cannot complete now; retry it after the device wakes."""


class NeedMemory(Exception):
    """Raised by :meth:`UserMemory.require` when regions must be fetched first (CUSE retry)."""

    def __init__(self, reads: list[Region], writes: list[Region]):
        super().__init__(reads, writes)
        self.reads = reads
        self.writes = writes


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who makes a request: from the FUSE request header and the OPEN flags."""

    pid: int
    uid: int
    gid: int
    flags: int = 0  # open(2) flags of the handle (O_NONBLOCK, O_ACCMODE)


class UserMemory(Protocol):
    """The calling process's memory, for pointers found inside ioctl structs."""

    def require(self, reads: Iterable[Region] = (), writes: Iterable[Region] = ()) -> None:
        """Declare regions an ioctl reads and writes; may raise NeedMemory (CUSE)."""

    def read(self, addr: int, length: int) -> bytes:
        """Read caller memory (a required region, or process_vm_readv otherwise)."""

    def write(self, addr: int, data: bytes | memoryview) -> None:
        """Write caller memory (a required region, or process_vm_writev otherwise).

        Large bulk writes (USERPTR frame data) should not be required first:
        they go straight to the caller with process_vm_writev.
        """


@runtime_checkable
class SharedMemory(Protocol):
    """Buffer memory of a node that clients may mmap (a memfd).

    ``mmap(offset)`` of the node file maps ``offset`` of this memory.  The
    device writes frames into it in place; the transport makes them visible to
    clients that map the file.
    """

    fd: int

    @property
    def size(self) -> int: ...

    def resize(self, size: int) -> None: ...

    def view(self, offset: int, length: int) -> memoryview:
        """A writable view of the memory (no copy)."""

    def sync_to_client(self, offset: int, length: int) -> None:
        """Call before handing a filled region to a client (DQBUF)."""

    def sync_from_client(self, offset: int, length: int, done: Callable[[], None] | None = None) -> bool:
        """Call before using data a client wrote through its mapping (QBUF).

        True: the memory is current.  False: a fetch is in flight; try again
        after the device is woken or, from a thread of the device's own,
        after ``done()`` is called (from the transport's thread, once the
        fetch has landed; spurious calls are possible).
        """

    def add_sync_hooks(self, to_client: Callable[[int, int], None] | None = None,
                       from_client: Callable[..., bool] | None = None) -> None:
        """A transport that serves copies of this memory (a FUSE mount in cached or
        direct-io mode) registers how it pushes filled regions to its clients
        (``to_client(offset, length)``) and fetches what they wrote
        (``from_client(offset, length, done) -> bool``, as :meth:`sync_from_client`)."""

    def remove_sync_hooks(self, to_client: Callable[[int, int], None] | None = None,
                          from_client: Callable[..., bool] | None = None) -> None:
        """Forget hooks given to :meth:`add_sync_hooks` (the transport stops serving)."""

    def close(self) -> None:
        """Free the memory (the device's owner, once every transport has let go)."""


class Handle(Protocol):
    """One open file description of a device."""

    def ioctl(self, cmd: int, arg: bytearray, mem: UserMemory) -> int:
        """Run ioctl ``cmd``.

        ``arg`` holds the top-level struct (``_IOC_SIZE(cmd)`` bytes: the
        caller's data if the command has the WRITE direction bit, zeros
        otherwise); modify it in place, it is copied back to the caller if the
        command has the READ direction bit.  Return the ioctl's result (0).
        """

    def read(self, size: int, offset: int) -> bytes | memoryview: ...

    def write(self, data: bytes | memoryview, offset: int) -> int: ...

    def poll(self) -> int:
        """The ready mask now (POLLIN/POLLOUT/POLLPRI/POLLERR...)."""

    def release(self) -> None: ...


class Device(Protocol):
    """A node the transport serves as a CUSE character device and a FUSE file."""

    name: str  # file/DEVNAME name, e.g. "video10"
    memory: SharedMemory | None  # mmap backing (None: no mmap)
    compat32: bool  # handle 32-bit callers' ioctls (else refused with ENOTTY)

    def open(self, caller: Caller) -> Handle: ...

    def add_waker(self, wake: Callable[[], None]) -> None:
        """Add a callback the device calls (from any thread) when a waiting
        operation may now complete or poll readiness changed.

        A device may be served by several transports at once (a CUSE node and
        a FUSE file): every waker added is called on every wake-up, so each
        transport re-runs its own parked requests.  :class:`Wakers` does this.
        """

    def remove_waker(self, wake: Callable[[], None]) -> None:
        """Forget a callback given to :meth:`add_waker` (transport stops serving)."""

    def close(self) -> None:
        """Tear the device down (daemon shutdown, hardware gone): after every transport
        has stopped serving it; open handles are released."""


class Wakers:
    """The wake callbacks of one device, one per transport serving it.

    Calling it calls every callback; adding and removing replace an immutable
    tuple, so a wake from the sensor thread never sees a half-updated set and
    needs no lock.
    """

    def __init__(self) -> None:
        self._all: tuple[Callable[[], None], ...] = ()
        self._lock = threading.Lock()

    def add(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if wake not in self._all:
                self._all = self._all + (wake,)

    def remove(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._all = tuple(w for w in self._all if w != wake)

    def __len__(self) -> int:
        return len(self._all)

    def __call__(self) -> None:
        for wake in self._all:
            wake()
