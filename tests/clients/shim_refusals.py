import errno, fcntl, mmap, os, sys
from linuxpy.video import raw
fd = os.open(sys.argv[1], os.O_RDWR)
ioc = lambda cmd, s: fcntl.ioctl(fd, cmd & 0xFFFFFFFF, s)
CAP = raw.BufType.VIDEO_CAPTURE

def try_map(length, offset, prot=mmap.PROT_READ):
    try:
        mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=offset).close()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def reqbufs(n, memory):
    req = raw.v4l2_requestbuffers(count=n, type=CAP, memory=memory)
    ioc(raw.IOC.REQBUFS, req)
    bufs = []
    for i in range(req.count):
        b = raw.v4l2_buffer(index=i, type=CAP, memory=memory)
        ioc(raw.IOC.QUERYBUF, b)
        bufs.append((b.m.offset, b.length))
    return bufs

bufs = reqbufs(2, raw.Memory.MMAP)
off, length = bufs[1]
print("querybuf", try_map(length, off))
print("too-long", try_map(length + mmap.PAGESIZE, off))
print("inside", try_map(mmap.PAGESIZE, off + mmap.PAGESIZE))
print("write-only", try_map(length, off, mmap.PROT_WRITE))
kept = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=off)
reqbufs(0, raw.Memory.MMAP)
print("freed", try_map(length, off))
print("orphan-readable", len(kept[:16]))  # an existing mapping outlives REQBUFS(0), as vb2's
reqbufs(2, raw.Memory.USERPTR)
print("userptr", try_map(length, 0), try_map(length, off))
