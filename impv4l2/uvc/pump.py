"""The streaming pump: frames from the node's capture queue into the gadget's output queue.

Both queues are MMAP; a frame is moved with one slice assignment between the two mappings
(a memcpy in C, never a Python loop over pixels), and the node's buffer goes straight back to
the node.  The gadget's buffers cycle free -> queued -> (sent by f_uvc) -> dequeued -> free;
a node frame that finds no free gadget buffer is dropped (the host is slower than the sensor).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import time

from linuxpy.video import raw

from ..v4l2 import abi as v4l2abi
from .protocol import Committed
from .source import SourceNode, fourcc_code

log = logging.getLogger("impv4l2.uvc")
OUTPUT = raw.BufType.VIDEO_OUTPUT
MMAP = raw.Memory.MMAP
GADGET_BUFFERS = 4


class Pump:
    """One stream: the node started at the committed format, the gadget queue set up to match."""

    def __init__(self, gadget_fd: int, node: SourceNode, c: Committed) -> None:
        self.fd, self.node, self.c = gadget_fd, node, c
        self.maps: list[mmap.mmap] = []
        self.free: list[int] = []
        self.sent = self.dropped = 0
        self.started = time.monotonic()
        self.streaming = False
        try:
            self._setup()
        except OSError:
            self.stop()  # releases what the half-way start took
            raise
        s = c.size
        log.info("streaming %s %dx%d (%d gadget buffers of %d bytes)", c.fmt.fourcc, s.width, s.height,
                 len(self.maps), len(self.maps[0]) if self.maps else 0)

    def _setup(self) -> None:
        c = self.c
        s = c.size
        f = raw.v4l2_format(type=OUTPUT)
        f.fmt.pix.width, f.fmt.pix.height = s.width, s.height
        f.fmt.pix.pixelformat = fourcc_code(c.fmt.spec.out_fourcc)
        f.fmt.pix.field = raw.Field.NONE
        f.fmt.pix.sizeimage = c.max_frame_size
        self._ioctl("S_FMT", f)
        rb = raw.v4l2_requestbuffers(count=GADGET_BUFFERS, type=OUTPUT, memory=MMAP)
        self._ioctl("REQBUFS", rb)
        for i in range(rb.count):
            b = raw.v4l2_buffer(index=i, type=OUTPUT, memory=MMAP)
            self._ioctl("QUERYBUF", b)
            self.maps.append(mmap.mmap(self.fd, b.length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                       offset=b.m.offset))
            self.free.append(i)
        self.node.start(c.fmt.fourcc, s.width, s.height, c.interval)
        self._ioctl("STREAMON", ctypes.c_int(OUTPUT))  # also completes the host's SET_INTERFACE
        self.streaming = True

    def _ioctl(self, name: str, st) -> None:
        fcntl.ioctl(self.fd, v4l2abi.VIDIOC[name], st)

    def node_ready(self) -> None:
        """The node has a frame: move it into a free gadget buffer (or drop it)."""
        b = self.node.dequeue()
        if b is None:
            return
        try:
            if not self.free:
                self.dropped += 1
                return
            i = self.free.pop()
            n = b.bytesused
            dst = self.maps[i]
            if n > len(dst):
                log.warning("frame of %d bytes > gadget buffer %d; dropped", n, len(dst))
                self.free.append(i)
                self.dropped += 1
                return
            dst[:n] = self.node.buffers[b.index][:n]
            ob = raw.v4l2_buffer(index=i, type=OUTPUT, memory=MMAP, bytesused=n)
            ob.field = raw.Field.NONE
            ob.timestamp = b.timestamp
            try:
                self._ioctl("QBUF", ob)
            except OSError as e:  # the host went away (ENODEV) or stopped the stream
                self.free.append(i)
                log.debug("gadget QBUF: %s", e)
                return
            self.sent += 1
        finally:
            self.node.requeue(b)

    def gadget_ready(self) -> None:
        """Reclaim the buffers f_uvc has sent."""
        while True:
            b = raw.v4l2_buffer(type=OUTPUT, memory=MMAP)
            try:
                self._ioctl("DQBUF", b)
            except OSError:
                return
            self.free.append(b.index)

    def stop(self) -> None:
        if self.streaming:
            try:
                self._ioctl("STREAMOFF", ctypes.c_int(OUTPUT))
            except OSError as e:
                log.debug("gadget STREAMOFF: %s", e)
            self.streaming = False
        self.node.stop()
        for m in self.maps:
            m.close()
        self.maps.clear()
        try:
            self._ioctl("REQBUFS", raw.v4l2_requestbuffers(count=0, type=OUTPUT, memory=MMAP))
        except OSError as e:
            log.debug("gadget REQBUFS 0: %s", e)
        dt = time.monotonic() - self.started
        log.info("stream stopped: %d frames sent in %.1f s (%.1f fps), %d dropped", self.sent, dt,
                 self.sent / dt if dt else 0, self.dropped)
