"""Daemon side of the preload shim: the SHIM_INFO ioctl and the memfd handover.

A client running under ``libimpv4l2-preload.so`` that mmaps a CUSE node asks
the node (``VIDIOC_IMPV4L2_SHIM_INFO``, answered by :meth:`ShimServer.info_ioctl`
through the server the daemon handed the node) where its memory is, asks on
every mmap whether that mapping is allowed (``VIDIOC_IMPV4L2_SHIM_MMAP``,
:meth:`ShimServer.mmap_ioctl`: the device model's vb2_mmap checks for that open file), connects to the :class:`ShimServer` socket and receives
the node's memfd with SCM_RIGHTS — only if SO_PEERCRED says the connecting
process really has that node open (read-only holders get a read-only fd).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import stat
import threading
from typing import Any, Callable, Protocol

from . import protocol

log = logging.getLogger("impv4l2.shim")

PRELOAD_NAME = "libimpv4l2-preload"


class _MemoryOwner(Protocol):
    """What a registered node must offer (a fileops.Device does)."""

    name: str
    memory: Any  # fileops.SharedMemory | None: .fd and .size


class ShimServer:
    """Hands each node's memfd to shim clients that have the node open.

    ``address``: a unix socket path, or ``@name`` for the abstract namespace
    (default ``@impv4l2-shim-<pid>``: nothing to clean up after a crash).
    """

    def __init__(self, address: str | None = None):
        self.address = address or f"@impv4l2-shim-{os.getpid()}"
        if len(self.address.encode()) > protocol.SOCKET_MAX:
            raise ValueError(f"shim socket name too long: {self.address}")
        self._nodes: dict[str, tuple[_MemoryOwner, int | None]] = {}
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._served_pids: set[int] = set()
        self._hinted_pids: set[int] = set()
        self.handovers = 0  # memfds sent (for tests and benchmarks)

    # ------------------------------------------------------------ nodes
    def register(self, device: _MemoryOwner, rdev: int | None = None) -> None:
        """Serve ``device.memory`` for node ``device.name``.

        ``rdev``: the CUSE node's device number; by default looked up when a
        client asks (``/sys/class/cuse/<name>/dev``, else ``/dev/<name>``)."""
        with self._lock:
            self._nodes[device.name] = (device, rdev)

    def attach(self, device: _MemoryOwner, rdev: int | None = None) -> None:
        """:meth:`register` a node and hand it this server as ``device.shim``: its
        handles answer the shim's private ioctls through it (impv4l2.v4l2.node)."""
        self.register(device, rdev)
        device.shim = self

    def unregister(self, name: str) -> None:
        with self._lock:
            entry = self._nodes.pop(name, None)
        if entry is not None and getattr(entry[0], "shim", None) is self:
            entry[0].shim = None

    def _node(self, name: str) -> tuple[_MemoryOwner, int | None] | None:
        with self._lock:
            return self._nodes.get(name)

    @staticmethod
    def node_rdev(name: str) -> int | None:
        """The device number of the CUSE node ``name`` (None: no such node)."""
        try:
            with open(f"/sys/class/cuse/{name}/dev") as f:
                major, minor = f.read().strip().split(":")
            return os.makedev(int(major), int(minor))
        except (OSError, ValueError):
            pass
        try:
            st = os.lstat(f"/dev/{name}")  # never follow a link into our own mount (self-deadlock)
        except OSError:
            return None
        return st.st_rdev if stat.S_ISCHR(st.st_mode) else None

    # ------------------------------------------------------------ ioctl
    def info_ioctl(self, node_name: str, arg: bytearray | Any) -> int:
        """Fill ``arg`` (struct impv4l2_shim_info, any writable buffer) for ``node_name``; 0 or OSError."""
        entry = self._node(node_name)
        if entry is None or self._sock is None:
            raise OSError(errno.ENOTTY, f"{node_name}: no shim server for this node")
        mem = entry[0].memory
        size, mem_id = 0, 0
        if mem is not None and getattr(mem, "fd", -1) >= 0:
            size, mem_id = mem.size, os.fstat(mem.fd).st_ino
        memoryview(arg).cast("B")[:protocol.INFO.size] = protocol.pack_info(
            node_name, self.address, size, mem_id, os.getpid())
        return 0

    def mmap_ioctl(self, node_name: str, arg: "ShimMmapArg", check: Callable[[int, int, int], int]) -> int:
        """VIDIOC_IMPV4L2_SHIM_MMAP: ``check(offset, length, prot)`` is the calling
        file's verdict on that mmap (0 or an errno, as vb2_mmap).

        The verdict goes into ``arg.error`` (the ioctl itself succeeds, so the shim
        tells "refused" from "not answered"); ``arg.info`` gets the SHIM_INFO answer."""
        self.info_ioctl(node_name, arg.info)
        arg.error = check(arg.offset, arg.length, arg.prot)
        return 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind the socket and serve it from a thread."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        addr = protocol.socket_address(self.address)
        if isinstance(addr, str):
            try:
                os.unlink(addr)  # a leftover of a crashed daemon
            except FileNotFoundError:
                pass
        s.bind(addr)
        if isinstance(addr, str):
            os.chmod(addr, 0o666)  # access is decided by SO_PEERCRED, not file modes
        s.listen(16)
        self._sock = s
        self._thread = threading.Thread(target=self._accept_loop, name="impv4l2-shim", daemon=True)
        self._thread.start()
        log.info("shim socket %s", self.address)

    def stop(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            s.close()
            addr = protocol.socket_address(self.address)
            if isinstance(addr, str):
                try:
                    os.unlink(addr)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._thread = None

    def __enter__(self) -> "ShimServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ handover
    def _accept_loop(self) -> None:
        sock = self._sock
        while sock is not None and self._sock is sock:
            try:
                conn, _ = sock.accept()
            except OSError:
                break
            # One short-lived thread per client: a stalled peer delays nobody.
            threading.Thread(target=self._serve_conn, args=(conn,), name="impv4l2-shim-conn",
                             daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2.0)
            try:
                pid, uid, _gid = peercred(conn)
                data = conn.recv(protocol.REQUEST.size + 1)
            except OSError as e:
                log.debug("shim: client dropped: %s", e)
                return
            reply, fd, owned = self._answer(pid, uid, data)
            try:
                if fd is None:
                    conn.sendmsg([reply])
                else:
                    conn.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))])
            except OSError as e:
                log.info("shim: pid %d: cannot send reply: %s", pid, e)
            finally:
                if owned and fd is not None:
                    os.close(fd)

    def _answer(self, pid: int, uid: int, data: bytes) -> tuple[bytes, int | None, bool]:
        """(reply, fd to send or None, whether that fd is ours to close)."""
        def fail(err: int, why: str) -> tuple[bytes, None, bool]:
            log.warning("shim: pid %d: %s", pid, why)
            return protocol.REPLY.pack(err, 0, 0, 0), None, False

        if len(data) != protocol.REQUEST.size:
            return fail(errno.EPROTO, f"bad request of {len(data)} bytes")
        magic, version, _r, raw = protocol.REQUEST.unpack(data)
        if magic != protocol.MAGIC or version != protocol.VERSION:
            return fail(errno.EPROTO, f"request magic/version {magic!r}/{version} (shim and driver differ?)")
        name = raw.rstrip(b"\0").decode(errors="replace")
        entry = self._node(name)
        if entry is None:
            return fail(errno.ENODEV, f"asked for unknown node {name!r}")
        dev, rdev = entry
        if rdev is None:
            rdev = self.node_rdev(name)
        if rdev is None:
            return fail(errno.ENODEV, f"{name}: no CUSE device node to check the client against")
        access = open_access(pid, rdev) if pid > 0 else None
        if access is None:
            return fail(errno.EACCES, f"{name}: refused: the process (uid {uid}) does not have "
                                      f"{name} ({os.major(rdev)}:{os.minor(rdev)}) open")
        mem = dev.memory
        if mem is None or getattr(mem, "fd", -1) < 0:
            return fail(errno.ENODEV, f"{name}: node has no buffer memory")
        fd, flags = mem.fd, 0
        if access == os.O_RDONLY:
            # Same rule as the kernel: a read-only opener gets read-only maps.
            fd = os.open(f"/proc/self/fd/{mem.fd}", os.O_RDONLY | os.O_CLOEXEC)
            flags = protocol.FLAG_READONLY
        with self._lock:
            self._served_pids.add(pid)
            self.handovers += 1
        log.info("%s: memfd (%d bytes%s) handed to pid %d (%s) through the preload shim", name,
                 mem.size, ", read-only" if flags else "", pid, _comm(pid))
        return protocol.REPLY.pack(0, flags, mem.size, os.fstat(mem.fd).st_ino), fd, fd != mem.fd

    # ------------------------------------------------------------ hint
    def note_mmap_client(self, node_name: str, pid: int) -> None:
        """A client asked for MMAP buffers on the CUSE node ``node_name``.

        Logs one hint per pid when the preload shim is not loaded in ``pid``
        (its mmap will fail with ENODEV).  Checked right here, while the client
        waits for its REQBUFS answer: a client that fails at mmap exits at once,
        and a dead pid can no longer be inspected.  It costs two procfs reads,
        once per stream, and never waits on anyone."""
        if pid <= 0 or self._sock is None:
            return
        name = node_name
        with self._lock:
            if pid in self._served_pids or pid in self._hinted_pids:
                return
        if shim_loaded(pid) is not False:
            return
        # Only CUSE lacks mmap: a client of the FUSE file needs no hint.
        entry = self._node(name)
        rdev = (entry[1] if entry and entry[1] is not None else None) or self.node_rdev(name)
        if rdev is None or open_access(pid, rdev) is None:
            return
        with self._lock:
            if len(self._hinted_pids) > 4096:
                self._hinted_pids.clear()
            self._hinted_pids.add(pid)
        log.warning("%s: pid %d (%s) streams MMAP buffers from the CUSE node /dev/%s, where the kernel "
                    "refuses mmap (ENODEV): run it as `impv4l2 run -- <command>` (preload shim) or "
                    "open the FUSE file instead", name, pid, _comm(pid), name)


def peercred(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from SO_PEERCRED."""
    import struct

    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def open_access(pid: int, rdev: int) -> int | None:
    """The widest access mode (os.O_RDONLY/O_WRONLY/O_RDWR) with which process
    ``pid`` holds the character device ``rdev`` open; None if it does not.

    Files on FUSE mounts are never stat()ed: stat follows /proc/PID/fd/N into the
    file's filesystem, and for a file of our own mount that is a FUSE_GETATTR to
    the loop thread that is calling us (REQBUFS on the FUSE file: a deadlock that
    no signal ends).  A CUSE node is a device file, never a file of a FUSE mount."""
    best: int | None = None
    rank = {os.O_RDONLY: 1, os.O_WRONLY: 0, os.O_RDWR: 2}
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return None
    fuse_mounts: set[str] | None = None
    for fd in fds:
        try:  # fdinfo is procfs only: it never reaches the file's filesystem
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
            flags = int(info["flags"], 8)
        except (OSError, KeyError, ValueError):
            continue
        if fuse_mounts is None:
            fuse_mounts = _fuse_mount_ids(pid)
        if info.get("mnt_id") in fuse_mounts:
            continue
        try:
            st = os.stat(f"{base}/{fd}")
        except OSError:
            continue
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != rdev:
            continue
        acc = flags & os.O_ACCMODE
        if best is None or rank.get(acc, 0) > rank.get(best, 0):
            best = acc
    return best


def _fuse_mount_ids(pid: int) -> set[str]:
    """Mount ids (as /proc/PID/fdinfo prints them) of the FUSE filesystems ``pid`` sees."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    out = set()
    for line in lines:
        fields, sep, rest = line.partition(" - ")
        if sep and rest.split(" ", 1)[0].split(".", 1)[0] in ("fuse", "fuseblk"):
            out.add(fields.split(" ", 1)[0])
    return out


def shim_loaded(pid: int) -> bool | None:
    """Is the preload library mapped in ``pid``?  None: cannot tell."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(PRELOAD_NAME in line for line in f)
    except OSError:
        return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


# ---------------------------------------------------------------- ioctl arguments

# The argument of VIDIOC_IMPV4L2_SHIM_INFO in the device model's dispatch table.
SHIM_INFO_STRUCT = ctypes.c_uint8 * protocol.INFO.size


class ShimMmapArg(ctypes.Structure):
    """struct impv4l2_shim_mmap, the argument of VIDIOC_IMPV4L2_SHIM_MMAP."""

    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64), ("prot", ctypes.c_uint32),
                ("error", ctypes.c_int32), ("info", SHIM_INFO_STRUCT)]


SHIM_MMAP_STRUCT = ShimMmapArg
assert ctypes.sizeof(ShimMmapArg) == protocol.MMAP_SIZE
