"""REQBUFS(MMAP, 4) on argv[1] with /dev/null held open beside it (tests/shim/test_shim.py)."""
import fcntl, os, sys
from linuxpy.video import raw
from impv4l2.v4l2 import abi
null = os.open("/dev/null", os.O_RDWR)  # the fake node's "CUSE device", held beside the FUSE file
fd = os.open(sys.argv[1], os.O_RDWR)
rb = raw.v4l2_requestbuffers(count=4, type=raw.BufType.VIDEO_CAPTURE, memory=raw.Memory.MMAP)
fcntl.ioctl(fd, abi.VIDIOC["REQBUFS"], rb)
print("buffers", rb.count)
