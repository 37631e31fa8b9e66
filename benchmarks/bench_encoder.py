"""M2M encoder node throughput vs libx264 through PyAV directly, side by side.

For each size (1280x720, 1920x1080, NV12) this runs, in one process:

* ``direct``: the sim AVPU channel (libx264 via PyAV, the node's exact
  settings) encoding frames from memory with ``encode_into``;
* ``node``: the EncoderNode served on a real FUSE mount, driven by a client
  that uses only the node file (fcntl.ioctl + mmap, MMAP buffers, O_NONBLOCK
  + poll), with 4 OUTPUT and 4 CAPTURE buffers in flight.

Printed per size: frames/s of both, their ratio (goal >= 0.85), CPU per frame
of the node's side (encoder worker thread; whole process incl. the client
and the FUSE loop), and copies per frame (raw frame copies made by the
driver / copies of the access unit).

Run as root:  .venv/bin/python benchmarks/bench_encoder.py [--frames 300] [--mode auto]
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import mmap
import os
import select
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from impv4l2.driver import load_backend  # noqa: E402
from impv4l2.driver.base import EncoderParams, RcMode  # noqa: E402
from impv4l2.v4l2 import abi  # noqa: E402

BT = abi.BufType
V = abi.VIDIOC
NBUF = 4


def frames_for(w: int, h: int, n: int = NBUF) -> list[bytes]:
    rng = np.random.default_rng(1)
    small = rng.integers(16, 235, (h // 8 + 1, w // 4 + 1), dtype=np.uint8)
    tex = np.repeat(np.repeat(small, 8, 0), 8, 1)[:h, :2 * w]
    out = []
    for i in range(n):
        y = np.ascontiguousarray(tex[:, i * 8:i * 8 + w])
        out.append(y.tobytes() + bytes([128]) * (w * h // 2))
    return out


def params(w: int, h: int) -> EncoderParams:
    return EncoderParams(width=w, height=h, fps_num=30, fps_den=1, rc_mode=RcMode.VBR,
                         bitrate=4_000_000, max_bitrate=8_000_000, gop=30)


def bench_direct(backend, w: int, h: int, n: int) -> dict:
    ch = backend.encoder.create_channel(params(w, h))
    src = [memoryview(f) for f in frames_for(w, h)]
    out = memoryview(bytearray(w * h * 3 // 2))
    ch.encode_into(src[0], 0, out)  # warm up
    c0, t0 = time.process_time(), time.perf_counter()
    total = 0
    for i in range(n):
        total += ch.encode_into(src[i % len(src)], i, out)[0]
    t = time.perf_counter() - t0
    cpu = time.process_time() - c0
    ch.close()
    return {"fps": n / t, "cpu_ms": cpu * 1000 / n, "bytes": total / n}


def _ioctl(fd: int, name: str, s) -> None:
    buf = bytearray(s)
    try:
        fcntl.ioctl(fd, V[name], buf, True)
    finally:
        ctypes.memmove(ctypes.addressof(s), bytes(buf), len(buf))


def bench_node(node, path: str, w: int, h: int, n: int) -> dict:
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    maps = []
    try:
        def fmt(t, fourcc, ww=0, hh=0):
            f = abi.v4l2_format()
            f.type = t
            f.fmt.pix_mp.width, f.fmt.pix_mp.height, f.fmt.pix_mp.pixelformat = ww, hh, fourcc
            f.fmt.pix_mp.num_planes = 1
            _ioctl(fd, "S_FMT", f)
            return f
        fmt(BT.VIDEO_CAPTURE_MPLANE, abi.PixelFormat.H264)
        fmt(BT.VIDEO_OUTPUT_MPLANE, abi.PixelFormat.NV12, w, h)
        p = params(w, h)
        for cid, v in ((abi.CID.MPEG_VIDEO_BITRATE, p.bitrate), (abi.CID.MPEG_VIDEO_BITRATE_PEAK, p.max_bitrate),
                       (abi.CID.MPEG_VIDEO_GOP_SIZE, p.gop)):
            _ioctl(fd, "S_CTRL", abi.v4l2_control(cid, v))
        planes = (abi.v4l2_plane * 1)()

        def buf(t, i=0):
            b = abi.v4l2_buffer()
            b.index, b.type, b.memory, b.length = i, t, abi.Memory.MMAP, 1
            b.m.planes = ctypes.cast(planes, type(b.m.planes))
            ctypes.memset(planes, 0, ctypes.sizeof(planes))
            return b

        views = {}
        for t in (BT.VIDEO_OUTPUT_MPLANE, BT.VIDEO_CAPTURE_MPLANE):
            r = abi.v4l2_requestbuffers()
            r.count, r.type, r.memory = NBUF, t, abi.Memory.MMAP
            _ioctl(fd, "REQBUFS", r)
            for i in range(r.count):
                b = buf(t, i)
                _ioctl(fd, "QUERYBUF", b)
                m = mmap.mmap(fd, planes[0].length, offset=planes[0].m.mem_offset)
                maps.append(m)
                views[(t, i)] = m
        src = frames_for(w, h)
        for i in range(NBUF):
            views[(BT.VIDEO_OUTPUT_MPLANE, i)][:len(src[i])] = src[i]  # written once, in place

        def q_out(i, seq):
            b = buf(BT.VIDEO_OUTPUT_MPLANE, i)
            planes[0].bytesused = len(src[i])
            b.timestamp.usecs = seq
            _ioctl(fd, "QBUF", b)

        for i in range(NBUF):
            _ioctl(fd, "QBUF", buf(BT.VIDEO_CAPTURE_MPLANE, i))
        for t in (BT.VIDEO_OUTPUT_MPLANE, BT.VIDEO_CAPTURE_MPLANE):
            _ioctl(fd, "STREAMON", ctypes.c_int(t))
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLOUT)
        queued = 0
        for i in range(min(NBUF, n)):
            q_out(i, queued)
            queued += 1
        ctx = node.contexts()[0]
        busy0 = ctx.busy_s
        c0, t0 = time.process_time(), time.perf_counter()
        got = total = 0
        # the first AU (channel creation) is part of the run, as for a client
        while got < n:
            poller.poll(1000)
            for t in (BT.VIDEO_CAPTURE_MPLANE, BT.VIDEO_OUTPUT_MPLANE):
                while True:
                    b = buf(t)
                    try:
                        _ioctl(fd, "DQBUF", b)
                    except BlockingIOError:
                        break
                    if t == BT.VIDEO_CAPTURE_MPLANE:
                        got += 1
                        total += planes[0].bytesused
                        _ioctl(fd, "QBUF", buf(t, b.index))
                    elif queued < n:
                        q_out(b.index, queued)
                        queued += 1
        t = time.perf_counter() - t0
        cpu = time.process_time() - c0
        return {"fps": n / t, "cpu_ms": cpu * 1000 / n, "worker_ms": (ctx.busy_s - busy0) * 1000 / n,
                "bytes": total / n, "frames": ctx.frames}
    finally:
        for m in maps:
            m.close()
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--mode", default="auto", help="FUSE mmap mode (auto|passthrough|direct|cached)")
    args = ap.parse_args()
    from impv4l2.fuse import FuseMount
    from impv4l2.v4l2.encoder import EncoderNode

    backend = load_backend("sim")
    node = EncoderNode("video90", backend)
    with tempfile.TemporaryDirectory() as tmp:
        mnt = FuseMount(os.path.join(tmp, "mnt"), mmap_mode=args.mode)
        mnt.start()
        try:
            path = mnt.add(node)
            print(f"FUSE mmap mode: {mnt.mmap_mode}; {args.frames} frames per run; NV12; "
                  f"x264 ultrafast zerolatency VBR 4 Mb/s gop 30\n")
            print(f"{'size':>10} {'direct fps':>10} {'node fps':>9} {'ratio':>6} "
                  f"{'worker ms/f':>11} {'process ms/f':>12} {'direct ms/f':>11} "
                  f"{'raw copies/f':>12} {'AU copies/f':>11} {'bytes/f n|d':>15}")
            for w, h in ((1280, 720), (1920, 1080)):
                d = bench_direct(backend, w, h, args.frames)
                r = bench_node(node, path, w, h, args.frames)
                # raw frames: the backend reads the client's mapping in place (0 copies);
                # AU: encode_into writes it once into the CAPTURE buffer (1 copy).
                print(f"{w}x{h:<5} {d['fps']:10.1f} {r['fps']:9.1f} {r['fps'] / d['fps']:6.2f} "
                      f"{r['worker_ms']:11.2f} {r['cpu_ms']:12.2f} {d['cpu_ms']:11.2f} "
                      f"{0:12d} {1:11d} {r['bytes']:7.0f}|{d['bytes']:<7.0f}")
        finally:
            mnt.stop()
            node.close()
            backend.close()


if __name__ == "__main__":
    main()
