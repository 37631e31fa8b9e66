"""The kernel's v4l2-mem2mem rules, for any M2M node: per-open paired queues in regions of
the node's one memfd, the LAST-buffer state, and the poll mask of a context.

An M2M node (the stateful encoder, impv4l2.v4l2.encoder) gives every open file its own
OUTPUT and CAPTURE :class:`M2MQueue`; their buffers are regions of the memory the node
file maps (:class:`RegionAllocator`).  :func:`buffer_mask` is ``v4l2_m2m_poll`` without
the events.
"""

from __future__ import annotations

import errno
import threading

from ..fileops import POLLERR, POLLIN, POLLOUT, POLLRDNORM, POLLWRNORM
from ..memfd import MemfdMemory, page_align
from . import abi
from .queue import MPLANE_TYPES, Buffer, BufferQueue, State, buffer_span

BT = abi.BufType
BF = abi.BufFlag

# buffer type -> (is OUTPUT, is multi-planar); the APIs a node offers are data.
API_TYPES = {
    "mplane": (BT.VIDEO_OUTPUT_MPLANE, BT.VIDEO_CAPTURE_MPLANE),
    "splane": (BT.VIDEO_OUTPUT, BT.VIDEO_CAPTURE),
}
API_CAPS = {"mplane": abi.Cap.VIDEO_M2M_MPLANE, "splane": abi.Cap.VIDEO_M2M}


class RegionAllocator:
    """Page-aligned regions of the node memfd, one per allocation of a queue
    (every context's buffers live in the one memfd the node file maps)."""

    def __init__(self, memory: MemfdMemory):
        self.memory = memory
        self.lock = threading.Lock()
        self.free: list[tuple[int, int]] = []  # (offset, size), sorted by offset
        self.end = 0

    def alloc(self, size: int) -> int:
        size = page_align(size)
        with self.lock:
            for i, (off, n) in enumerate(self.free):
                if n >= size:
                    self.free[i:i + 1] = [(off + size, n - size)] if n > size else []
                    return off
            off = self.end
            if off + size > self.memory.size:
                self.memory.resize(off + size)  # OSError(ENOMEM) past the reserve
            self.end = off + size
            return off

    def release(self, off: int, size: int) -> None:
        with self.lock:
            self.free.append((off, page_align(size)))
            self.free.sort()
            merged: list[tuple[int, int]] = []
            for o, n in self.free:
                if merged and merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((o, n))
            if merged and merged[-1][0] + merged[-1][1] == self.end:
                self.end = merged.pop()[0]
            self.free = merged


class RegionQueue(BufferQueue):
    """A BufferQueue of one of several queues sharing a node's memory: its buffers are
    regions of it (an M2M context's queues; a shared-readers file's queue)."""

    def __init__(self, regions: RegionAllocator, *args, **kw):
        super().__init__(*args, **kw)
        self.regions = regions
        self._regions: list[tuple[int, int]] = []

    def _allocate(self, count: int, sizes: list[int]) -> None:
        per = buffer_span(sizes)
        base = self.regions.alloc(per * count)
        self._regions.append((base, per * count))
        self._add_buffers(base, count, sizes)

    def _free(self) -> None:
        super()._free()
        for off, size in self._regions:
            self.regions.release(off, size)
        self._regions = []


class M2MQueue(RegionQueue):
    """A BufferQueue of one M2M context: buffers in regions of the shared
    node memory, the LAST-buffer state (DQBUF -> EPIPE after LAST) and
    switching between the single- and multi-planar buffer type."""

    def __init__(self, regions: RegionAllocator, *args, **kw):
        super().__init__(regions, *args, **kw)
        self.last_dequeued = False

    def set_type(self, t: int) -> None:
        if t == self.type:
            return
        with self.lock:
            if self.buffers or self.streaming:
                raise OSError(errno.EINVAL, f"buffers of type {self.type} exist")
            self.type = t
            self.mplane = t in MPLANE_TYPES

    def dqbuf(self, who, b, mem) -> Buffer:
        if self.streaming and self.last_dequeued:
            raise OSError(errno.EPIPE, "last buffer already dequeued")
        buf = super().dqbuf(who, b, mem)
        if buf.flags & BF.LAST:
            self.last_dequeued = True
        return buf

    def streamon(self, who, t: int) -> None:
        super().streamon(who, t)
        self.last_dequeued = False

    def _stop(self) -> None:
        super()._stop()
        self.last_dequeued = False

    def has_queued(self) -> bool:
        return any(b.state == State.QUEUED for b in self._queued)

    def count_queued(self) -> int:
        return sum(b.state == State.QUEUED for b in self._queued)

    def owned_by_driver(self) -> bool:
        """vb2's queued_list is non-empty: a buffer is QUEUED, ACTIVE or DONE."""
        return any(b.state != State.DEQUEUED for b in self.buffers)



def buffer_mask(out: M2MQueue, cap: M2MQueue) -> int:
    """v4l2_m2m_poll's buffer part: POLLERR unless one queue streams with buffers in the
    driver; POLLOUT for a done OUTPUT buffer, POLLIN for a done CAPTURE one or after LAST."""
    src_ok = out.streaming and out.owned_by_driver()
    dst_ok = cap.streaming and (cap.owned_by_driver() or cap.last_dequeued)
    if not src_ok and not dst_ok:
        return POLLERR
    mask = 0
    if out.has_done():
        mask |= POLLOUT | POLLWRNORM
    if cap.has_done() or cap.last_dequeued:
        mask |= POLLIN | POLLRDNORM
    return mask
