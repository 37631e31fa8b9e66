"""Shared readers: a capture node every open file may stream from at once (opt-in, non-vb2).

``[nodes.<role>] readers = "shared"`` makes a node like v4l2loopback's readers: a
second file that REQBUFS, STREAMONs or read()s does not get EBUSY; it gets a
buffer queue of its own (its own buffers, memory type and count, in a region of
the node's memory) fed by the node's one stream (the one encoder channel of its
format, or the channel's raw frames), each file from its next frame (H.264/H.265:
its next IDR, asked for when it joins).  For apps that only read: the format is
the node's, S_FMT answers EBUSY while any file has buffers, and v4l2-compliance's
"a second handle gets EBUSY" checks do not hold on such a node by design.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Iterable

from .capture import CAP, CaptureHandle, CaptureNode, CaptureStream
from .m2m import RegionAllocator, RegionQueue
from .node import NodeHandle
from .queue import BufferQueue

log = logging.getLogger("impv4l2.v4l2")


class SharedReadersNode(CaptureNode):
    """A capture node whose open files each stream from it with a queue of their own."""

    def _make_streams(self) -> None:
        self.regions = RegionAllocator(self.memory)
        self._by_handle: dict[NodeHandle, CaptureStream] = {}
        self._streams_lock = threading.Lock()

    def stream_of(self, h: NodeHandle) -> CaptureStream:
        """The file's own queue and consumer of the channel, made on first use."""
        with self._streams_lock:
            st = self._by_handle.get(h)
            if st is None:
                q = RegionQueue(self.regions, self.name, CAP, self.memory, log, budget=self.budget)
                st = self._by_handle[h] = CaptureStream(self, q, self.hub.port())
                self.streams.append(st)
            return st

    def stream_if_any(self, h: NodeHandle) -> CaptureStream | None:
        return self._by_handle.get(h)

    def closed(self, h: NodeHandle) -> None:
        super().closed(h)  # ends the file's read() emulation, if any
        with self._streams_lock:
            st = self._by_handle.pop(h, None)
            if st is not None:
                self.streams.remove(st)
        if st is not None:
            st.queue.release(h)

    def log_status(self) -> list[str]:
        return super().log_status() + [f"shared readers: {len(self._by_handle)} files with a queue"]


class SharedReaderHandle(CaptureHandle):
    """An open file of a shared-readers node: its buffer ioctls, read() and poll act on its
    own queue."""

    node: SharedReadersNode

    def queue(self, buf_type: int) -> BufferQueue:
        if buf_type != CAP:
            raise OSError(errno.EINVAL, f"buffer type {buf_type} not supported")
        return self.node.stream_of(self).queue

    def mmap_queues(self) -> Iterable[BufferQueue]:
        st = self.node.stream_if_any(self)
        return (st.queue,) if st is not None else ()


SharedReadersNode.handle_class = SharedReaderHandle
