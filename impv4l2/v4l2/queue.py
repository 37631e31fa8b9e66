"""One buffer-queue state machine for every node (capture, encoder OUTPUT and CAPTURE).

Buffer states and their Android BufferQueue equivalents.  On a *capture*
queue the driver is the producer and the application the consumer; on an
*output* queue (the encoder's raw input) the roles swap:

==========  =============================  ==============================
V4L2        capture queue (driver fills)   output queue (app fills)
==========  =============================  ==============================
DEQUEUED    ACQUIRED (consumer = app)      DEQUEUED (producer = app)
QUEUED      FREE (waits for the producer)  QUEUED (waits for the consumer)
ACTIVE      DEQUEUED (driver writing)      ACQUIRED (driver reading)
DONE        QUEUED (waits for DQBUF)       FREE (waits for DQBUF)
==========  =============================  ==============================

Ioctl side (transport threads): REQBUFS, CREATE_BUFS, QUERYBUF, PREPARE_BUF,
QBUF, DQBUF, STREAMON, STREAMOFF, plus read() emulation (:class:`FileIO`).
Producer side (backend thread): :meth:`BufferQueue.take` a QUEUED buffer
(None: drop the frame), :meth:`BufferQueue.done` it.  Nothing here ever
waits: DQBUF without a DONE buffer raises WouldBlock and the transport parks
the request until the waker runs.

Memory: every buffer plane lives in the node's memfd at a page-aligned
offset (MMAP: the client maps it; USERPTR: the frame is copied to the
client's pointer with one process_vm_writev at DQBUF).
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import errno
import logging
import threading
from mmap import PROT_READ, PROT_WRITE
from typing import Callable

from ..fileops import WouldBlock
from ..memfd import page_align
from . import abi
from .budget import UNLIMITED, BufferBudget

MAX_BUFFERS = 32  # VIDEO_MAX_FRAME
PLANE_SIZE = ctypes.sizeof(abi.v4l2_plane)
MPLANE_TYPES = {abi.BufType.VIDEO_CAPTURE_MPLANE, abi.BufType.VIDEO_OUTPUT_MPLANE}
OUTPUT_TYPES = {abi.BufType.VIDEO_OUTPUT, abi.BufType.VIDEO_OUTPUT_MPLANE}


class State(enum.Enum):
    DEQUEUED = "dequeued"
    QUEUED = "queued"
    ACTIVE = "active"
    DONE = "done"


@dataclasses.dataclass
class Plane:
    offset: int  # in the node memory
    length: int
    bytesused: int = 0
    userptr: int = 0
    data_offset: int = 0


@dataclasses.dataclass
class Buffer:
    index: int
    planes: list[Plane]
    state: State = State.DEQUEUED
    prepared: bool = False
    sequence: int = 0
    timestamp_ns: int = 0
    flags: int = 0  # KEYFRAME/PFRAME/ERROR/LAST set by the producer
    field: int = abi.Field.NONE


def _probe(mem, addr: int, length: int) -> None:
    """EFAULT unless the caller has memory at both ends of [addr, addr+length) (as vb2's
    get_user_pages at QBUF: a bad pointer fails now, not when a frame is delivered)."""
    try:
        mem.read(addr, 1)
        mem.read(addr + length - 1, 1)
    except OSError:
        raise OSError(errno.EFAULT, f"userptr 0x{addr:x}+{length} not mapped in the caller") from None


def buffer_span(sizes: list[int]) -> int:
    """Bytes one buffer with planes of ``sizes`` takes in the memfd (planes page aligned)."""
    return sum(page_align(s) for s in sizes)


class BufferQueue:
    """A V4L2 buffer queue of one buffer type."""

    def __init__(self, node_name: str, buf_type: int, memory, log: logging.Logger, *,
                 memories: tuple[int, ...] = (abi.Memory.MMAP, abi.Memory.USERPTR),
                 timestamp_flags: int = abi.BufFlag.TIMESTAMP_MONOTONIC | abi.BufFlag.TSTAMP_SRC_EOF,
                 min_buffers: int = 1, max_buffers: int = MAX_BUFFERS,
                 memory_base: int = 0, budget: BufferBudget = UNLIMITED):
        self.name = node_name
        self.type = buf_type
        self.mplane = buf_type in MPLANE_TYPES
        self.memory = memory  # fileops.SharedMemory
        self.log = log
        self.memories = memories
        self.ts_flags = timestamp_flags
        self.min_buffers = min_buffers
        self.max_buffers = max_buffers
        self.memory_base = memory_base  # where this queue's buffers start in the memfd
        self.budget = budget  # the node's share of buffer memory
        self.lock = threading.RLock()
        self.buffers: list[Buffer] = []
        self.mem_type = 0
        self.owner: object | None = None
        self.streaming = False
        self.plane_sizes: list[int] = [0]  # of the current format (set by the node)
        self.on_start: Callable[[], None] = lambda: None
        self.on_stop: Callable[[], None] = lambda: None
        self.wake: Callable[[], None] = lambda: None
        self._alloc_end = memory_base
        self._done_list: list[Buffer] = []  # DONE buffers in completion order
        self._queued: list[Buffer] = []  # QUEUED buffers in QBUF order
        self.fileio: FileIO | None = None

    # ------------------------------------------------------------ helpers

    @property
    def capabilities(self) -> int:
        caps = 0
        if abi.Memory.MMAP in self.memories:
            caps |= abi.BUF_CAP_SUPPORTS_MMAP
        if abi.Memory.USERPTR in self.memories:
            caps |= abi.BUF_CAP_SUPPORTS_USERPTR
        # REQBUFS(0) while mapped is fine: the memfd never shrinks, so an old mapping
        # stays valid (it may show a later allocation's buffer at the same offset).
        return caps | abi.BUF_CAP_SUPPORTS_ORPHANED_BUFS

    def _check_type(self, t: int) -> None:
        if t != self.type:
            raise OSError(errno.EINVAL, f"buffer type {t} is not {self.type}")

    def _check_memory(self, m: int) -> None:
        if m not in self.memories:
            raise OSError(errno.EINVAL, f"memory type {m} not supported")

    def busy_for(self, who: object) -> bool:
        return self.owner is not None and self.owner is not who

    def _check_owner(self, who: object) -> None:
        if self.busy_for(who):
            raise OSError(errno.EBUSY, "queue owned by another file handle")
        if self.fileio is not None and who is not self.fileio:
            raise OSError(errno.EBUSY, "queue in read() mode")

    def _add_buffers(self, base: int, count: int, sizes: list[int]) -> int:
        """Append ``count`` buffers with planes of ``sizes`` laid out from ``base`` (page
        aligned); returns the end offset."""
        end = base
        for _ in range(count):
            planes = []
            for size in sizes:
                planes.append(Plane(end, size))
                end += page_align(size)
            self.buffers.append(Buffer(len(self.buffers), planes))
        return end

    def _allocate(self, count: int, sizes: list[int]) -> None:
        end = self._add_buffers(self._alloc_end, count, sizes)
        if end > self.memory.size:
            self.memory.resize(end)
        self._alloc_end = end

    def _take(self, want: int, sizes: list[int], least: int) -> int:
        """How many of ``want`` buffers the budget grants (logged when fewer)."""
        each = buffer_span(sizes)
        try:
            got = self.budget.take(self.name, self, each, want, least)
        except OSError as e:
            self.log.warning("%s: %s", self.name, e.strerror)
            raise
        if got < want:
            self.log.info("%s: %d of %d buffers of %d bytes granted (buffer budget: %s)",
                          self.name, got, want, each, self.budget.describe())
        return got

    def _free(self) -> None:
        # The memfd is not shrunk: a client may still map old buffers (orphaned).
        self.budget.release(self.name, self)
        self.buffers = []
        self._queued = []
        self._done_list = []
        self._alloc_end = self.memory_base
        self.mem_type = 0

    def view(self, buf: Buffer, plane: int = 0) -> memoryview:
        p = buf.planes[plane]
        return self.memory.view(p.offset, p.length)

    # ------------------------------------------------------------ ioctls

    def reqbufs(self, who: object, r: abi.v4l2_requestbuffers) -> None:
        self._check_type(r.type)
        self._check_memory(r.memory)
        with self.lock:
            self._check_owner(who)
        if self.streaming:
            self._stop()
        with self.lock:
            self._free()
            r.capabilities = self.capabilities
            r.flags = 0
            r.reserved = b"\0\0\0"
            if r.count == 0:
                self.owner = None
                return
            count = max(self.min_buffers, min(r.count, self.max_buffers))
            count = self._take(count, list(self.plane_sizes), self.min_buffers)
            self._allocate(count, list(self.plane_sizes))
            self.mem_type = r.memory
            self.owner = who
            r.count = count
        self.log.debug("%s: %d %s buffers of %s bytes", self.name, count,
                       abi.Memory(r.memory).name, self.plane_sizes)

    def create_bufs(self, who: object, c: abi.v4l2_create_buffers, sizes: list[int]) -> None:
        """``sizes``: plane sizes asked in c.format (already checked against the format)."""
        self._check_type(c.format.type)
        c.index = len(self.buffers)
        c.capabilities = self.capabilities
        c.flags = 0
        c.max_num_buffers = 0  # not advertised (older v4l2-compliance wants reserved zeros here)
        ctypes.memset(ctypes.addressof(c.reserved), 0, ctypes.sizeof(c.reserved))
        self._check_memory(c.memory)
        if c.count == 0:
            return
        with self.lock:
            self._check_owner(who)
            if self.buffers and c.memory != self.mem_type:
                raise OSError(errno.EINVAL, "memory type differs from the existing buffers")
            for want, need in zip(sizes, self.plane_sizes):
                if want < need:
                    raise OSError(errno.EINVAL, f"sizeimage {want} < {need}")
            room = self.max_buffers - len(self.buffers)
            if room <= 0:
                raise OSError(errno.ENOBUFS, "no more buffers")
            count = self._take(min(c.count, room), sizes, 1)
            self._allocate(count, sizes)
            self.mem_type = c.memory
            self.owner = who
            c.count = count

    def _get(self, b: abi.v4l2_buffer) -> Buffer:
        self._check_type(b.type)
        if b.index >= len(self.buffers):
            raise OSError(errno.EINVAL, f"buffer index {b.index} >= {len(self.buffers)}")
        return self.buffers[b.index]

    def querybuf(self, b: abi.v4l2_buffer, mem) -> None:
        with self.lock:
            buf = self._get(b)
            self._fill(b, buf, mem)

    def _planes_addr(self, b: abi.v4l2_buffer) -> tuple[int, int]:
        n = b.length
        if not 1 <= n <= abi.VIDEO_MAX_PLANES or n < len(self.plane_sizes):
            raise OSError(errno.EINVAL, f"{n} planes given, {len(self.plane_sizes)} needed")
        return ctypes.cast(b.m.planes, ctypes.c_void_p).value or 0, n

    def _user_planes(self, b: abi.v4l2_buffer, mem) -> tuple[int, bytearray] | None:
        if not self.mplane:
            return None
        addr, n = self._planes_addr(b)
        mem.require(reads=[(addr, n * PLANE_SIZE)], writes=[(addr, n * PLANE_SIZE)])
        return addr, bytearray(mem.read(addr, n * PLANE_SIZE))

    def _fill(self, b: abi.v4l2_buffer, buf: Buffer, mem, planes=None) -> None:
        """Write the buffer's state into the caller's v4l2_buffer (and plane array)."""
        if self.mplane and planes is None:
            planes = self._user_planes(b, mem)
        index, type_ = buf.index, self.type
        saved_ptr = b.m.userptr if self.mplane else 0
        length = b.length
        abi.zero(b)
        b.index, b.type, b.memory = index, type_, self.mem_type
        flags = self.ts_flags | buf.flags
        if buf.state in (State.QUEUED, State.ACTIVE):
            flags |= abi.BufFlag.QUEUED
        elif buf.state == State.DONE:
            flags |= abi.BufFlag.DONE
        elif buf.prepared:
            flags |= abi.BufFlag.PREPARED
        b.flags = flags
        b.field = buf.field
        b.sequence = buf.sequence
        if buf.timestamp_ns:
            sec, ns = divmod(buf.timestamp_ns, 1_000_000_000)
            b.timestamp.secs, b.timestamp.usecs = sec, ns // 1000
        if not self.mplane:
            p = buf.planes[0]
            b.bytesused = p.bytesused
            b.length = p.length
            if self.mem_type == abi.Memory.USERPTR:
                b.m.userptr = p.userptr
            else:
                b.m.offset = p.offset
            return
        b.m.userptr = saved_ptr
        b.length = len(buf.planes)  # as vb2: the number of planes, not the caller's array size
        addr, raw = planes
        arr = (abi.v4l2_plane * length).from_buffer(raw)
        for i, p in enumerate(buf.planes):
            vp = arr[i]
            abi.zero(vp)
            vp.bytesused, vp.length, vp.data_offset = p.bytesused, p.length, p.data_offset
            if self.mem_type == abi.Memory.USERPTR:
                vp.m.userptr = p.userptr
            else:
                vp.m.mem_offset = p.offset
        mem.write(addr, bytes(raw))

    def _take_user_info(self, b: abi.v4l2_buffer, buf: Buffer, planes, mem) -> None:
        """Validate and record what the caller says at QBUF/PREPARE_BUF."""
        if b.memory != self.mem_type:
            raise OSError(errno.EINVAL, f"memory {b.memory} but buffers are {self.mem_type}")
        if not self.mplane:
            given = [(b.m.userptr, b.length, b.bytesused)]
        else:
            arr = (abi.v4l2_plane * b.length).from_buffer(planes[1])
            given = [(arr[i].m.userptr, arr[i].length, arr[i].bytesused) for i in range(len(buf.planes))]
            if self.type in OUTPUT_TYPES:  # as vb2's __verify_length: data starts before its end
                for i in range(len(buf.planes)):
                    if arr[i].bytesused and arr[i].data_offset >= arr[i].bytesused:
                        raise OSError(errno.EINVAL, f"plane {i}: data_offset {arr[i].data_offset} "
                                                    f">= bytesused {arr[i].bytesused}")
        for p, (ptr, length, used) in zip(buf.planes, given):
            if self.mem_type == abi.Memory.USERPTR:
                if not ptr or length < p.length:
                    raise OSError(errno.EINVAL, f"bad userptr 0x{ptr:x} length {length} < {p.length}")
                _probe(mem, ptr, p.length)
        for p, (ptr, length, used) in zip(buf.planes, given):
            if self.mem_type == abi.Memory.USERPTR:
                p.userptr = ptr
            if self.type in OUTPUT_TYPES:
                p.bytesused = used if used else p.length
                if p.bytesused > p.length:
                    raise OSError(errno.EINVAL, f"bytesused {used} > length {p.length}")

    def prepare_buf(self, who: object, b: abi.v4l2_buffer, mem) -> None:
        with self.lock:
            self._check_owner(who)
            buf = self._get(b)
            planes = self._user_planes(b, mem)
            if buf.state != State.DEQUEUED or buf.prepared:
                raise OSError(errno.EINVAL, f"buffer {buf.index} already prepared or queued")
            self._take_user_info(b, buf, planes, mem)
            buf.prepared = True
            self._fill(b, buf, mem, planes)

    def qbuf(self, who: object, b: abi.v4l2_buffer, mem, timestamp_ns: int = 0) -> Buffer:
        with self.lock:
            self._check_owner(who)
            buf = self._get(b)
            planes = self._user_planes(b, mem)
            if buf.state != State.DEQUEUED:
                raise OSError(errno.EINVAL, f"buffer {buf.index} is already {buf.state.value}")
            if not buf.prepared:
                self._take_user_info(b, buf, planes, mem)
            elif b.memory != self.mem_type:
                raise OSError(errno.EINVAL, "wrong memory type")
            buf.prepared = False
            buf.state = State.QUEUED
            self._queued.append(buf)
            buf.sequence = 0
            buf.flags = 0
            buf.timestamp_ns = timestamp_ns
            if self.type not in OUTPUT_TYPES:
                for p in buf.planes:
                    p.bytesused = 0
            self._fill(b, buf, mem, planes)
        return buf

    def dqbuf(self, who: object, b: abi.v4l2_buffer, mem) -> Buffer:
        with self.lock:
            self._check_owner(who)
            self._check_type(b.type)
            if b.memory != self.mem_type and self.mem_type:
                raise OSError(errno.EINVAL, "wrong memory type")
            if not self.streaming:
                raise OSError(errno.EINVAL, "not streaming")
            planes = self._user_planes(b, mem)
            buf = next((x for x in self._done_order() if x.state == State.DONE), None)
            if buf is None:
                raise WouldBlock()
            buf.state = State.DEQUEUED
            self._done_list.remove(buf)
        # Outside the lock: hand the data over to the client.
        if self.type not in OUTPUT_TYPES:
            for p in buf.planes:
                if not p.bytesused:
                    continue
                if self.mem_type == abi.Memory.USERPTR:
                    mem.write(p.userptr, self.memory.view(p.offset, p.bytesused))
                else:
                    self.memory.sync_to_client(p.offset, p.bytesused)
        with self.lock:
            self._fill(b, buf, mem, planes)
        return buf

    def _done_order(self) -> list[Buffer]:
        return self._done_list

    def streamon(self, who: object, t: int) -> None:
        self._check_type(t)
        with self.lock:
            self._check_owner(who)
            if not self.buffers:
                raise OSError(errno.EINVAL, "no buffers allocated")
            if self.streaming:
                return
            self._done_list = []
            self.streaming = True
        try:
            self.on_start()
        except Exception:
            with self.lock:
                self.streaming = False
            raise

    def streamoff(self, who: object, t: int) -> None:
        self._check_type(t)
        with self.lock:
            self._check_owner(who)
        self._stop()

    def _stop(self) -> None:
        """Stop the producer and return every buffer to the application."""
        was = self.streaming
        if was:
            self.on_stop()
        with self.lock:
            self.streaming = False
            self._done_list = []
            self._queued = []
            for buf in self.buffers:
                buf.state = State.DEQUEUED
                buf.prepared = False
        self.wake()

    def release(self, who: object) -> None:
        """The owner's file was closed: stop and free everything."""
        if self.owner is not who:
            return
        self._stop()
        with self.lock:
            self._free()
            self.owner = None
        self.wake()

    def mmap_check(self, offset: int, length: int, prot: int) -> int | None:
        """vb2_mmap's verdict on mapping ``length`` bytes at ``offset`` (a QUERYBUF
        mem_offset): 0 or an errno; None when no MMAP buffer of this queue is there."""
        with self.lock:
            if self.mem_type != abi.Memory.MMAP:
                return None  # vb2: "queue is not currently set up for mmap"
            if self.fileio is not None:
                return errno.EBUSY  # vb2: "file io in progress"
            plane = next((p for b in self.buffers for p in b.planes if p.offset == offset), None)
        if plane is None:
            return None
        if not prot & (PROT_WRITE if self.type in OUTPUT_TYPES else PROT_READ):
            return errno.EINVAL  # vb2: "invalid vma flags, VM_WRITE/VM_READ needed"
        if page_align(length) > page_align(plane.length):
            return errno.EINVAL  # vb2: "it would overflow buffer length"
        return 0

    # ------------------------------------------------------------ producer side


    def take(self) -> Buffer | None:
        """The oldest QUEUED buffer, now ACTIVE; None when the client has none queued."""
        with self.lock:
            if not self.streaming:
                return None
            # Buffers are filled in QBUF order.
            while self._queued:
                buf = self._queued.pop(0)
                if buf.state == State.QUEUED:
                    buf.state = State.ACTIVE
                    return buf
            return None

    def done(self, buf: Buffer, bytesused: list[int] | int, sequence: int, timestamp_ns: int,
             flags: int = 0) -> None:
        with self.lock:
            if buf.state != State.ACTIVE or not self.streaming or buf not in self.buffers:
                return  # stream stopped meanwhile: the buffer went back to the app
            used = [bytesused] if isinstance(bytesused, int) else bytesused
            for p, n in zip(buf.planes, used):
                p.bytesused = n
            buf.sequence = sequence
            buf.timestamp_ns = timestamp_ns
            buf.flags = flags
            buf.state = State.DONE
            self._done_list.append(buf)
        self.wake()

    def cancel(self, buf: Buffer) -> None:
        """Give an ACTIVE buffer back to the QUEUED state (producer gave up)."""
        with self.lock:
            if buf.state == State.ACTIVE:
                buf.state = State.QUEUED
                self._queued.insert(0, buf)

    # ------------------------------------------------------------ readiness

    def has_done(self) -> bool:
        return bool(self._done_list)


class FileIO:
    """read() emulation on top of the queue (as vb2's fileio): internal MMAP
    buffers, all queued; read() hands out a frame, possibly across several
    calls, then requeues the buffer."""

    def __init__(self, queue: BufferQueue, owner: object, count: int):
        self.q = queue
        self.owner = owner
        self.cur: Buffer | None = None
        self.pos = 0
        self.requeue: Buffer | None = None
        self.last_end = -1
        self.last_full = False
        r = abi.v4l2_requestbuffers()
        r.count, r.type, r.memory = count, queue.type, abi.Memory.MMAP
        queue.reqbufs(self, r)
        queue.fileio = self
        for buf in queue.buffers:
            buf.state = State.QUEUED
            queue._queued.append(buf)
        queue.streamon(self, queue.type)

    def read(self, size: int, offset: int) -> memoryview | bytes:
        q = self.q
        if self.requeue is not None:
            with q.lock:
                if self.requeue.state == State.DEQUEUED and q.streaming:
                    self.requeue.state = State.QUEUED
                    q._queued.append(self.requeue)
            self.requeue = None
        # CUSE splits one read(2) into ≤128 KiB requests with growing offsets
        # (starting at 0); a continuation never starts a new frame.
        continuation = offset > 0 and offset == self.last_end and self.last_full
        if self.cur is None:
            if continuation:
                self.last_full = False
                return b""
            with q.lock:
                if not q.streaming:
                    raise OSError(errno.EINVAL, "not streaming")
                buf = q._done_list[0] if q._done_list else None
                if buf is None:
                    raise WouldBlock()
                q._done_list.pop(0)
                buf.state = State.DEQUEUED
            self.cur, self.pos = buf, 0
        buf = self.cur
        p = buf.planes[0]
        n = min(size, p.bytesused - self.pos)
        out = q.memory.view(p.offset + self.pos, n)
        self.pos += n
        if self.pos >= p.bytesused:
            self.requeue, self.cur = buf, None
        self.last_end = offset + n
        self.last_full = n == size
        return out

    def close(self) -> None:
        q = self.q
        q.fileio = None
        q.release(self)
