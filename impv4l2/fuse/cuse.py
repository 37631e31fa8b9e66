"""A CUSE character device (/dev/<name>) for one Device.

Each device has its own /dev/cuse fd and thread.  ioctls are unrestricted:
the kernel asks first with no data and we answer FUSE_IOCTL_RETRY with the
iovecs we need (the top-level struct by _IOC_DIR/_IOC_SIZE, then every region
the handler's UserMemory.require() names), in-iovecs first.  CUSE has no mmap.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

from .. import fileops
from . import proto as P
from .server import Node, Server
from .usermem import IOCTL_MAX

log = logging.getLogger("impv4l2.fuse")


def cuse_available() -> bool:
    """True when /dev/cuse exists and opens (cuse.ko loaded, enough privilege)."""
    try:
        fd = os.open("/dev/cuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


class CuseServer(Server):
    """Serves one :class:`fileops.Device` as the character device /dev/<device.name>.

    ``major``/``minor`` ask for a specific device number (0: the kernel picks
    a dynamic major).  ``devnum`` is the (major, minor) actually assigned.
    """

    kind = "cuse"

    def __init__(self, device: fileops.Device, *, major: int = 0, minor: int = 0):
        super().__init__()
        self.device = device
        self.devname = device.name
        self.major = major
        self.minor = minor
        self.devnum: tuple[int, int] = (0, 0)
        self._node = Node(device, 0)
        self._nodes[0] = self._node
        self._ops[P.CUSE_INIT] = self._op_cuse_init

    @property
    def label(self) -> str:
        return self.devname

    def start(self, timeout: float = 5.0) -> None:
        """Open /dev/cuse, create the device, return once /dev/<name> has a number."""
        self._fd = os.open("/dev/cuse", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._attach(self._node)
        self._start_loop(f"impv4l2-cuse:{self.devname}")
        deadline = time.monotonic() + timeout
        if not self._init_done.wait(timeout) or self._init_error:
            err = self._init_error or "no CUSE_INIT from the kernel"
            self.stop()
            raise OSError(errno.EPROTO, f"{self.devname}: {err}")
        sysdev = f"/sys/class/cuse/{self.devname}/dev"
        while time.monotonic() < deadline:
            try:
                with open(sysdev) as f:
                    major, minor = f.read().strip().split(":")
                self.devnum = (int(major), int(minor))
                break
            except (OSError, ValueError):
                if not self._thread.is_alive():
                    break
                time.sleep(0.005)
        if self.devnum == (0, 0):
            self.stop()
            raise OSError(errno.ENODEV, f"{self.devname}: the kernel refused the device (name or number taken?)")
        log.info("%s: CUSE device %d:%d, FUSE 7.%d", self.devname, *self.devnum, self._minor)

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread and close the fd: the character device vanishes.

        Closing /dev/cuse aborts waiting requests with ECONNABORTED, which
        clients do not expect from a V4L2 node; so the node is first marked
        removed (parked and new requests get ENODEV) and served until quiet.
        """
        if self._fd >= 0 and self._thread and self._thread.is_alive() and not self._node.removed:
            self._node.removed = True
            self._node.wake()
            deadline = time.monotonic() + 0.2
            seen = -1
            while seen != self.requests and time.monotonic() < deadline:
                seen = self.requests
                time.sleep(0.05)
        self._stopping = True
        if self._evfd >= 0:
            os.eventfd_write(self._evfd, 1)
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._detach_waker(self._node)
        self._close_fds()

    def __enter__(self) -> "CuseServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _node_for_open(self, nodeid: int) -> Node | None:
        return self._node

    def _name_of(self, nodeid: int) -> str:
        return self.devname

    def _op_cuse_init(self, unique, nodeid, uid, gid, pid, p) -> None:
        major, minor, _, _ = P.CUSE_INIT_IN.unpack_from(p)
        if not self._accept_version(unique, major, minor):
            return
        out = P.CUSE_INIT_OUT.pack(P.KERNEL_MAJOR, self._minor, 0, P.CUSE_UNRESTRICTED_IOCTL,
                                   IOCTL_MAX, IOCTL_MAX, self.major, self.minor)
        self._reply(unique, out + f"DEVNAME={self.devname}\0".encode())
        self._init_done.set()
