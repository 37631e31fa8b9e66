"""A streaming client in its own process: USERPTR streaming of argv[1] (works on FUSE files and
CUSE nodes alike); prints "frames" after 3 frames, then "error <ERRNO> <frames> <monotonic time>"
when a call fails (support.daemon.StreamingClient)."""
import ctypes
import errno
import fcntl
import os
import sys
import time

from linuxpy.video import raw
from impv4l2.v4l2 import abi
CAP, UPTR = raw.BufType.VIDEO_CAPTURE, raw.Memory.USERPTR
def ioc(name, s):
    fcntl.ioctl(fd, abi.VIDIOC[name], s)
fd = os.open(sys.argv[1], os.O_RDWR)
n = 0
try:
    f = raw.v4l2_format(); f.type = CAP; ioc("G_FMT", f)
    size = f.fmt.pix.sizeimage
    r = raw.v4l2_requestbuffers(); r.count, r.type, r.memory = 2, CAP, UPTR; ioc("REQBUFS", r)
    mem = [ctypes.create_string_buffer(size) for _ in range(r.count)]
    def qbuf(i):
        b = raw.v4l2_buffer(); b.index, b.type, b.memory = i, CAP, UPTR
        b.m.userptr, b.length = ctypes.addressof(mem[i]), size
        ioc("QBUF", b)
    for i in range(r.count):
        qbuf(i)
    ioc("STREAMON", ctypes.c_int(CAP))
    while True:
        b = raw.v4l2_buffer(); b.type, b.memory = CAP, UPTR
        ioc("DQBUF", b)
        n += 1
        if n == 3:
            print("frames", flush=True)
        qbuf(b.index)
except OSError as e:
    print("error", errno.errorcode.get(e.errno, e.errno), n, time.monotonic(), flush=True)
