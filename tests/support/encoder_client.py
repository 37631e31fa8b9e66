"""An in-process M2M encoder client for tests: drives a NodeHandle with linuxpy structs.

The test process is the client; MMAP buffers are reached through the node's
memory (what a client's mmap of the node file shows).
"""

from __future__ import annotations

import ctypes
import errno
import time

import numpy as np

from impv4l2.fileops import WouldBlock
from impv4l2.v4l2 import abi

from .v4l2_helpers import ioctl, open_node

BT = abi.BufType
PF = abi.PixelFormat


def texture(width: int, height: int, seed: int = 1) -> np.ndarray:
    """A smooth random luma texture twice the frame width (scrolled per frame)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(16, 235, (height // 8 + 1, width // 4 + 1), dtype=np.uint8)
    big = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)[:height, :2 * width]
    return big.astype(np.uint8)


def make_frame(tex: np.ndarray, i: int, width: int, height: int, fmt: str = "nv12",
               noise: int = 6) -> bytes:
    """Frame ``i``: the texture scrolled by 4 px per frame plus some noise."""
    y = tex[:, (i * 4) % width:(i * 4) % width + width].astype(np.int16)
    if noise:
        y = y + np.random.default_rng(i).integers(-noise, noise + 1, y.shape, dtype=np.int16)
    y = np.clip(y, 0, 255).astype(np.uint8)
    c = np.full(width * height // 2, 128, np.uint8)
    c[: width * height // 4] = 100 + (i % 50)  # U plane (YU12) / first half of UV (NV12)
    return y.tobytes() + c.tobytes()


class M2MClient:
    """One encoding session over an EncoderNode handle."""

    def __init__(self, node, width: int, height: int, *, fourcc=PF.NV12, mplane: bool = True,
                 n_out: int = 4, n_cap: int = 4, pid: int = 1000, sizeimage: int = 0,
                 controls: dict[int, int] | None = None, fps: int = 30, memory=abi.Memory.MMAP,
                 handle=None):
        self.node = node
        self.h = handle if handle is not None else open_node(node, pid)
        self.mplane = mplane
        self.out_t = BT.VIDEO_OUTPUT_MPLANE if mplane else BT.VIDEO_OUTPUT
        self.cap_t = BT.VIDEO_CAPTURE_MPLANE if mplane else BT.VIDEO_CAPTURE
        self.memory = memory
        f = self.fmt(self.cap_t, 0, 0, PF.H264, sizeimage)
        ioctl(self.h, "S_FMT", f)
        f = self.fmt(self.out_t, width, height, fourcc)
        ioctl(self.h, "S_FMT", f)
        self.out_fmt = f
        pix = f.fmt.pix_mp if mplane else f.fmt.pix
        self.width, self.height = pix.width, pix.height
        self.frame_size = pix.plane_fmt[0].sizeimage if mplane else pix.sizeimage
        for cid, v in (controls or {}).items():
            self.ctrl(cid, v)
        p = abi.v4l2_streamparm()
        p.type = self.out_t
        p.parm.output.timeperframe.numerator, p.parm.output.timeperframe.denominator = 1, fps
        ioctl(self.h, "S_PARM", p)
        self.out_bufs = self.reqbufs(self.out_t, n_out)
        self.cap_bufs = self.reqbufs(self.cap_t, n_cap)
        self._userptr_keep: list = []

    # ------------------------------------------------------------ ioctl helpers

    def fmt(self, t, w, h, fourcc, sizeimage=0):
        f = abi.v4l2_format()
        f.type = t
        if t in (BT.VIDEO_OUTPUT_MPLANE, BT.VIDEO_CAPTURE_MPLANE):
            pix = f.fmt.pix_mp
            pix.plane_fmt[0].sizeimage = sizeimage
            pix.num_planes = 1
        else:
            pix = f.fmt.pix
            pix.sizeimage = sizeimage
        pix.width, pix.height, pix.pixelformat = w, h, fourcc
        return f

    def ctrl(self, cid, value=None):
        c = abi.v4l2_control()
        c.id = cid
        if value is None:
            ioctl(self.h, "G_CTRL", c)
            return c.value
        c.value = value
        ioctl(self.h, "S_CTRL", c)
        return c.value

    def reqbufs(self, t, n):
        r = abi.v4l2_requestbuffers()
        r.count, r.type, r.memory = n, t, self.memory
        ioctl(self.h, "REQBUFS", r)
        bufs = []
        for i in range(r.count):
            b, planes = self.buf(t, i)
            ioctl(self.h, "QUERYBUF", b)
            if self.mplane:
                bufs.append((planes[0].m.mem_offset, planes[0].length))
            else:
                bufs.append((b.m.offset, b.length))
        return bufs

    def buf(self, t, index=0):
        b = abi.v4l2_buffer()
        b.index, b.type, b.memory = index, t, self.memory
        planes = None
        if self.mplane:
            planes = (abi.v4l2_plane * 1)()
            b.m.planes = ctypes.cast(planes, type(b.m.planes))
            b.length = 1
        return b, planes

    def view(self, t, index) -> memoryview:
        off, length = (self.out_bufs if t == self.out_t else self.cap_bufs)[index]
        if isinstance(self.h, FdHandle):
            return self.h.map(off, length)
        return self.node.memory.view(off, length)

    def streamon(self):
        ioctl(self.h, "STREAMON", abi.c_int(self.out_t))
        ioctl(self.h, "STREAMON", abi.c_int(self.cap_t))

    def streamoff(self, t):
        ioctl(self.h, "STREAMOFF", abi.c_int(t))

    def queue_out(self, index, data: bytes, ts_us: int = 0, bytesused: int | None = None):
        b, planes = self.buf(self.out_t, index)
        used = len(data) if bytesused is None else bytesused
        if self.memory == abi.Memory.USERPTR:
            arr = (ctypes.c_char * self.frame_size).from_buffer_copy(data.ljust(self.frame_size, b"\0"))
            self._userptr_keep.append(arr)
            ptr = ctypes.addressof(arr)
            if self.mplane:
                planes[0].m.userptr, planes[0].length = ptr, self.frame_size
            else:
                b.m.userptr, b.length = ptr, self.frame_size
        else:
            self.view(self.out_t, index)[:len(data)] = data
        if self.mplane:
            planes[0].bytesused = used
        else:
            b.bytesused = used
        b.timestamp.secs, b.timestamp.usecs = divmod(ts_us, 1_000_000)
        ioctl(self.h, "QBUF", b)

    def queue_cap(self, index):
        b, planes = self.buf(self.cap_t, index)
        if self.memory == abi.Memory.USERPTR:
            size = self.cap_bufs[index][1]
            arr = (ctypes.c_char * size)()
            self._userptr_keep.append(arr)
            if self.mplane:
                planes[0].m.userptr, planes[0].length = ctypes.addressof(arr), size
            else:
                b.m.userptr, b.length = ctypes.addressof(arr), size
        ioctl(self.h, "QBUF", b)

    def dqbuf(self, t, timeout: float = 10.0):
        """DQBUF with retries (as the transport would park it); returns (buf, bytesused, data)."""
        deadline = time.monotonic() + timeout
        while True:
            b, planes = self.buf(t)
            try:
                ioctl(self.h, "DQBUF", b)
                break
            except WouldBlock:
                if time.monotonic() > deadline:
                    raise TimeoutError("no buffer within the liveness bound")
                time.sleep(0.002)
        used = planes[0].bytesused if self.mplane else b.bytesused
        data = b""
        if t == self.cap_t:
            if self.memory == abi.Memory.USERPTR:
                ptr = planes[0].m.userptr if self.mplane else b.m.userptr
                data = ctypes.string_at(ptr, used)
            else:
                data = bytes(self.view(t, b.index)[:used])
        return b, used, data

    def encoder_cmd(self, cmd, name="ENCODER_CMD"):
        c = abi.raw.v4l2_encoder_cmd()
        c.cmd = cmd
        ioctl(self.h, name, c)
        return c

    def close(self):
        self.h.release()

    # ------------------------------------------------------------ a simple pipeline

    def encode(self, frames, *, ts0_us: int = 0, step_us: int = 33_333):
        """Encode an iterable of raw frames one at a time; returns [(buf, data)]."""
        out = []
        for i, data in enumerate(frames):
            self.queue_cap(i % len(self.cap_bufs))
            self.queue_out(i % len(self.out_bufs), data, ts0_us + i * step_us)
            b, _, au = self.dqbuf(self.cap_t)
            self.dqbuf(self.out_t)
            out.append((b, au))
        return out


def err_of(fn, *a, **kw) -> int:
    try:
        fn(*a, **kw)
    except OSError as ex:
        return ex.errno
    except WouldBlock:
        return errno.EAGAIN
    return 0


class FdHandle:
    """A real file of a served node (FUSE): ioctl with fcntl, buffers with mmap.
    Quacks like a NodeHandle for v4l2_helpers.ioctl (EAGAIN -> WouldBlock)."""

    def __init__(self, path: str):
        import os
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self.maps: dict[tuple[int, int], object] = {}

    def ioctl(self, cmd, arg, mem):
        import fcntl
        try:
            return fcntl.ioctl(self.fd, cmd, arg, True)
        except BlockingIOError:
            raise WouldBlock() from None

    def map(self, off: int, length: int) -> memoryview:
        import mmap
        m = self.maps.get((off, length))
        if m is None:
            m = self.maps[(off, length)] = mmap.mmap(self.fd, length, offset=off)
        return memoryview(m)

    def poll(self) -> int:
        import select
        p = select.poll()
        p.register(self.fd, select.POLLIN | select.POLLOUT | select.POLLPRI)
        return sum(m for _, m in p.poll(0))

    def release(self):
        import os
        for m in self.maps.values():
            try:
                m.close()
            except BufferError:
                pass
        os.close(self.fd)
