"""A V4L2 capture client in its own process, for any door (FUSE file or CUSE node).

    python tests/clients/stream.py MODE PATH FRAMES [WIDTH HEIGHT]

MODE is ``read`` (blocking read()), ``userptr`` or ``mmap`` (blocking DQBUF,
4 buffers; ``mmap`` needs a door with mmap: a FUSE file or the preload shim).
With WIDTH and HEIGHT the format is first set to NV12 of that size.  Every frame must be complete (bytesused == sizeimage) and, for NV12 from the
sim, carry a burned-in frame counter larger than the one before.  Prints
``OK <frames> <bytes>`` or ``ERR <errno name> <frames>``; exits 1 on a bad frame.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import sys

from linuxpy.video import raw

from impv4l2.driver.sim.pattern import read_counter, y_plane
from impv4l2.v4l2 import abi

CAP = raw.BufType.VIDEO_CAPTURE


def ioc(fd: int, name: str, s) -> None:
    fcntl.ioctl(fd, abi.VIDIOC[name], s)


class Checker:
    def __init__(self, pix) -> None:
        self.size = pix.sizeimage
        self.nv12 = pix.pixelformat == abi.PixelFormat.NV12 and pix.bytesperline == pix.width
        self.w, self.h = pix.width, pix.height
        self.last = -1
        self.frames = self.bytes = 0

    def frame(self, data, used: int) -> None:
        if used != self.size:
            sys.exit(f"frame {self.frames}: {used} bytes, want {self.size}")
        if self.nv12:
            n = read_counter(y_plane(data, self.w, self.h))
            if n <= self.last:
                sys.exit(f"frame {self.frames}: counter {n} after {self.last}")
            self.last = n
        self.frames += 1
        self.bytes += used


def stream_read(fd: int, chk: Checker, frames: int) -> None:
    buf = bytearray(chk.size)
    while chk.frames < frames:
        n = os.readv(fd, [buf])
        chk.frame(buf, n)


def stream_queue(fd: int, chk: Checker, frames: int, memory: int) -> None:
    r = raw.v4l2_requestbuffers()
    r.count, r.type, r.memory = 4, CAP, memory
    ioc(fd, "REQBUFS", r)
    if memory == raw.Memory.USERPTR:
        bufs = [ctypes.create_string_buffer(chk.size) for _ in range(r.count)]
        views = [memoryview(b).cast("B")[:chk.size] for b in bufs]
    else:
        maps = []
        for i in range(r.count):
            b = raw.v4l2_buffer()
            b.index, b.type, b.memory = i, CAP, memory
            ioc(fd, "QUERYBUF", b)
            maps.append(mmap.mmap(fd, b.length, offset=b.m.offset))
        views = [memoryview(m) for m in maps]

    def qbuf(i: int) -> None:
        b = raw.v4l2_buffer()
        b.index, b.type, b.memory = i, CAP, memory
        if memory == raw.Memory.USERPTR:
            b.m.userptr, b.length = ctypes.addressof(bufs[i]), chk.size
        ioc(fd, "QBUF", b)

    for i in range(r.count):
        qbuf(i)
    ioc(fd, "STREAMON", ctypes.c_int(CAP))
    while chk.frames < frames:
        b = raw.v4l2_buffer()
        b.type, b.memory = CAP, memory
        ioc(fd, "DQBUF", b)
        chk.frame(views[b.index], b.bytesused)
        qbuf(b.index)
    ioc(fd, "STREAMOFF", ctypes.c_int(CAP))


def main() -> None:
    mode, path, frames = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fd = os.open(path, os.O_RDWR)
    f = raw.v4l2_format()
    f.type = CAP
    ioc(fd, "G_FMT", f)
    if len(sys.argv) > 5:
        f.fmt.pix.width, f.fmt.pix.height = int(sys.argv[4]), int(sys.argv[5])
        f.fmt.pix.pixelformat, f.fmt.pix.bytesperline = abi.PixelFormat.NV12, 0
        ioc(fd, "S_FMT", f)
    chk = Checker(f.fmt.pix)
    try:
        if mode == "read":
            stream_read(fd, chk, frames)
        else:
            stream_queue(fd, chk, frames, {"userptr": raw.Memory.USERPTR, "mmap": raw.Memory.MMAP}[mode])
    except OSError as e:
        print("ERR", errno.errorcode.get(e.errno, e.errno), chk.frames, flush=True)
        return
    print("OK", chk.frames, chk.bytes, flush=True)


if __name__ == "__main__":
    main()
