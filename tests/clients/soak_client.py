"""Soak clients (benchmarks/soak.py starts them; any door).

    python tests/clients/soak_client.py capture PATH SECONDS MEMORY FOURCC WIDTH HEIGHT
    python tests/clients/soak_client.py m2m PATH SECONDS WIDTH HEIGHT
    python tests/clients/soak_client.py opener PATH SECONDS
    python tests/clients/soak_client.py controls PATH SECONDS
    python tests/clients/soak_client.py drain-parked PATH 0 WIDTH HEIGHT

Each runs until SECONDS pass or SIGTERM, then prints one JSON line of counts.  ``capture``
keeps 6 buffers queued and counts frames and sequence gaps (frames the driver dropped while
this client held buffers); ``m2m`` encodes NV12 frames through the stateful encoder, drains
at the end and counts frames in and out; ``opener`` opens, queries, tries to take the queue
(EBUSY when another client owns it) and closes, over and over; ``controls`` sets ISP
controls.  Any of them may be killed with SIGKILL at any moment: that is the point.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import random
import select
import signal
import sys
import time

from linuxpy.video import raw

from impv4l2.v4l2 import abi

CAP, OUT_MP, CAP_MP = raw.BufType.VIDEO_CAPTURE, raw.BufType.VIDEO_OUTPUT_MPLANE, raw.BufType.VIDEO_CAPTURE_MPLANE
MMAP, USERPTR = raw.Memory.MMAP, raw.Memory.USERPTR
FOURCC = {"NV12": abi.PixelFormat.NV12, "YUYV": abi.PixelFormat.YUYV, "H264": abi.PixelFormat.H264,
          "MJPG": abi.PixelFormat.MJPEG}
STOP = False


def _stop(*_):
    global STOP
    STOP = True


def ioc(fd: int, name: str, s) -> None:
    fcntl.ioctl(fd, abi.VIDIOC[name], s)


def busy_retry(fd: int, name: str, s, seconds: float = 3.0) -> int:
    """The ioctl, retried while another client briefly owns the queue (EBUSY); returns retries."""
    deadline = time.monotonic() + seconds
    n = 0
    while True:
        try:
            ioc(fd, name, s)
            return n
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            n += 1
            time.sleep(0.02)


def capture(path: str, seconds: float, memory: str, fourcc: str, w: int, h: int) -> dict:
    fd = os.open(path, os.O_RDWR)
    f = raw.v4l2_format()
    f.type = CAP
    f.fmt.pix.width, f.fmt.pix.height, f.fmt.pix.pixelformat = w, h, FOURCC[fourcc]
    busy = busy_retry(fd, "S_FMT", f)  # an opener may hold the queue for a moment
    size = f.fmt.pix.sizeimage
    mem = {"mmap": MMAP, "userptr": USERPTR}[memory]
    r = raw.v4l2_requestbuffers()
    r.count, r.type, r.memory = 6, CAP, mem
    busy += busy_retry(fd, "REQBUFS", r)
    keep = []
    for i in range(r.count):
        b = raw.v4l2_buffer()
        b.index, b.type, b.memory = i, CAP, mem
        if mem == MMAP:
            ioc(fd, "QUERYBUF", b)
            keep.append(mmap.mmap(fd, b.length, offset=b.m.offset))
        else:
            keep.append(ctypes.create_string_buffer(size))
            b.m.userptr, b.length = ctypes.addressof(keep[-1]), size
        ioc(fd, "QBUF", b)
    ioc(fd, "STREAMON", ctypes.c_int(CAP))
    frames = gaps = 0
    last = None
    end = time.monotonic() + seconds
    while not STOP and time.monotonic() < end:
        b = raw.v4l2_buffer()
        b.type, b.memory = CAP, mem
        try:
            ioc(fd, "DQBUF", b)
        except InterruptedError:
            continue
        if last is not None and b.sequence > last + 1:
            gaps += b.sequence - last - 1
        last = b.sequence
        frames += 1
        if mem == USERPTR:
            b.m.userptr, b.length = ctypes.addressof(keep[b.index]), size
        ioc(fd, "QBUF", b)
    ioc(fd, "STREAMOFF", ctypes.c_int(CAP))
    os.close(fd)
    return {"frames": frames, "gaps": gaps, "busy_retries": busy}


class M2M:
    """A stateful-encoder session: NV12 in, H.264 out, 2 MMAP buffers per queue, O_NONBLOCK."""

    def __init__(self, path: str, w: int, h: int, nonblock: bool = True) -> None:
        self.fd = fd = os.open(path, os.O_RDWR | (os.O_NONBLOCK if nonblock else 0))
        for t, fourcc in ((CAP_MP, abi.PixelFormat.H264), (OUT_MP, abi.PixelFormat.NV12)):
            f = raw.v4l2_format()
            f.type = t
            f.fmt.pix_mp.width, f.fmt.pix_mp.height, f.fmt.pix_mp.pixelformat = w, h, fourcc
            f.fmt.pix_mp.num_planes = 1
            ioc(fd, "S_FMT", f)
        sub = raw.v4l2_event_subscription()
        sub.type = abi.EventType.EOS
        ioc(fd, "SUBSCRIBE_EVENT", sub)
        self.maps: dict[int, list] = {}
        for t in (OUT_MP, CAP_MP):
            r = raw.v4l2_requestbuffers()
            r.count, r.type, r.memory = 2, t, MMAP
            ioc(fd, "REQBUFS", r)
            self.maps[t] = []
            for i in range(r.count):
                b, planes = self._buf(t, i)
                ioc(fd, "QUERYBUF", b)
                self.maps[t].append((mmap.mmap(fd, planes[0].length, offset=planes[0].m.mem_offset),
                                     planes[0].length))
        self.frame = w * h * 3 // 2
        for i, (m, _) in enumerate(self.maps[OUT_MP]):
            m[:self.frame] = bytes([16 + 40 * i]) * self.frame

    @staticmethod
    def _buf(t: int, index: int = 0):
        planes = (raw.v4l2_plane * 1)()
        b = raw.v4l2_buffer()
        b.index, b.type, b.memory, b.length = index, t, MMAP, 1
        b.m.planes = ctypes.cast(planes, type(b.m.planes))
        return b, planes

    def streamon(self) -> None:
        for t in (OUT_MP, CAP_MP):
            ioc(self.fd, "STREAMON", ctypes.c_int(t))

    def qbuf(self, t: int, i: int, used: int = 0) -> None:
        b, planes = self._buf(t, i)
        planes[0].bytesused, planes[0].length = used, self.maps[t][i][1]
        ioc(self.fd, "QBUF", b)

    def dqbuf(self, t: int):
        b, planes = self._buf(t)
        ioc(self.fd, "DQBUF", b)
        return b, planes[0].bytesused

    def stop(self) -> None:
        cmd = raw.v4l2_encoder_cmd()
        cmd.cmd = 1  # V4L2_ENC_CMD_STOP: drain, then LAST
        ioc(self.fd, "ENCODER_CMD", cmd)


def m2m(path: str, seconds: float, w: int, h: int) -> dict:
    s = M2M(path, w, h)
    for i in range(2):
        s.qbuf(CAP_MP, i)
    s.streamon()
    sent = got = 0
    free_out = [0, 1]
    end = time.monotonic() + seconds
    while not STOP and time.monotonic() < end:
        while free_out:
            s.qbuf(OUT_MP, free_out.pop(), s.frame)
            sent += 1
        select.select([s.fd], [s.fd], [], 1.0)
        try:
            b, n = s.dqbuf(CAP_MP)
            got += n > 0
            s.qbuf(CAP_MP, b.index)
        except BlockingIOError:
            pass
        try:
            b, _ = s.dqbuf(OUT_MP)
            free_out.append(b.index)
        except BlockingIOError:
            pass
    s.stop()
    last = False
    deadline = time.monotonic() + 30
    while not last and time.monotonic() < deadline:
        select.select([s.fd], [], [], 1.0)
        try:
            b, n = s.dqbuf(CAP_MP)
        except BlockingIOError:
            continue
        got += n > 0
        last = bool(b.flags & raw.BufferFlag.LAST)
        if not last:
            s.qbuf(CAP_MP, b.index)
    os.close(s.fd)
    return {"frames_in": sent, "frames_out": got, "lost": sent - got, "drained": last}


def drain_parked(path: str, w: int, h: int) -> dict:
    """Frames in, ENC_CMD_STOP, then a blocking DQBUF(CAPTURE) with no CAPTURE buffer queued:
    the drain cannot finish, the call parks in the daemon until something ends it."""
    s = M2M(path, w, h, nonblock=False)
    s.streamon()
    for i in range(2):
        s.qbuf(OUT_MP, i, s.frame)
    s.stop()
    print("draining", flush=True)
    t0 = time.monotonic()
    try:
        b, _ = s.dqbuf(CAP_MP)
        return {"result": "LAST" if b.flags & raw.BufferFlag.LAST else "buffer", "after": time.monotonic() - t0}
    except OSError as e:
        return {"result": errno.errorcode.get(e.errno, str(e.errno)), "after": time.monotonic() - t0}


def opener(path: str, seconds: float) -> dict:
    ops = busy = 0
    end = time.monotonic() + seconds
    rng = random.Random(os.getpid())
    while not STOP and time.monotonic() < end:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        cap = raw.v4l2_capability()
        ioc(fd, "QUERYCAP", cap)
        t = OUT_MP if cap.device_caps & raw.Capability.VIDEO_M2M_MPLANE else CAP
        f = raw.v4l2_format()
        f.type = t
        ioc(fd, "G_FMT", f)
        d = raw.v4l2_fmtdesc()
        d.type = t
        ioc(fd, "ENUM_FMT", d)
        r = raw.v4l2_requestbuffers()
        r.count, r.type, r.memory = rng.choice([1, 2]), t, MMAP
        try:
            ioc(fd, "REQBUFS", r)
            r.count = 0
            ioc(fd, "REQBUFS", r)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            busy += 1
        os.close(fd)
        ops += 1
    return {"opens": ops, "busy": busy}


def controls(path: str, seconds: float) -> dict:
    fd = os.open(path, os.O_RDWR)
    rng = random.Random(os.getpid())
    n = 0
    end = time.monotonic() + seconds
    while not STOP and time.monotonic() < end:
        c = raw.v4l2_control()
        c.id, c.value = rng.choice([(abi.CID.BRIGHTNESS, rng.randrange(0, 256)),
                                    (abi.CID.CONTRAST, rng.randrange(0, 256)),
                                    (abi.CID.SATURATION, rng.randrange(0, 256))])
        ioc(fd, "S_CTRL", c)
        n += 1
        time.sleep(0.01)
    c = raw.v4l2_control()
    c.id, c.value = abi.CID.BRIGHTNESS, 128
    ioc(fd, "S_CTRL", c)
    os.close(fd)
    return {"sets": n}


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    role, path, seconds, *rest = sys.argv[1:]
    fn = {"capture": lambda: capture(path, float(seconds), rest[0], rest[1], int(rest[2]), int(rest[3])),
          "m2m": lambda: m2m(path, float(seconds), int(rest[0]), int(rest[1])),
          "drain-parked": lambda: drain_parked(path, int(rest[0]), int(rest[1])),
          "opener": lambda: opener(path, float(seconds)),
          "controls": lambda: controls(path, float(seconds))}[role]
    try:
        out = fn()
    except OSError as e:
        out = {"error": errno.errorcode.get(e.errno, str(e.errno)), "message": str(e)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
