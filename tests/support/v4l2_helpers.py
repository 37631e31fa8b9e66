"""In-process drivers for impv4l2.v4l2 nodes: call Handle.ioctl with linuxpy structs."""

from __future__ import annotations

import ctypes
import errno
import os
import time

from impv4l2.fileops import Caller, WouldBlock
from impv4l2.v4l2 import abi


class FakeUserMemory:
    """The test process is the 'client': pointers are addresses in this process."""

    def __init__(self):
        self.writes = 0

    def require(self, reads=(), writes=()):
        pass

    def read(self, addr, length):
        return ctypes.string_at(addr, length)

    def write(self, addr, data):
        data = bytes(data)
        ctypes.memmove(addr, data, len(data))
        self.writes += 1


MEM = FakeUserMemory()


def open_node(node, pid=1000, nonblock=True):
    flags = os.O_RDWR | (os.O_NONBLOCK if nonblock else 0)
    return node.open(Caller(pid, 0, 0, flags))


def ioctl(h, name, s=None):
    """Run VIDIOC_<name>; returns the struct updated in place; raises OSError."""
    cmd = abi.VIDIOC[name]
    arg = bytearray(s) if s is not None else bytearray(abi.ioc_size(cmd))
    try:
        result = h.ioctl(cmd, arg, MEM)
        if result < 0:  # an error with the struct copied back (EXT_CTRLS), as libc reports it
            raise OSError(-result, os.strerror(-result))
        return result
    finally:
        # Copied back even on error, as the kernel does for EXT_CTRLS (error_idx):
        # the transport replies fuse_ioctl_out.result=-errno with the data.
        if s is not None:
            ctypes.memmove(ctypes.addressof(s), bytes(arg), len(arg))


def err(h, name, s=None):
    try:
        ioctl(h, name, s)
    except OSError as ex:
        return ex.errno
    except WouldBlock:
        return errno.EAGAIN
    return 0


def fmt(width=0, height=0, fourcc=abi.PixelFormat.NV12, type_=abi.BufType.VIDEO_CAPTURE):
    f = abi.v4l2_format()
    f.type = type_
    f.fmt.pix.width, f.fmt.pix.height, f.fmt.pix.pixelformat = width, height, fourcc
    return f


def reqbufs(h, count, memory=abi.Memory.MMAP, type_=abi.BufType.VIDEO_CAPTURE):
    r = abi.v4l2_requestbuffers()
    r.count, r.type, r.memory = count, type_, memory
    ioctl(h, "REQBUFS", r)
    return r


def buf(index=0, memory=abi.Memory.MMAP, type_=abi.BufType.VIDEO_CAPTURE):
    b = abi.v4l2_buffer()
    b.index, b.type, b.memory = index, type_, memory
    return b


def streamon(h, name="STREAMON"):
    ioctl(h, name, abi.c_int(abi.BufType.VIDEO_CAPTURE))


def dqbuf(h, memory=abi.Memory.MMAP, timeout=5.0):
    """DQBUF, retrying on WouldBlock (as the transport would) up to a liveness bound."""
    deadline = time.monotonic() + timeout
    while True:
        b = buf(memory=memory)
        try:
            ioctl(h, "DQBUF", b)
            return b
        except WouldBlock:
            if time.monotonic() > deadline:
                raise TimeoutError("no frame within the liveness bound")
            time.sleep(0.003)


def ctrl(h, cid, value=None):
    c = abi.v4l2_control()
    c.id = cid
    if value is None:
        ioctl(h, "G_CTRL", c)
        return c.value
    c.value = value
    ioctl(h, "S_CTRL", c)
    return c.value


def start(h, fourcc, size, count):
    """S_FMT + REQBUFS(MMAP) + QBUF all + STREAMON."""
    ioctl(h, "S_FMT", fmt(*size, fourcc=fourcc))
    r = reqbufs(h, count)
    for i in range(r.count):
        ioctl(h, "QBUF", buf(i))
    streamon(h)
    return r.count


def frames(node, h, n, requeue=True):
    """Dequeue n frames: [(bytes, flags, sequence)], requeueing each buffer."""
    out = []
    for _ in range(n):
        b = dqbuf(h)
        out.append((bytes(node.memory.view(b.m.offset, b.bytesused)), b.flags, b.sequence))
        if requeue:
            ioctl(h, "QBUF", buf(b.index))
    return out


def luma(frame):
    """The Y plane of a decoded av.VideoFrame as a (height, width) numpy view."""
    import numpy as np

    p = frame.planes[0]
    return np.frombuffer(p, np.uint8).reshape(frame.height, p.line_size)[:, :frame.width]


def query(h, cid) -> abi.v4l2_query_ext_ctrl:
    q = abi.v4l2_query_ext_ctrl()
    q.id = cid
    ioctl(h, "QUERY_EXT_CTRL", q)
    return q
