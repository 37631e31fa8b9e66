#!/usr/bin/env python3
"""Transport benchmark: ioctl round trips through FUSE (and CUSE when /dev/cuse exists) beside a
plain kernel ioctl, and mmap streaming rate per FUSE mmap mode.

The server runs in this process (like the driver); clients are separate processes.
Run as root:  .venv/bin/python benchmarks/bench_transport.py [--n 20000] [--frames 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from impv4l2.fuse import CuseServer, FuseMount, cuse_available  # noqa: E402
from support.fuse_echo_device import EchoDevice  # noqa: E402

W, H = 640, 480
FRAME = W * H * 2  # YUYV

CLIENT = r"""
import fcntl, json, mmap, os, struct, sys, termios, time
sys.path.insert(0, {tests!r})
from support.fuse_echo_device import ECHO, DQ, REGION_S
what, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def stats(samples):
    samples.sort()
    return {{"median": samples[len(samples) // 2] * 1e6, "p99": samples[int(len(samples) * 0.99)] * 1e6}}

if what == "ioctl":
    fd = os.open(path, os.O_RDWR)
    buf = bytearray(64)
    out = {{}}
    for name, f, cmd in (("transport", fd, ECHO(64)),):
        for _ in range(500):
            fcntl.ioctl(f, cmd, buf)
        s = []
        clock = time.perf_counter
        for _ in range(n):
            t = clock(); fcntl.ioctl(f, cmd, buf); s.append(clock() - t)
        out[name] = stats(s)
    r, w = os.pipe()
    ib = bytearray(4)
    s = []
    for _ in range(n):
        t = time.perf_counter(); fcntl.ioctl(r, termios.FIONREAD, ib); s.append(time.perf_counter() - t)
    out["kernel"] = stats(s)
    print(json.dumps(out))
else:
    fd = os.open(path, os.O_RDWR)
    nbuf = 4
    mp = mmap.mmap(fd, nbuf * {frame})
    mv = memoryview(mp)
    st = bytearray(16)
    t0 = time.perf_counter()
    for i in range(n):
        off = (i % nbuf) * {frame}
        REGION_S.pack_into(st, 0, off, {frame}, i, 0)
        fcntl.ioctl(fd, DQ, st)                         # dqbuf-like
        frame = bytes(mv[off:off + {frame}])            # the client reads the mapping
        assert frame[:4] == frame[-4:] == struct.pack("<I", i), "stale frame"
    dt = time.perf_counter() - t0
    print(json.dumps({{"fps": n / dt, "MBps": n * {frame} / dt / 1e6}}))
"""


def run_client(what: str, path: str, n: int) -> dict:
    code = CLIENT.format(tests=os.path.join(ROOT, "tests"), frame=FRAME)
    out = subprocess.run([sys.executable, "-c", code, what, path, str(n)], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="ioctls per measurement")
    ap.add_argument("--frames", type=int, default=2000, help="frames per mmap mode")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="impv4l2-bench-")
    rows = []
    m = FuseMount(os.path.join(tmp, "mnt"))
    m.start()
    m.add(EchoDevice("echo0", memory_size=0))
    try:
        r = run_client("ioctl", os.path.join(m.mountpoint, "echo0"), args.n)
        rows.append(("FUSE mount ioctl (64 B, restricted)", r["transport"]))
        rows.append(("kernel ioctl FIONREAD on a pipe", r["kernel"]))
    finally:
        m.stop()
    if cuse_available():
        srv = CuseServer(EchoDevice("impv4l2-bench0", memory_size=0))
        srv.start()
        try:
            path = f"/dev/{srv.devname}"
            for _ in range(500):
                if os.path.exists(path):
                    break
                time.sleep(0.01)
            r = run_client("ioctl", path, args.n)
            rows.append(("CUSE ioctl (64 B, 1 retry)", r["transport"]))
            rows.append(("kernel ioctl FIONREAD on a pipe (same run)", r["kernel"]))
        finally:
            srv.stop()
    print(f"\nioctl round trip, {args.n} calls, client in its own process")
    print(f"{'path':46} {'median µs':>10} {'p99 µs':>10}")
    for name, s in rows:
        print(f"{name:46} {s['median']:10.1f} {s['p99']:10.1f}")

    print(f"\nmmap streaming {W}x{H} YUYV ({FRAME} B/frame), {args.frames} frames: DQ ioctl + read mapping")
    print(f"{'mode':14} {'fps':>10} {'MB/s':>10}")
    for mode in ("passthrough", "direct", "cached"):
        m = FuseMount(os.path.join(tmp, "mnt"), mmap_mode=mode)
        try:
            m.start()
        except OSError as e:
            print(f"{mode:14} unavailable: {e}")
            continue
        try:
            m.add(EchoDevice("cam0", memory_size=4 * FRAME))
            r = run_client("stream", os.path.join(m.mountpoint, "cam0"), args.frames)
            print(f"{m.mmap_mode:14} {r['fps']:10.0f} {r['MBps']:10.0f}")
        finally:
            m.stop()
    os.rmdir(os.path.join(tmp, "mnt"))
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
