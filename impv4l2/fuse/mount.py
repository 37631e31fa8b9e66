"""A FUSE mount: a directory of device files, one per Device, with working mmap.

mount(2) with an fd of /dev/fuse (no fusermount).  ioctls are restricted
(the kernel copies ``_IOC_SIZE`` by the direction bits), so pointers inside
structs are followed with process_vm_readv/writev on the caller's pid.

mmap backing of ``Device.memory`` (a memfd), by mode:

* ``passthrough``: FOPEN_PASSTHROUGH with the memfd as backing file
  (FUSE_DEV_IOC_BACKING_OPEN; kernel ≥ 6.9, root).  Zero copy; note that
  read()/write() of such a file then reach the memfd too, not Device.read/write.
* ``direct``: FOPEN_DIRECT_IO + FUSE_DIRECT_IO_ALLOW_MMAP (≥ 6.6); read(2) and
  write(2) reach the device, the mapping is the page cache, kept in sync with
  NOTIFY_STORE (sync_to_client) and NOTIFY_RETRIEVE (sync_from_client).
* ``cached``: the page cache serves read(2) and mappings alike (Device.read is
  unreachable for files with memory); same sync as ``direct``.

NOTIFY_STORE takes page locks that a pending FUSE_READ of the same page holds,
so stores requested from the loop thread (an ioctl handler calling
sync_to_client) are written by a separate writer thread, followed by the
ioctl's reply; stores requested from other threads are written right there.
"""

from __future__ import annotations

import errno
import grp
import logging
import mmap
import os
import queue
import stat
import threading
import time
from typing import Callable

from .. import fileops
from . import proto as P
from . import sysapi
from .server import Node, Server

log = logging.getLogger("impv4l2.fuse")

MODES = ("auto", "passthrough", "direct", "cached")
ROOT = 1
STORE_CHUNK = 1 << 20


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def stale_mounts(mountpoint: str) -> list[str]:
    """FUSE mounts at ``mountpoint`` listed in /proc/mounts (e.g. of a crashed run)."""
    found = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and _unescape(fields[1]) == mountpoint and fields[2].startswith("fuse"):
                found.append(fields[2])
    return found


def cleanup_stale(mountpoint: str) -> int:
    """Lazily unmount every FUSE mount stacked at ``mountpoint``; returns how many."""
    n = 0
    while stale_mounts(mountpoint) and n < 16:
        log.warning("%s: removing stale FUSE mount (a previous run died?)", mountpoint)
        sysapi.umount2(mountpoint, sysapi.MNT_DETACH)
        n += 1
    return n


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("no group %r: FUSE files get the daemon's group %d", group, os.getgid())
        return os.getgid()


class FuseMount(Server):
    """A FUSE mount serving one regular file per :class:`fileops.Device`.

    ``add``/``remove`` work live (hot-plug); ops on handles of a removed device
    get ENODEV.  ``mmap_mode`` is the mode actually in use after ``start``.
    """

    kind = "fuse"

    def __init__(self, mountpoint: str = "/run/impv4l2", *, mmap_mode: str = "auto",
                 group: str = "video", file_mode: int = 0o660):
        super().__init__()
        if mmap_mode not in MODES:
            raise ValueError(f"mmap_mode must be one of {MODES}")
        self.mountpoint = os.path.abspath(mountpoint)
        # The same access as the CUSE nodes' udev rule (root:video 0660); the kernel
        # enforces it (default_permissions), so no request of a stranger reaches us.
        self.file_mode = file_mode
        self.gid = _group_id(group)
        self.requested_mode = mmap_mode
        self.mmap_mode = mmap_mode
        self._lock = threading.Lock()
        self._by_name: dict[str, Node] = {}
        self._next_nodeid = ROOT + 1
        self._mounted = False
        self._t0 = int(time.time())
        self._deferred_stores: list = []
        self._writer_q: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._max_write = 1 << 20
        self._retrieve_ids: dict[int, tuple] = {}   # notify_unique -> (node, (offset, len))
        self._retrieve_lock = threading.Lock()   # retrieve state: device threads vs the loop
        self._next_retrieve = 0
        self._ops.update({
            P.INIT: self._op_init,
            P.LOOKUP: self._op_lookup,
            P.FORGET: self._op_forget,
            P.BATCH_FORGET: self._op_batch_forget,
            P.GETATTR: self._op_getattr,
            P.SETATTR: self._op_getattr,   # truncate & co. are no-ops: answer the attributes
            P.OPENDIR: self._op_opendir,
            P.READDIR: self._op_readdir,
            P.RELEASEDIR: self._op_releasedir,
            P.STATFS: self._op_statfs,
            P.DESTROY: self._op_destroy,
        })

    @property
    def label(self) -> str:
        return self.mountpoint

    # ----- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> None:
        """Mount (cleaning a stale mount first) and serve; returns after INIT."""
        cleanup_stale(self.mountpoint)
        os.makedirs(self.mountpoint, exist_ok=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        opts = f"fd={self._fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},allow_other,default_permissions"
        try:
            sysapi.mount("impv4l2", self.mountpoint, "fuse.impv4l2", sysapi.MS_NOSUID | sysapi.MS_NODEV, opts)
        except OSError:
            os.close(self._fd)
            self._fd = -1
            raise
        self._mounted = True
        self._writer = threading.Thread(target=self._writer_run, name="impv4l2-fuse-store", daemon=True)
        self._writer.start()
        self._start_loop(f"impv4l2-fuse:{self.mountpoint}")
        if not self._init_done.wait(timeout) or self._init_error:
            err = self._init_error or "no FUSE_INIT from the kernel"
            self.stop()
            raise OSError(errno.EPROTO, f"{self.mountpoint}: {err}")
        log.info("%s: mounted, FUSE 7.%d, mmap mode %s", self.mountpoint, self._minor, self.mmap_mode)

    def stop(self, timeout: float = 1.0) -> None:
        """Unmount, stop the threads, close the fd (aborting the connection)."""
        self._stopping = True
        if self._mounted:
            try:
                sysapi.umount2(self.mountpoint, sysapi.MNT_DETACH)
            except OSError as e:
                log.warning("%s: umount: %s", self.mountpoint, e)
            self._mounted = False
        if self._evfd >= 0:
            os.eventfd_write(self._evfd, 1)
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._writer:
            self._writer_q.put(None)
            self._writer.join(timeout)
            self._writer = None
        with self._lock:
            for node in self._by_name.values():
                self._detach(node)
            self._by_name.clear()
        self._close_fds()  # the last /dev/fuse fd: the kernel aborts the connection

    def __enter__(self) -> "FuseMount":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- devices --------------------------------------------------------------------------

    def add(self, device: fileops.Device) -> str:
        """Serve ``device`` as ``<mountpoint>/<device.name>``; returns that path."""
        with self._lock:
            if device.name in self._by_name:
                raise FileExistsError(errno.EEXIST, f"{device.name} already served")
            node = Node(device, self._next_nodeid)
            self._next_nodeid += 1
            self._nodes[node.nodeid] = node
            self._by_name[node.name] = node
        self._attach(node)
        self._attach_hooks(node)
        log.info("%s: added %s", self.mountpoint, node.name)
        return os.path.join(self.mountpoint, node.name)

    def remove(self, name: str) -> None:
        """Stop serving a device: its file disappears, open handles get ENODEV."""
        with self._lock:
            node = self._by_name.pop(name, None)
        if node is None:
            raise FileNotFoundError(errno.ENOENT, f"{name} not served")
        node.removed = True
        self._detach(node)
        node.wake()   # parked requests end with ENODEV, pollers see POLLHUP
        log.info("%s: removed %s", self.mountpoint, name)

    def _detach(self, node: Node) -> None:
        self._detach_waker(node)
        if node.hooks:
            mem = node.device.memory
            if mem is not None:
                mem.remove_sync_hooks(*node.hooks)
            node.hooks = None
        if node.backing_id and self._fd >= 0:
            try:
                sysapi.ioctl_int(self._fd, P.DEV_IOC_BACKING_CLOSE, node.backing_id.to_bytes(4, "little"))
            except OSError:
                pass
            node.backing_id = 0

    # ----- mmap modes -----------------------------------------------------------------------

    def _attach_hooks(self, node: Node) -> None:
        if self.mmap_mode == "passthrough" or node.hooks or not self._init_done.is_set():
            return
        mem = node.device.memory
        if mem is None:
            return
        node.hooks = (lambda off, n: self._sync_to(node, off, n),
                      lambda off, n, done=None: self._sync_from(node, off, n, done))
        mem.add_sync_hooks(*node.hooks)

    def _memory_io(self, of) -> bool:
        return self.mmap_mode != "passthrough" and of.node.device.memory is not None

    def _open_flags(self, node: Node) -> tuple[int, int]:
        mem = node.device.memory
        if mem is None:
            return P.FOPEN_DIRECT_IO | P.FOPEN_NONSEEKABLE, 0
        if self.mmap_mode == "passthrough":
            if not node.backing_id:
                node.backing_id = sysapi.ioctl_int(self._fd, P.DEV_IOC_BACKING_OPEN, P.BACKING_MAP.pack(mem.fd, 0, 0))
            return P.FOPEN_PASSTHROUGH, node.backing_id
        self._attach_hooks(node)
        self._push_size(node)
        return (P.FOPEN_DIRECT_IO if self.mmap_mode == "direct" else 0), 0

    def _push_size(self, node: Node) -> None:
        """Grow the kernel's i_size with the memory (faults past i_size are SIGBUS).

        The store carries the new last page: since 5.16 (fuse_write_update_attr) a
        NOTIFY_STORE moves i_size only when it writes data, and a zero-length one
        left it short, so the first touch of a buffer a client writes before any
        DQBUF (M2M OUTPUT) was SIGBUS.  It goes the way of every store (deferred
        behind the reply on the loop thread); the page is new memory no client holds.
        """
        mem = node.device.memory
        size = mem.size if mem is not None else 0
        if size > node.pushed_size and node.nlookup > 0:
            node.pushed_size = size
            self._sync_to(node, size - mmap.PAGESIZE, mmap.PAGESIZE)

    def _after_ioctl(self, node: Node) -> None:
        if self.mmap_mode != "passthrough" and node.device.memory is not None:
            self._push_size(node)

    def _sync_to(self, node: Node, offset: int, length: int) -> None:
        if node.nlookup <= 0 or node.removed:
            return   # the kernel holds no page of this file
        if threading.get_ident() == self._loop_tid:
            self._deferred_stores.append((node, offset, length))
        else:
            self._store(node, offset, length)

    def _store(self, node: Node, offset: int, length: int) -> None:
        mem = node.device.memory
        if mem is None:
            return
        end = min(offset + length, mem.size)
        while offset < end:
            n = min(STORE_CHUNK, end - offset)
            err = self._notify(P.NOTIFY_STORE, [P.NOTIFY_STORE_OUT.pack(node.nodeid, offset, n, 0), mem.view(offset, n)])
            if err:
                if err != errno.ENOENT:
                    log.warning("%s: NOTIFY_STORE %d+%d: %s", node.name, offset, n, os.strerror(err))
                return
            offset += n
        node.pushed_size = max(node.pushed_size, end)

    def _send(self, parts: list) -> None:
        if self._deferred_stores:
            stores, self._deferred_stores = self._deferred_stores, []
            self._writer_q.put((stores, parts))
        else:
            self._write(parts)

    def _writer_run(self) -> None:
        while True:
            job = self._writer_q.get()
            if job is None:
                return
            stores, parts = job
            for node, offset, length in stores:
                self._store(node, offset, length)
            self._write(parts)

    def _sync_from(self, node: Node, offset: int, length: int, done: Callable[[], None] | None = None) -> bool:
        # Called from a device thread while replies land on the loop thread: the lock keeps a
        # completion from slipping between the state check and the registration of done().
        key = (offset, length)
        with self._retrieve_lock:
            state = node.retrieves.get(key)
            if state is True:
                del node.retrieves[key]
                return True
            if done is not None:
                node.retrieve_done.setdefault(key, []).append(done)
            if state is False:
                return False
            if node.nlookup <= 0 or node.removed or not self._fetch(node, key, offset, length):
                node.retrieve_done.pop(key, None)
                return True
            return False

    def _fetch(self, node: Node, key: tuple[int, int], offset: int, length: int) -> bool:
        """Ask the kernel for the pages of a client's mapping; False: none to fetch."""
        mem = node.device.memory
        end = min(offset + length, mem.size if mem else 0)
        pending = []
        pos = offset
        while pos < end:
            n = min(self._max_write, end - pos)
            pending.append((pos, n))
            pos += n
        if not pending:
            return False
        node.retrieves[key] = False
        node.retrieve_parts[key] = len(pending)
        for pos, n in pending:
            unique = self._retrieve_id(node, key)
            err = self._notify(P.NOTIFY_RETRIEVE, [P.NOTIFY_RETRIEVE_OUT.pack(unique, node.nodeid, pos, n, 0)])
            if err:
                self._retrieve_ids.pop(unique, None)
                node.retrieves.pop(key, None)
                return False   # the kernel has no pages: the memory is current
        return True

    def _retrieve_id(self, node: Node, key) -> int:
        self._next_retrieve += 1
        self._retrieve_ids[self._next_retrieve] = (node, key)
        return self._next_retrieve

    def _op_notify_reply(self, unique, nodeid, uid, gid, pid, p) -> None:
        _, offset, size, _, _, _ = P.NOTIFY_RETRIEVE_IN.unpack_from(p)
        data = p[P.NOTIFY_RETRIEVE_IN.size:P.NOTIFY_RETRIEVE_IN.size + size]
        entry = self._retrieve_ids.pop(unique, None)
        if entry is None:
            log.warning("%s: unexpected NOTIFY_REPLY %d", self.label, unique)
            return
        node, key = entry
        mem = node.device.memory
        if mem is not None and len(data):
            end = min(offset + len(data), mem.size)
            if end > offset:
                mem.view(offset, end - offset)[:] = data[:end - offset]
        with self._retrieve_lock:
            node.retrieve_parts[key] -= 1
            if node.retrieve_parts[key] > 0 or key not in node.retrieves:
                return
            node.retrieves[key] = True
            done = node.retrieve_done.pop(key, [])
        node.wake()
        for fn in done:
            fn()

    # ----- INIT -----------------------------------------------------------------------------

    def _op_init(self, unique, nodeid, uid, gid, pid, p) -> None:
        major, minor, max_readahead, flags = P.INIT_IN.unpack_from(p)
        offered = flags
        if flags & P.INIT_EXT and len(p) >= 24:
            offered |= int.from_bytes(p[16:20], "little") << 32
        if not self._accept_version(unique, major, minor):
            return
        want = P.BIG_WRITES | P.HAS_IOCTL_DIR | P.MAX_PAGES | P.INIT_EXT
        mode = self.requested_mode
        can = {"passthrough": bool(offered & P.PASSTHROUGH) and os.geteuid() == 0,
               "direct": bool(offered & P.DIRECT_IO_ALLOW_MMAP), "cached": True}
        if mode == "auto":
            mode = next(m for m in ("passthrough", "direct", "cached") if can[m])
            if can["passthrough"] and can["direct"]:
                want |= P.DIRECT_IO_ALLOW_MMAP   # fallback if BACKING_OPEN fails
        elif not can[mode]:
            self._init_error = f"mmap mode {mode} not offered by this kernel (FUSE 7.{minor})"
            self._error(unique, errno.EPROTO)
            self._init_done.set()
            return
        want |= {"passthrough": P.PASSTHROUGH, "direct": P.DIRECT_IO_ALLOW_MMAP, "cached": 0}[mode]
        agreed = want & offered & P.flags_known(self._minor)
        max_pages = 256 if agreed & P.MAX_PAGES else 32
        self._max_write = max_pages * 4096
        layout = P.init_out_for(self._minor)
        fields = (P.KERNEL_MAJOR, self._minor, max_readahead, agreed & 0xFFFFFFFF, 16, 12, self._max_write)
        if layout is P.INIT_OUT:  # + time_gran, max_pages, map_alignment, flags2, max_stack_depth
            fields += (1, max_pages, 0, agreed >> 32, 1 if mode == "passthrough" else 0, 0)
        out = layout.pack(*fields)
        self._reply(unique, out)
        if mode == "passthrough" and not self._try_backing():
            mode = "direct" if agreed & P.DIRECT_IO_ALLOW_MMAP else "cached"
            if self.requested_mode == "passthrough":
                self._init_error = "FUSE_DEV_IOC_BACKING_OPEN refused"
        self.mmap_mode = mode
        self._init_done.set()
        for node in list(self._by_name.values()):
            self._attach_hooks(node)

    def _try_backing(self) -> bool:
        fd = os.memfd_create("impv4l2-probe", os.MFD_CLOEXEC)
        try:
            bid = sysapi.ioctl_int(self._fd, P.DEV_IOC_BACKING_OPEN, P.BACKING_MAP.pack(fd, 0, 0))
            sysapi.ioctl_int(self._fd, P.DEV_IOC_BACKING_CLOSE, bid.to_bytes(4, "little"))
            return True
        except OSError as e:
            log.warning("%s: passthrough unavailable: %s", self.mountpoint, e)
            return False
        finally:
            os.close(fd)

    # ----- namespace ------------------------------------------------------------------------

    def _attr(self, node: Node | None) -> bytes:
        if node is None:
            return P.ATTR.pack(ROOT, 0, 0, self._t0, self._t0, self._t0, 0, 0, 0,
                               stat.S_IFDIR | 0o755, 2, os.getuid(), os.getgid(), 0, 4096)
        mem = node.device.memory
        size = mem.size if mem is not None else 0
        return P.ATTR.pack(node.nodeid, size, (size + 511) // 512, self._t0, self._t0, self._t0, 0, 0, 0,
                           stat.S_IFREG | self.file_mode, 1, os.getuid(), self.gid, 0, 4096)

    def _name_of(self, nodeid: int) -> str:
        node = self._nodes.get(nodeid)
        return node.name if node else self.mountpoint

    def _op_lookup(self, unique, nodeid, uid, gid, pid, p) -> None:
        name = bytes(p).split(b"\0", 1)[0].decode(errors="replace")
        node = self._by_name.get(name) if nodeid == ROOT else None
        if node is None:
            self._error(unique, errno.ENOENT)
            return
        node.nlookup += 1
        # Timeouts 0: a removed device vanishes at once, a grown memory shows at once.
        self._reply(unique, P.ENTRY_OUT_HEAD.pack(node.nodeid, 0, 0, 0, 0, 0) + self._attr(node))

    def _forget(self, nodeid: int, n: int) -> None:
        node = self._nodes.get(nodeid)
        if node is not None:
            node.nlookup = max(0, node.nlookup - n)
            if node.nlookup == 0:
                node.pushed_size = 0
            if node.removed and node.nlookup == 0 and not node.files:
                self._nodes.pop(nodeid, None)

    def _op_forget(self, unique, nodeid, uid, gid, pid, p) -> None:
        self._forget(nodeid, P.FORGET_IN.unpack_from(p)[0])

    def _op_batch_forget(self, unique, nodeid, uid, gid, pid, p) -> None:
        count = P.BATCH_FORGET_IN.unpack_from(p)[0]
        for i in range(count):
            nid, n = P.IOVEC.unpack_from(p, 8 + 16 * i)
            self._forget(nid, n)

    def _op_getattr(self, unique, nodeid, uid, gid, pid, p) -> None:
        if nodeid == ROOT:
            attr = self._attr(None)
        else:
            node = self._nodes.get(nodeid)
            if node is None or node.removed:
                self._error(unique, errno.ENOENT)
                return
            attr = self._attr(node)
        self._reply(unique, P.ATTR_OUT_HEAD.pack(0, 0, 0) + attr)

    def _op_opendir(self, unique, nodeid, uid, gid, pid, p) -> None:
        if nodeid != ROOT:
            self._error(unique, errno.ENOTDIR)
            return
        self._reply(unique, P.OPEN_OUT.pack(0, 0, 0))

    def _op_readdir(self, unique, nodeid, uid, gid, pid, p) -> None:
        _, offset, size, _, _, _, _ = P.READ_IN.unpack_from(p)
        entries = [(".", ROOT, stat.S_IFDIR), ("..", ROOT, stat.S_IFDIR)]
        entries += [(n.name, n.nodeid, stat.S_IFREG) for n in sorted(self._by_name.values(), key=lambda n: n.name)]
        out = bytearray()
        for i in range(offset, len(entries)):
            name, ino, mode = entries[i]
            raw = name.encode()
            rec = P.DIRENT_HEAD.pack(ino, i + 1, len(raw), mode >> 12) + raw
            rec += b"\0" * (-len(rec) % 8)
            if len(out) + len(rec) > size:
                break
            out += rec
        self._reply(unique, out)

    def _op_releasedir(self, unique, nodeid, uid, gid, pid, p) -> None:
        self._reply(unique)

    def _op_statfs(self, unique, nodeid, uid, gid, pid, p) -> None:
        self._reply(unique, P.KSTATFS.pack(0, 0, 0, len(self._by_name), 0, 4096, 255, 4096, 0))

    def _op_destroy(self, unique, nodeid, uid, gid, pid, p) -> None:
        self._reply(unique)
