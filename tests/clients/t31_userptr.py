"""A capture client in its own process (a hang cannot take the test with it): USERPTR streaming of
argv[2] (a fourcc) at argv[3] x argv[4] on node argv[1].  Without argv[5] it prints one line per
DQBUF, "flags <n> bytes <n>" or "errno <name>", for three buffers; with argv[5] it takes one AU,
sets the codec-class bit rate argv[5] with VIDIOC_S_EXT_CTRLS while streaming, takes one more and
prints "ok" (tests/driver/t31/test_t31_serve.py)."""
import ctypes, errno, fcntl, os, sys
from linuxpy.video import raw
from impv4l2.v4l2 import abi
CAP, UPTR = raw.BufType.VIDEO_CAPTURE, raw.Memory.USERPTR
def ioc(name, s):
    fcntl.ioctl(fd, abi.VIDIOC[name], s)
fd = os.open(sys.argv[1], os.O_RDWR)
f = raw.v4l2_format(); f.type = CAP
f.fmt.pix.width, f.fmt.pix.height = int(sys.argv[3]), int(sys.argv[4])
f.fmt.pix.pixelformat = int.from_bytes(sys.argv[2].encode(), "little")
ioc("S_FMT", f)
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


if len(sys.argv) < 6:
    for _ in range(3):
        b = raw.v4l2_buffer(); b.type, b.memory = CAP, UPTR
        try:
            ioc("DQBUF", b)
        except OSError as e:
            print("errno", errno.errorcode.get(e.errno, e.errno), flush=True)
            continue
        print("flags", b.flags, "bytes", b.bytesused, flush=True)
        qbuf(b.index)
    ioc("STREAMOFF", ctypes.c_int(CAP))
else:
    def dqbuf():
        b = raw.v4l2_buffer(); b.type, b.memory = CAP, UPTR
        ioc("DQBUF", b)
        qbuf(b.index)
    dqbuf()
    arr = (abi.v4l2_ext_control * 1)()
    arr[0].id, arr[0].value = abi.CID.MPEG_VIDEO_BITRATE, int(sys.argv[5])
    cs = abi.v4l2_ext_controls()
    cs.which, cs.count = abi.CtrlClass.CODEC, 1
    cs.controls = ctypes.cast(arr, ctypes.POINTER(abi.v4l2_ext_control))
    ioc("S_EXT_CTRLS", cs)
    dqbuf()
    ioc("STREAMOFF", ctypes.c_int(CAP))
    print("ok")
