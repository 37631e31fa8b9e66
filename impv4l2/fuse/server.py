"""The request loop shared by the CUSE and FUSE transports.

One thread per /dev/fuse or /dev/cuse file descriptor reads requests and
answers them through one opcode table.  Device calls never wait: an operation
raising :class:`fileops.WouldBlock` is parked by its unique id and re-run when
the device's wake callback fires (an eventfd wakes the loop), so one client's
wait never stalls another.  Subclasses add the opcodes of their kind (INIT,
LOOKUP... for the mount; CUSE_INIT for CUSE) and the mmap sync machinery.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import threading
from typing import Callable

from .. import fileops
from ..fileops import Caller, NeedMemory, WouldBlock
from . import proto as P
from .usermem import IoctlLayout, RetryMemory, VmMemory

log = logging.getLogger("impv4l2.fuse")

BUFSIZE = (1 << 20) + (1 << 16)   # ≥ header + write_in + max_write (1 MiB)


class Malformed(Exception):
    """A request whose payload does not parse."""


class OpenFile:
    """One open file description: a device handle plus transport state."""

    __slots__ = ("fh", "node", "handle", "flags", "kh", "armed", "last_mask")

    def __init__(self, fh: int, node: "Node", handle: fileops.Handle, flags: int):
        self.fh = fh
        self.node = node
        self.handle = handle
        self.flags = flags
        self.kh = 0
        self.armed = False
        self.last_mask = 0


class Node:
    """A device as served by a transport (a CUSE device or a file of the mount)."""

    def __init__(self, device: fileops.Device, nodeid: int):
        self.device = device
        self.name = device.name
        self.nodeid = nodeid
        self.removed = False
        self.woken = False
        self.files: dict[int, OpenFile] = {}
        self.nlookup = 0
        self.backing_id = 0
        self.pushed_size = 0
        self.hooks: tuple | None = None
        self.retrieves: dict[tuple[int, int], bool] = {}  # (offset, len) -> done
        self.retrieve_parts: dict[tuple[int, int], int] = {}  # replies still expected
        self.retrieve_done: dict[tuple[int, int], list[Callable[[], None]]] = {}  # called when landed
        self.wake: Callable[[], None] = lambda: None  # this transport's waker (Server.attach)


class Parked:
    __slots__ = ("node", "req")

    def __init__(self, node: Node, req: bytes):
        self.node = node
        self.req = req


class Server:
    """A FUSE-protocol request loop on one device fd (see module docstring)."""

    kind = "fuse"

    def __init__(self) -> None:
        self._fd = -1
        self.requests = 0  # requests dispatched (CuseServer.stop waits for quiet)
        self._init_done = threading.Event()  # INIT/CUSE_INIT answered (or refused)
        self._init_error: str | None = None
        self._buf = bytearray(BUFSIZE)
        self._mv = memoryview(self._buf)
        self._evfd = -1
        self._thread: threading.Thread | None = None
        self._loop_tid = 0
        self._stopping = False
        self._wake_flag = False
        self._nodes: dict[int, Node] = {}
        self._files: dict[int, OpenFile] = {}
        self._next_fh = 1
        self._parked: dict[int, Parked] = {}
        self._retry: dict[tuple, IoctlLayout] = {}
        self._cur_req: memoryview = self._mv[:0]
        self._minor = P.MIN_MINOR
        self._ops: dict[int, Callable] = {
            P.OPEN: self._op_open,
            P.RELEASE: self._op_release,
            P.FLUSH: self._op_flush,
            P.READ: self._op_read,
            P.WRITE: self._op_write,
            P.IOCTL: self._op_ioctl,
            P.POLL: self._op_poll,
            P.INTERRUPT: self._op_interrupt,
            P.NOTIFY_REPLY: self._op_notify_reply,
        }

    # ----- loop ---------------------------------------------------------------------------

    def _accept_version(self, unique: int, major: int, minor: int) -> bool:
        """INIT/CUSE_INIT: settle on min(kernel, ours), or refuse a kernel older than 7.22."""
        if major != P.KERNEL_MAJOR or minor < P.MIN_MINOR:
            self._init_error = f"kernel FUSE {major}.{minor} is older than 7.{P.MIN_MINOR}"
            self._error(unique, errno.EPROTO)
            self._init_done.set()
            return False
        self._minor = min(minor, P.MAX_MINOR)
        return True

    def _close_fds(self) -> None:
        """Close the /dev/fuse (or /dev/cuse) fd and the wake-up eventfd."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._evfd >= 0:
            os.close(self._evfd)
            self._evfd = -1

    def _start_loop(self, name: str) -> None:
        self._evfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._loop_tid = threading.get_ident()
        fd, evfd, mv = self._fd, self._evfd, self._mv
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(evfd, select.POLLIN)
        readv = os.readv
        bufs = [mv]
        try:
            while not self._stopping:
                try:
                    n = readv(fd, bufs)
                except BlockingIOError:
                    if self._wake_flag:
                        while self._wake_flag:
                            self._process_wakes()
                        continue
                    for rfd, _ in poller.poll():
                        if rfd == evfd:
                            try:
                                os.eventfd_read(evfd)
                            except BlockingIOError:
                                pass
                    while self._wake_flag:
                        self._process_wakes()
                    continue
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno == errno.ENOENT:   # request aborted while we read it
                        continue
                    if e.errno != errno.ENODEV:
                        log.warning("%s: read from /dev/%s: %s", self.label, self.kind, e)
                    break                         # ENODEV: unmounted / connection aborted
                self._dispatch(mv, n)
                while self._wake_flag:
                    self._process_wakes()
        finally:
            self._loop_ended()

    def _loop_ended(self) -> None:
        """Release every open handle; the fd is closed by the owner."""
        for of in list(self._files.values()):
            try:
                of.handle.release()
            except Exception:
                log.exception("%s: release at shutdown", of.node.name)
        self._files.clear()
        self._parked.clear()

    @property
    def label(self) -> str:
        return self.kind

    @property
    def parked_count(self) -> int:
        """Requests waiting for a device wake-up."""
        return len(self._parked)

    @property
    def open_files(self) -> int:
        return len(self._files)

    def _dispatch(self, mv: memoryview, n: int) -> None:
        if n < P.IN_HEADER.size:
            log.warning("%s: short request of %d bytes ignored", self.label, n)
            return
        length, opcode, unique, nodeid, uid, gid, pid, _, _ = P.IN_HEADER.unpack_from(mv)
        if length != n:
            log.warning("%s: request length %d != read %d (opcode %d, pid %d)", self.label, length, n, opcode, pid)
            self._error(unique, errno.EINVAL)
            return
        self._cur_req = mv[:n]
        self.requests += 1
        op = self._ops.get(opcode)
        if log.isEnabledFor(logging.DEBUG) and opcode != P.IOCTL:
            log.debug("%s %s pid=%d unique=%d", self._name_of(nodeid), P.OPCODE_NAMES.get(opcode, opcode),
                      pid, unique)
        if op is None:
            log.warning("%s: unsupported opcode %s from pid %d: ENOSYS", self._name_of(nodeid),
                        P.OPCODE_NAMES.get(opcode, opcode), pid)
            self._error(unique, errno.ENOSYS)
            return
        try:
            op(unique, nodeid, uid, gid, pid, mv[P.IN_HEADER.size:n])
        except (struct.error, Malformed, IndexError) as e:
            log.warning("%s: malformed %s from pid %d: %s", self._name_of(nodeid),
                        P.OPCODE_NAMES.get(opcode, opcode), pid, e)
            self._error(unique, errno.EINVAL)
        except Exception:
            log.exception("%s: %s from pid %d failed", self._name_of(nodeid), P.OPCODE_NAMES.get(opcode, opcode), pid)
            self._error(unique, errno.EIO)

    def _name_of(self, nodeid: int) -> str:
        node = self._nodes.get(nodeid)
        return node.name if node else self.label

    # ----- sending ------------------------------------------------------------------------

    def _write(self, parts: list) -> None:
        try:
            os.writev(self._fd, parts)
        except OSError as e:
            # ENOENT: the request was interrupted/aborted meanwhile; nothing to answer.
            if e.errno != errno.ENOENT:
                log.warning("%s: write to /dev/%s failed: %s", self.label, self.kind, e)

    def _send(self, parts: list) -> None:
        self._write(parts)

    def _reply(self, unique: int, data: bytes | bytearray | memoryview = b"") -> None:
        self._send([P.OUT_HEADER.pack(16 + len(data), 0, unique), data])

    def _reply_parts(self, unique: int, parts: list) -> None:
        self._send([P.OUT_HEADER.pack(16 + sum(len(x) for x in parts), 0, unique), *parts])

    def _error(self, unique: int, err: int) -> None:
        self._send([P.OUT_HEADER.pack(16, -err, unique)])

    def _notify(self, code: int, payload: list) -> int:
        """Send a notification (unique 0, code in `error`); returns 0 or the errno.  A code the
        negotiated protocol minor lacks is not sent (ENOSYS), as that kernel would fail the write."""
        if P.NOTIFY_SINCE.get(code, P.MAX_MINOR + 1) > self._minor:
            log.warning("%s: notification %d not in FUSE 7.%d: not sent", self.label, code, self._minor)
            return errno.ENOSYS
        size = 16 + sum(len(p) for p in payload)
        try:
            os.writev(self._fd, [P.OUT_HEADER.pack(size, code, 0), *payload])
            return 0
        except OSError as e:
            return e.errno or errno.EIO

    # ----- waking -------------------------------------------------------------------------

    def _attach(self, node: Node) -> None:
        """Start taking the device's wake-ups for ``node`` (beside other transports')."""
        node.wake = self._waker(node)
        node.device.add_waker(node.wake)

    def _detach_waker(self, node: Node) -> None:
        node.device.remove_waker(node.wake)

    def _waker(self, node: Node) -> Callable[[], None]:
        def wake() -> None:
            node.woken = True
            self._wake_flag = True
            if threading.get_ident() != self._loop_tid and self._evfd >= 0:
                try:
                    os.eventfd_write(self._evfd, 1)
                except OSError:
                    pass
        return wake

    def _process_wakes(self) -> None:
        self._wake_flag = False
        for node in list(self._nodes.values()):
            if not node.woken:
                continue
            node.woken = False
            for unique, parked in list(self._parked.items()):
                if parked.node is node and self._parked.get(unique) is parked:
                    del self._parked[unique]
                    req = memoryview(parked.req)
                    self._dispatch(req, len(req))
            for of in list(node.files.values()):
                if not of.armed:
                    continue
                try:
                    mask = fileops.POLLERR | fileops.POLLHUP if node.removed else of.handle.poll()
                except Exception:
                    mask = fileops.POLLERR
                if mask != of.last_mask:
                    of.armed = False
                    self._notify(P.NOTIFY_POLL, [P.NOTIFY_POLL_OUT.pack(of.kh)])

    def _park(self, unique: int, of: OpenFile) -> None:
        self._parked[unique] = Parked(of.node, bytes(self._cur_req))

    def _would_block(self, unique: int, of: OpenFile, flags: int) -> None:
        if flags & os.O_NONBLOCK:
            self._error(unique, errno.EAGAIN)
        else:
            self._park(unique, of)

    def _device_error(self, unique: int, of_or_node, pid: int, what: str, e: OSError) -> None:
        name = of_or_node.name if isinstance(of_or_node, Node) else of_or_node.node.name
        err = e.errno if isinstance(e.errno, int) and e.errno > 0 else errno.EIO
        log.info("%s pid %d: %s -> %s: %s", name, pid, what, errno.errorcode.get(err, err), e.strerror or e)
        self._error(unique, err)

    # ----- file operations ----------------------------------------------------------------

    def _file(self, unique: int, fh: int, pid: int) -> OpenFile | None:
        of = self._files.get(fh)
        if of is None:
            log.warning("%s pid %d: unknown file handle %d", self.label, pid, fh)
            self._error(unique, errno.EBADF)
            return None
        if of.node.removed:
            self._error(unique, errno.ENODEV)
            return None
        return of

    def _node_for_open(self, nodeid: int) -> Node | None:
        return self._nodes.get(nodeid)

    def _open_flags(self, node: Node) -> tuple[int, int]:
        return P.FOPEN_DIRECT_IO, 0

    def _op_open(self, unique, nodeid, uid, gid, pid, p) -> None:
        flags, _ = P.OPEN_IN.unpack_from(p)
        node = self._node_for_open(nodeid)
        if node is None or node.removed:
            self._error(unique, errno.ENODEV if node else errno.ENOENT)
            return
        try:
            handle = node.device.open(Caller(pid, uid, gid, flags))
        except OSError as e:
            self._device_error(unique, node, pid, "open", e)
            return
        except WouldBlock:
            self._error(unique, errno.EAGAIN)
            return
        fh = self._next_fh
        self._next_fh += 1
        of = OpenFile(fh, node, handle, flags)
        self._files[fh] = of
        node.files[fh] = of
        open_flags, backing = self._open_flags(node)
        self._reply(unique, P.OPEN_OUT.pack(fh, open_flags, backing))

    def _op_release(self, unique, nodeid, uid, gid, pid, p) -> None:
        fh = P.RELEASE_IN.unpack_from(p)[0]
        of = self._files.pop(fh, None)
        if of is not None:
            of.node.files.pop(fh, None)
            try:
                of.handle.release()
            except Exception:
                log.exception("%s: release failed", of.node.name)
        self._reply(unique)

    def _op_flush(self, unique, nodeid, uid, gid, pid, p) -> None:
        self._reply(unique)

    def _read_memory(self, unique: int, node: Node, offset: int, size: int) -> None:
        """A page-cache fill of a mapping: answer from the node's memory."""
        mem = node.device.memory
        total = mem.size if mem is not None else 0
        end = min(offset + size, total)
        if end <= offset:
            self._reply(unique)
            return
        self._reply(unique, mem.view(offset, end - offset))

    def _op_read(self, unique, nodeid, uid, gid, pid, p) -> None:
        fh, offset, size, read_flags, _, flags, _ = P.READ_IN.unpack_from(p)
        of = self._file(unique, fh, pid)
        if of is None:
            return
        of.flags = flags
        if self._memory_io(of) and not read_flags & P.READ_LOCKOWNER:
            self._read_memory(unique, of.node, offset, size)
            return
        try:
            data = of.handle.read(size, offset)
        except WouldBlock:
            self._would_block(unique, of, flags)
            return
        except OSError as e:
            self._device_error(unique, of, pid, "read", e)
            return
        self._reply(unique, data[:size])

    def _memory_io(self, of: OpenFile) -> bool:
        """True when un-owned READ/WRITE requests are page-cache traffic of a mapping."""
        return False

    def _op_write(self, unique, nodeid, uid, gid, pid, p) -> None:
        fh, offset, size, write_flags, _, flags, _ = P.WRITE_IN.unpack_from(p)
        data = p[P.WRITE_IN.size:P.WRITE_IN.size + size]
        if len(data) != size:
            raise Malformed(f"write of {size} bytes carries {len(data)}")
        of = self._file(unique, fh, pid)
        if of is None:
            return
        of.flags = flags
        if write_flags & P.WRITE_CACHE and self._memory_io(of):
            mem = of.node.device.memory
            end = min(offset + size, mem.size if mem else 0)
            if end > offset:
                mem.view(offset, end - offset)[:] = data[:end - offset]
            self._reply(unique, P.WRITE_OUT.pack(size, 0))
            return
        try:
            n = of.handle.write(data, offset)
        except WouldBlock:
            self._would_block(unique, of, flags)
            return
        except OSError as e:
            self._device_error(unique, of, pid, "write", e)
            return
        self._reply(unique, P.WRITE_OUT.pack(n, 0))

    def _op_poll(self, unique, nodeid, uid, gid, pid, p) -> None:
        fh, kh, pflags, _ = P.POLL_IN.unpack_from(p)
        of = self._file(unique, fh, pid)
        if of is None:
            return
        try:
            mask = of.handle.poll()
        except OSError as e:
            self._device_error(unique, of, pid, "poll", e)
            return
        if pflags & P.POLL_SCHEDULE_NOTIFY:
            of.kh = kh
            of.armed = True
        of.last_mask = mask
        self._reply(unique, P.POLL_OUT.pack(mask, 0))

    def _op_interrupt(self, unique, nodeid, uid, gid, pid, p) -> None:
        target = P.INTERRUPT_IN.unpack_from(p)[0]
        parked = self._parked.pop(target, None)
        if parked is not None:
            log.debug("%s pid %d: request %d interrupted: EINTR", parked.node.name, pid, target)
            self._error(target, errno.EINTR)
        # INTERRUPT itself is never answered.

    def _op_notify_reply(self, unique, nodeid, uid, gid, pid, p) -> None:
        return None  # only the mount asks for retrieves

    def _op_ioctl(self, unique, nodeid, uid, gid, pid, p) -> None:
        fh, flags, cmd, arg, in_size, out_size = P.IOCTL_IN.unpack_from(p)
        indata = p[P.IOCTL_IN.size:]
        if len(indata) != in_size:
            raise Malformed(f"ioctl in_size {in_size} but {len(indata)} bytes")
        of = self._file(unique, fh, pid)
        if of is None:
            return
        name = of.node.name
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s IOCTL pid=%d cmd=%#010x flags=%#x in=%d out=%d", name, pid, cmd, flags, in_size, out_size)
        # A 32-bit kernel flags every ioctl 32BIT, a 64-bit one only its compat callers': the
        # caller is foreign only when its word size is not this process's (fs/fuse/file.c).
        if bool(flags & P.IOCTL_32BIT) != P.NATIVE_32BIT and not getattr(of.node.device, "compat32", False):
            log.warning("%s pid %d: %d-bit ioctl %#010x refused (device has no compat32): ENOTTY", name, pid,
                        32 if flags & P.IOCTL_32BIT else 64, cmd)
            self._error(unique, errno.ENOTTY)
            return
        if flags & P.IOCTL_UNRESTRICTED:
            self._ioctl_unrestricted(unique, of, pid, cmd, arg, in_size, out_size, indata)
            return
        size, d = P.ioc_size(cmd), P.ioc_dir(cmd)
        if d & P.IOC_WRITE:
            if in_size != size:
                raise Malformed(f"ioctl {cmd:#x} carries {in_size} bytes, _IOC_SIZE is {size}")
            argbuf = bytearray(indata)
        else:
            argbuf = bytearray(size)
        try:
            result = of.handle.ioctl(cmd, argbuf, VmMemory(pid))
        except WouldBlock:
            self._would_block(unique, of, of.flags)
            return
        except NeedMemory:
            log.warning("%s pid %d: ioctl %#010x asked for memory on a restricted transport", name, pid, cmd)
            self._error(unique, errno.EIO)
            return
        except OSError as e:
            self._device_error(unique, of, pid, f"ioctl {cmd:#010x}", e)
            return
        self._after_ioctl(of.node)
        if d & P.IOC_READ and size:
            out = argbuf if len(argbuf) == size else (bytes(argbuf) + bytes(size))[:size]
            self._reply_parts(unique, [P.IOCTL_OUT.pack(result or 0, 0, 0, 0), out[:out_size]])
        else:
            self._reply(unique, P.IOCTL_OUT.pack(result or 0, 0, 0, 0))

    def _after_ioctl(self, node: Node) -> None:
        return None

    def _ioctl_unrestricted(self, unique, of, pid, cmd, arg, in_size, out_size, indata) -> None:
        key = (of.fh, pid, cmd, arg)
        layout = self._retry.get(key)
        if layout is None or layout.in_size != in_size or layout.out_size != out_size:
            layout = IoctlLayout.base(cmd, arg)
            if (layout.in_size, layout.out_size) != (in_size, out_size):
                self._retry_reply(unique, key, layout)
                return
        mem = RetryMemory(pid, layout, indata)
        size, d = P.ioc_size(cmd), P.ioc_dir(cmd)
        argbuf = bytearray(mem.inbufs[0]) if size and d & P.IOC_WRITE else bytearray(size)
        try:
            result = of.handle.ioctl(cmd, argbuf, mem)
        except NeedMemory as e:
            self._retry_reply(unique, key, layout.extend(e.reads, e.writes, of.node.name, pid))
            return
        except WouldBlock:
            self._would_block(unique, of, of.flags)
            return
        except OSError as e:
            self._retry.pop(key, None)
            self._device_error(unique, of, pid, f"ioctl {cmd:#010x}", e)
            return
        self._retry.pop(key, None)
        self._after_ioctl(of.node)
        parts = [P.IOCTL_OUT.pack(result or 0, 0, 0, 0)]
        for i, (addr, n) in enumerate(layout.writes):
            if i == 0 and size and d & P.IOC_READ:
                parts.append((bytes(argbuf) + bytes(size))[:size] if len(argbuf) != size else argbuf)
            else:
                parts.append(mem.outbufs[i])
        self._reply_parts(unique, parts)

    def _retry_reply(self, unique: int, key: tuple, layout: IoctlLayout) -> None:
        self._retry[key] = layout
        self._reply_parts(unique, [P.IOCTL_OUT.pack(0, P.IOCTL_RETRY, len(layout.reads), len(layout.writes)),
                                   layout.iovecs()])
