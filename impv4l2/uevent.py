"""Kernel uevents and sysfs enumeration with the standard library only.

What pyudev and libudev would give the hot-plug monitor, for a camera that has
neither (thingino: uClibc, busybox mdev): a NETLINK_KOBJECT_UEVENT socket bound
to the kernel's multicast group, a parser for its ``action@devpath\\0KEY=VALUE\\0…``
messages, and the sys_names of the devices that exist now, read from sysfs the
way libudev's enumerator reads them.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("impv4l2.uevent")

NETLINK_KOBJECT_UEVENT = 15  # not in Python's socket module
KERNEL_GROUP = 1  # the kernel's uevents; group 2 is udevd's re-broadcast ("libudev" header)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # asm-generic and MIPS alike
# Room for a burst (module loads, coldplug triggers) while our thread is busy:
# a kernel uevent skb costs a few KiB of truesize, so ~1 MiB holds a few hundred.
# It is a limit, not an allocation: memory is only used while events wait.
DEFAULT_RCVBUF = 1 << 20
# A message is at most UEVENT_BUFFER_SIZE (2048) of environment plus the header
# line (action@devpath); devpaths are far below 4 KiB.
MAX_MESSAGE = 8192


class Overrun(Exception):
    """The kernel dropped uevents (ENOBUFS): the reader must re-read the state from sysfs."""


def sys_name_of(devpath: str) -> str:
    """The device's name as libudev spells it: the last component of its devpath,
    with sysfs's '!' for '/' undone (block devices such as ``cciss!c0d0``)."""
    return devpath.rstrip("/").rpartition("/")[2].replace("!", "/")


@dataclasses.dataclass(frozen=True)
class Uevent:
    """One kernel uevent: its action, devpath and environment (ACTION, DEVPATH, SUBSYSTEM, …)."""

    action: str
    devpath: str
    env: Mapping[str, str]

    @property
    def sys_name(self) -> str:
        return sys_name_of(self.devpath)

    @property
    def subsystem(self) -> str:
        return self.env.get("SUBSYSTEM", "")

    @property
    def devname(self) -> str | None:
        return self.env.get("DEVNAME")

    @property
    def seqnum(self) -> int | None:
        try:
            return int(self.env["SEQNUM"])
        except (KeyError, ValueError):
            return None

    @property
    def old_sys_name(self) -> str | None:
        """For a ``move`` (rename): the name the device had before."""
        old = self.env.get("DEVPATH_OLD")
        return sys_name_of(old) if old else None


def parse(data: bytes) -> Uevent | None:
    """A kernel uevent message, or None for anything else (udevd's ``libudev``
    messages, garbage).  A repeated key keeps its last value: the kernel appends
    its own SEQNUM to messages it relays."""
    fields = data.split(b"\0")
    header = fields[0]
    if header == b"libudev" or b"@" not in header:
        return None
    env: dict[str, str] = {}
    for field in fields[1:]:
        key, sep, value = field.partition(b"=")
        if sep and key:
            # sysfs names are bytes; surrogateescape keeps any byte round-trippable
            env[key.decode("ascii", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    head_action, _, head_path = header.decode("utf-8", "surrogateescape").partition("@")
    action = env.get("ACTION", head_action)
    devpath = env.get("DEVPATH", head_path)
    if not action or not devpath.startswith("/"):
        return None
    return Uevent(action, devpath, env)


class UeventSocket:
    """A non-blocking NETLINK_KOBJECT_UEVENT socket on the kernel's group.

    Only messages whose sender is the kernel (netlink portid 0) are returned: a
    process with CAP_NET_ADMIN may multicast to the group, and its messages
    arrive with its own portid.  (Since Linux 4.18 a CAP_SYS_ADMIN process can
    also have the kernel relay a message, which then arrives from portid 0 —
    root's privilege, indistinguishable from a real uevent, as for udev.)
    :attr:`ignored` counts the messages dropped for sender or format.
    """

    def __init__(self, rcvbuf: int = DEFAULT_RCVBUF, group: int = KERNEL_GROUP):
        self._sock = socket.socket(socket.AF_NETLINK,
                                   socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                                   NETLINK_KOBJECT_UEVENT)
        try:
            self._set_rcvbuf(rcvbuf)
            self._sock.bind((0, group))  # portid 0: the kernel picks ours
        except BaseException:
            self._sock.close()
            raise
        self._buf = bytearray(MAX_MESSAGE)
        self.ignored = 0

    def _set_rcvbuf(self, size: int) -> None:
        # SO_RCVBUF is capped by net.core.rmem_max (often 208 KiB); root may exceed it.
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    @property
    def rcvbuf(self) -> int:
        """The receive buffer the kernel granted (it doubles what was asked, for overhead)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self) -> Uevent | None:
        """The next kernel uevent, or None when none is queued.  Raises :class:`Overrun`
        once after the kernel dropped messages; the queued ones follow."""
        while True:
            try:
                n, _, flags, (pid, _groups) = self._sock.recvmsg_into([self._buf])
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise Overrun("uevents lost: receive buffer overrun") from None
                raise
            if pid != 0 or flags & socket.MSG_TRUNC:
                self.ignored += 1
                log.debug("uevent ignored: %s", "sender portid %d" % pid if pid else "truncated")
                continue
            event = parse(bytes(self._buf[:n]))
            if event is None:
                self.ignored += 1
                continue
            return event

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "UeventSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _device_entries(path: str) -> list[str]:
    """Names of the device links (or, on old sysfs, directories) in ``path``; class
    attribute files such as /sys/class/firmware/timeout are not devices."""
    try:
        with os.scandir(path) as it:
            return [e.name for e in it
                    if not e.name.startswith(".") and (e.is_symlink() or e.is_dir(follow_symlinks=False))]
    except OSError:  # a class or bus that went away meanwhile, or no such directory
        return []


def enumerate_sys_names(sysfs: str = "/sys") -> set[str]:
    """The sys_names of the devices that exist, as pyudev's ``Context().list_devices()``
    yields them: libudev reads /sys/bus/*/devices/* and /sys/class/*/* (and
    /sys/block on kernels without /sys/class/block).  Two directory levels of
    listings, no per-device stat: about a millisecond, where walking
    /sys/devices costs tens."""
    names: set[str] = set()
    bus = os.path.join(sysfs, "bus")
    for b in _device_entries(bus):
        names.update(_device_entries(os.path.join(bus, b, "devices")))
    cls = os.path.join(sysfs, "class")
    classes = _device_entries(cls)
    for c in classes:
        names.update(_device_entries(os.path.join(cls, c)))
    if "block" not in classes:
        names.update(_device_entries(os.path.join(sysfs, "block")))
    return {n.replace("!", "/") for n in names}
