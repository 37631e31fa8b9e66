"""Device/Handle plumbing shared by every V4L2 node (capture, M2M encoder).

:class:`Node` implements :class:`impv4l2.fileops.Device`: it owns the node
memory (memfd), the priority state, the set of open handles, the control
view (with control events) and the buffer queues.  :class:`NodeHandle`
implements :class:`impv4l2.fileops.Handle`: its ioctl entry point hands every
call to the V4L2 core (:mod:`impv4l2.v4l2.dispatch` over the one table in
:mod:`impv4l2.v4l2.ioctls`), and it has the operations every node answers the
same way: QUERYCAP, G/S_PRIORITY, the control and event ioctls, the
buffer-queue ioctls and LOG_STATUS.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from mmap import PROT_READ, PROT_WRITE
from typing import Callable, Iterable, Protocol

from ..fileops import POLLERR, POLLIN, POLLPRI, POLLRDNORM, Caller, Wakers, WouldBlock
from ..memfd import MemfdMemory
from . import abi
from .budget import UNLIMITED, BufferBudget
from .controls import Control, ControlView
from . import dispatch
from .events import EventQueue, ctrl_event
from .ioctls import IOCTLS
from .queue import BufferQueue

log = logging.getLogger("impv4l2.v4l2")


VALID_PRIOS = (abi.Priority.BACKGROUND, abi.Priority.INTERACTIVE, abi.Priority.RECORD)


class Priorities:
    """The kernel's v4l2_prio_state: how many open files hold each priority.  A node has
    its own unless it shares one (the nodes of one frame channel do, as a v4l2_device's
    nodes share ``v4l2_dev->prio``)."""

    def __init__(self) -> None:
        self._count = {p: 0 for p in VALID_PRIOS}
        self._lock = threading.Lock()

    def add(self, prio: int, delta: int = 1) -> None:
        with self._lock:
            self._count[prio] += delta

    def change(self, old: int, new: int) -> None:
        with self._lock:
            self._count[old] -= 1
            self._count[new] += 1

    def max(self) -> int:
        for p in (abi.Priority.RECORD, abi.Priority.INTERACTIVE, abi.Priority.BACKGROUND):
            if self._count[p]:
                return p
        return abi.Priority.UNSET


class ShimService(Protocol):
    """What a node's handles ask of the preload shim's server
    (:class:`impv4l2.shim.ShimServer`, handed to the node by the daemon)."""

    def info_ioctl(self, node_name: str, arg) -> int: ...

    def mmap_ioctl(self, node_name: str, arg, check: Callable[[int, int, int], int]) -> int: ...

    def note_mmap_client(self, node_name: str, pid: int) -> None: ...


class Node:
    """Base of a V4L2 node served by a transport (implements fileops.Device)."""

    compat32 = False
    card = "impv4l2"
    bus_info = "platform:impv4l2"
    device_caps = 0
    buf_types: frozenset[int] = frozenset()  # the buffer types the core lets through (check_fmt)
    shim: ShimService | None = None  # set while the preload shim's server serves this node
    # (event type, needs id in controls) subscribable on this node
    event_types: frozenset[int] = frozenset({abi.EventType.CTRL})

    def __init__(self, name: str, controls: ControlView, memory: MemfdMemory | None = None,
                 budget: BufferBudget = UNLIMITED):
        self.name = name
        self.budget = budget  # every queue of this node charges it
        self.memory = memory if memory is not None else MemfdMemory(name, reserve=budget.reserve())
        self.controls = controls
        self.handles: set[NodeHandle] = set()
        self.queues: dict[int, BufferQueue] = {}
        self.prio_state = Priorities()
        self._lock = threading.Lock()
        # Every transport serving this node (CUSE and the FUSE mount) adds its
        # waker; queues and events call self.wake, which calls them all.
        self.wakers = Wakers()
        self.log = logging.LoggerAdapter(log, {"node": name})
        controls.add_listener(self._control_changed)

    # ------------------------------------------------------------ fileops.Device

    def add_waker(self, wake: Callable[[], None]) -> None:
        self.wakers.add(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        self.wakers.remove(wake)

    def wake(self) -> None:
        self.wakers()

    def open(self, caller: Caller) -> "NodeHandle":
        h = self.handle_class(self, caller)
        with self._lock:
            self.handles.add(h)
        self.prio_state.add(h.prio)
        log.debug("%s pid %d: open (flags 0x%x)", self.name, caller.pid, caller.flags)
        return h

    handle_class: type["NodeHandle"]

    def closed(self, h: "NodeHandle") -> None:
        for q in self.queues.values():
            q.release(h)
        with self._lock:
            if h not in self.handles:
                return
            self.handles.discard(h)
        self.prio_state.add(h.prio, -1)

    def close(self) -> None:
        """Tear down (daemon shutdown): stop queues, drop listeners."""
        for h in list(self.handles):
            h.release()
        self.controls.remove_listener(self._control_changed)

    # ------------------------------------------------------------ priority

    def max_prio(self) -> int:
        return self.prio_state.max()

    def change_prio(self, h: "NodeHandle", new: int) -> None:
        if new not in VALID_PRIOS:
            raise OSError(errno.EINVAL, f"invalid priority {new}")
        with self._lock:
            self.prio_state.change(h.prio, new)
            h.prio = new

    # ------------------------------------------------------------ events

    def _control_changed(self, ctrl: Control, value: int, origin: object) -> None:
        self.post_ctrl_event(ctrl, value, abi.EVENT_CTRL_CH_VALUE, origin=origin)

    def post_ctrl_event(self, ctrl: Control, value: int, changes: int,
                        handles: Iterable["NodeHandle"] | None = None, origin: object = None) -> None:
        """V4L2_EVENT_CTRL to every subscribed handle (of ``handles``, default all): the one
        fan-out of control events.  The handle that made the change (``origin``) gets it
        only with EVENT_SUB_FL_ALLOW_FEEDBACK."""
        posted = False
        for h in list(self.handles if handles is None else handles):
            flags = h.events.subscribed(abi.EventType.CTRL, ctrl.id)
            if flags is None or (h is origin and not flags & abi.EVENT_SUB_FL_ALLOW_FEEDBACK):
                continue
            posted |= h.events.post(ctrl_event(ctrl, value, changes))
        if posted:
            self.wake()

    def post_event(self, ev: abi.v4l2_event) -> None:
        posted = False
        for h in list(self.handles):
            posted |= h.events.post(type(ev).from_buffer_copy(ev))  # each queue stamps its own copy
        if posted:
            self.wake()

    def log_status(self) -> list[str]:
        return [f"{len(self.handles)} open, priority {self.max_prio()}"]


class NodeHandle:
    """One open file of a node (implements fileops.Handle)."""

    fatal: str | None = None  # set once the handle is dead: every ioctl then answers EIO

    def __init__(self, node: Node, caller: Caller):
        self.node = node
        self.caller = caller
        self.prio = abi.Priority.DEFAULT
        self.events = EventQueue()
        self.nonblocking = bool(caller.flags & os.O_NONBLOCK)
        self._released = False

    # ------------------------------------------------------------ fileops.Handle

    def ioctl(self, cmd: int, arg: bytearray, mem) -> int:
        return dispatch.call(IOCTLS, self, cmd, arg, mem)

    def read(self, size: int, offset: int):
        raise OSError(errno.EINVAL, "read() not supported")

    def write(self, data, offset: int) -> int:
        raise OSError(errno.EINVAL, "write() not supported")

    def poll(self) -> int:
        mask = POLLPRI if self.events.has_pending() else 0
        return mask | self.poll_queues()

    def poll_queues(self) -> int:
        mask = 0
        for q in self.mmap_queues():  # the queues of this file
            if q.owner is self or (q.fileio is not None and q.fileio.owner is self):
                if not q.streaming:
                    mask |= POLLERR
                elif q.has_done():
                    mask |= POLLIN | POLLRDNORM
        return mask

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        log.debug("%s pid %d: release", self.node.name, self.caller.pid)
        self.node.closed(self)

    # ------------------------------------------------------------ helpers

    @property
    def controls(self) -> ControlView:
        """The controls this handle's control ioctls act on (the node's; an
        M2M node gives each open file its own)."""
        return self.node.controls

    def queue(self, buf_type: int) -> BufferQueue:
        q = self.node.queues.get(buf_type)
        if q is None:
            raise OSError(errno.EINVAL, f"buffer type {buf_type} not supported")
        return q

    def mmap_queues(self) -> Iterable[BufferQueue]:
        """The queues whose MMAP buffers this file may map: the node's (vb2_fop_mmap);
        an M2M file overrides this with its own context's (v4l2_m2m_mmap)."""
        return self.node.queues.values()

    def mmap_check(self, offset: int, length: int, prot: int = PROT_READ | PROT_WRITE) -> int:
        """0 if a MAP_SHARED mmap of ``length`` bytes at ``offset`` would succeed on
        this file of a vb2 node, else vb2_mmap's errno: only offsets QUERYBUF gave for
        MMAP buffers allocated now, not longer than the buffer (the preload shim asks)."""
        for q in self.mmap_queues():
            err = q.mmap_check(offset, length, prot)
            if err is not None:
                if err:
                    log.info("%s pid %d: mmap %d bytes at 0x%x (prot %d) refused: %s", self.node.name,
                             self.caller.pid, length, offset, prot, errno.errorcode.get(err, err))
                return err
        log.info("%s pid %d: mmap %d bytes at 0x%x refused: no MMAP buffer there", self.node.name,
                 self.caller.pid, length, offset)
        return errno.EINVAL

    # ------------------------------------------------------------ common ioctls

    def vidioc_querycap(self, s, mem):
        n = self.node
        abi.set_str(s, "driver", "impv4l2")
        abi.set_str(s, "card", n.card)
        abi.set_str(s, "bus_info", n.bus_info)
        s.version = abi.kernel_version()
        s.device_caps = n.device_caps
        s.capabilities = n.device_caps | abi.Cap.DEVICE_CAPS

    def vidioc_g_priority(self, s, mem):
        s.value = self.node.max_prio()

    def vidioc_s_priority(self, s, mem):
        self.node.change_prio(self, s.value)

    def vidioc_log_status(self, s, mem):
        for line in self.node.log_status():
            log.info("%s: %s", self.node.name, line)

    # controls
    def vidioc_queryctrl(self, s, mem):
        self.controls.queryctrl(s)

    def vidioc_query_ext_ctrl(self, s, mem):
        self.controls.query_ext_ctrl(s)

    def vidioc_querymenu(self, s, mem):
        self.controls.querymenu(s)

    def vidioc_g_ctrl(self, s, mem):
        self.controls.g_ctrl(s)

    def vidioc_s_ctrl(self, s, mem):
        self.controls.s_ctrl(s, self)

    def vidioc_g_ext_ctrls(self, s, mem):
        self.controls.ext_ctrls("get", s, mem, self)

    def vidioc_s_ext_ctrls(self, s, mem):
        self.controls.ext_ctrls("set", s, mem, self)

    def vidioc_try_ext_ctrls(self, s, mem):
        self.controls.ext_ctrls("try", s, mem, self)

    # events
    def vidioc_subscribe_event(self, s, mem):
        t, i, flags = s.type, s.id, s.flags
        if t not in self.node.event_types:
            raise OSError(errno.EINVAL, f"event type {t} not supported")
        if t == abi.EventType.CTRL:
            c = self.controls.find(i)
            self.events.subscribe(t, i, flags)
            if flags & abi.EVENT_SUB_FL_SEND_INITIAL and c.type != abi.CtrlType.CTRL_CLASS:
                changes = abi.EVENT_CTRL_CH_FLAGS
                value = 0
                if not c.flags & abi.CtrlFlag.WRITE_ONLY:
                    changes |= abi.EVENT_CTRL_CH_VALUE
                    value = c.get()
                if self.events.post(ctrl_event(c, value, changes)):
                    self.node.wake()
            return
        self.events.subscribe(t, i if t == abi.EventType.SOURCE_CHANGE else 0, flags)

    def vidioc_unsubscribe_event(self, s, mem):
        self.events.unsubscribe(s.type, s.id)

    def vidioc_dqevent(self, s, mem):
        if not self.events.dequeue(s):
            if self.nonblocking or self.events.polled:
                raise OSError(errno.ENOENT, "no event pending")
            raise WouldBlock()

    # buffer queues
    def vidioc_reqbufs(self, s, mem):
        q = self.queue(s.type)
        self.before_reqbufs(q, s)
        q.reqbufs(self, s)
        if s.memory == abi.Memory.MMAP and s.count:
            # CUSE nodes have no mmap: hint `impv4l2 run` once to a client without the shim.
            if self.node.shim is not None:
                self.node.shim.note_mmap_client(self.node.name, self.caller.pid)

    def _shim(self) -> ShimService:
        srv = self.node.shim
        if srv is None:  # the shim then leaves mmap alone
            raise OSError(errno.ENOTTY, f"{self.node.name}: no shim server")
        return srv

    def vidioc_impv4l2_shim_info(self, s, mem):
        """Driver-private: how the preload shim gets this node's buffer memory."""
        return self._shim().info_ioctl(self.node.name, s)

    def vidioc_impv4l2_shim_mmap(self, s, mem):
        """Driver-private: would vb2 let this file map s.length bytes at s.offset?"""
        return self._shim().mmap_ioctl(self.node.name, s, self.mmap_check)

    def before_reqbufs(self, q: BufferQueue, s) -> None:
        """Hook: a node refreshes the queue's plane sizes from its format."""

    def vidioc_create_bufs(self, s, mem):
        q = self.queue(s.format.type)
        sizes = self.create_bufs_sizes(q, s.format)
        q.create_bufs(self, s, sizes)

    def create_bufs_sizes(self, q: BufferQueue, fmt: abi.v4l2_format) -> list[int]:
        raise OSError(errno.EINVAL, "CREATE_BUFS not supported")

    def vidioc_querybuf(self, s, mem):
        self.queue(s.type).querybuf(s, mem)

    def vidioc_prepare_buf(self, s, mem):
        self.queue(s.type).prepare_buf(self, s, mem)

    def vidioc_qbuf(self, s, mem):
        self.queue(s.type).qbuf(self, s, mem)

    def vidioc_dqbuf(self, s, mem):
        self.queue(s.type).dqbuf(self, s, mem)

    def vidioc_streamon(self, s, mem):
        self.queue(s.value).streamon(self, s.value)

    def vidioc_streamoff(self, s, mem):
        self.queue(s.value).streamoff(self, s.value)
