#!/usr/bin/env python3
"""MMAP streaming through the preload shim (CUSE node) vs the FUSE file, side by side.

    .venv/bin/python benchmarks/bench_shim.py [--frames 300] [--size 1920x1080] [--fps 60]

Runs what the machine has: the shim row needs /dev/cuse (run it inside the VM,
design.md §6); the FUSE row needs root and /dev/fuse (its mmap mode is the
best the kernel offers: passthrough on >= 6.9, else cached/direct).

Per path, one daemon (sim backend) and one Python client that streams N
frames with REQBUFS(4, MMAP)/mmap/QBUF/DQBUF and touches every frame's Y
plane through its mapping.  Columns:

* fps — frames per second the client received (the sim sensor is paced: the
  ceiling is --fps; the number says whether the path keeps up);
* age ms — median (now - buffer timestamp) at DQBUF: delivery latency;
* client µs/frame — client CPU time per frame (DQBUF+QBUF+touching);
* copies/frame — bytes moved by read/write-family syscalls of daemon and
  client (/proc/<pid>/io rchar+wchar) during streaming, divided by the frame
  size.  A frame copied into the page cache (FUSE NOTIFY_STORE) or read()
  counts 1; the shim's client maps the driver's memfd (checked in
  /proc/self/maps), so only the small ioctl messages count: ~0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVE = r"""
import json, logging, os, sys
logging.basicConfig(level=logging.WARNING)
from impv4l2 import config
from impv4l2.daemon import Daemon
cfg = config.Config()
cfg.transport.cuse, cfg.transport.mount = sys.argv[1], sys.argv[2]
cfg.transport.dev_links = False
w, h = map(int, sys.argv[3].split("x"))
cfg.main = config.ChannelConfig(w, h, int(sys.argv[4]))
cfg.backend_tables["sim"] = {"width": w, "height": h, "fps": int(sys.argv[4])}
d = Daemon(cfg)
d.start()
if cfg.transport.cuse == "on" and getattr(d, "shim", None) is None:
    from impv4l2.shim import ShimServer
    d.shim = ShimServer(); d.shim.start()
    for srv in d.cuse:
        d.shim.attach(srv.device, rdev=os.makedev(*srv.devnum))
print(json.dumps({"main": d.nodes["main"].name, "mode": getattr(d.mount, "mmap_mode", None)}), flush=True)
sys.stdin.read()
d.stop()
"""

CLIENT = r"""
import ctypes, fcntl, json, mmap, os, statistics, sys, time
import numpy as np
from linuxpy.video import raw
path, w, h, n, dpid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
from benchmarks._common import io_bytes as io  # cwd is the repo root
fd = os.open(path, os.O_RDWR)
ioc = lambda cmd, s: fcntl.ioctl(fd, cmd & 0xFFFFFFFF, s)
CAP = raw.BufType.VIDEO_CAPTURE
f = raw.v4l2_format(type=CAP)
ioc(raw.IOC.G_FMT, f)
f.fmt.pix.width, f.fmt.pix.height, f.fmt.pix.pixelformat = w, h, raw.PixelFormat.NV12
ioc(raw.IOC.S_FMT, f)
req = raw.v4l2_requestbuffers(count=4, type=CAP, memory=raw.Memory.MMAP)
ioc(raw.IOC.REQBUFS, req)
maps = []
for i in range(req.count):
    b = raw.v4l2_buffer(index=i, type=CAP, memory=raw.Memory.MMAP)
    ioc(raw.IOC.QUERYBUF, b)
    maps.append(np.frombuffer(mmap.mmap(fd, b.length, mmap.MAP_SHARED, mmap.PROT_READ, offset=b.m.offset), np.uint8))
    ioc(raw.IOC.QBUF, b)
memfd_maps = sum("memfd:impv4l2-" in l for l in open("/proc/self/maps"))
ioc(raw.IOC.STREAMON, ctypes.c_int(CAP))
b = raw.v4l2_buffer(type=CAP, memory=raw.Memory.MMAP)
ioc(raw.IOC.DQBUF, b); ioc(raw.IOC.QBUF, b)  # warm-up
io0, dio0, t0, c0 = io("self"), io(dpid), time.monotonic(), time.process_time()
ages, touched = [], 0
for _ in range(n):
    b = raw.v4l2_buffer(type=CAP, memory=raw.Memory.MMAP)
    ioc(raw.IOC.DQBUF, b)
    now = time.clock_gettime(time.CLOCK_MONOTONIC)
    ages.append(now - (b.timestamp.secs + b.timestamp.usecs / 1e6))
    touched += int(maps[b.index][:w * h:4096].sum())  # touch every page of the Y plane
    ioc(raw.IOC.QBUF, b)
t1, c1, io1, dio1 = time.monotonic(), time.process_time(), io("self"), io(dpid)
frame = w * h * 3 // 2
print(json.dumps({"fps": n / (t1 - t0), "age_ms": statistics.median(ages) * 1e3,
                  "client_us": (c1 - c0) / n * 1e6, "copies": (io1 - io0 + dio1 - dio0) / n / frame,
                  "memfd_maps": memfd_maps}))
"""


def run_path(label: str, cuse: str, mount: str, size: str, fps: int, frames: int) -> dict | None:
    w, h = map(int, size.split("x"))
    d = subprocess.Popen([sys.executable, "-c", SERVE, cuse, mount, size, str(fps)], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(d.stdout.readline() or "null")
        if not info:
            print(f"{label}: daemon did not start", file=sys.stderr)
            return None
        path = f"/dev/{info['main']}" if cuse == "on" else os.path.join(mount, info["main"])
        cmd = [sys.executable, "-c", CLIENT, path, str(w), str(h), str(frames), str(d.pid)]
        if cuse == "on":
            cmd = [sys.executable, "-m", "impv4l2.cli", "run", "--", *cmd]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        if r.returncode:
            print(f"{label}: client failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            return None
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["path"] = label if cuse == "on" else f"{label} ({info['mode']})"
        return res
    finally:
        d.stdin.close()
        d.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--size", default="1920x1080")
    p.add_argument("--fps", type=int, default=60)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.exists("/dev/cuse"):
            rows.append(run_path("shim, CUSE /dev/videoN", "on", "", a.size, a.fps, a.frames))
        else:
            print("no /dev/cuse: shim row skipped (run inside the VM)", file=sys.stderr)
        if os.path.exists("/dev/fuse") and os.geteuid() == 0:
            rows.append(run_path("FUSE file", "off", os.path.join(tmp, "mnt"), a.size, a.fps, a.frames))
    rows = [r for r in rows if r]
    print(f"\nMMAP streaming, {a.size} NV12, sim sensor paced at {a.fps} fps, {a.frames} frames, "
          f"kernel {os.uname().release}")
    print(f"{'path':34} {'fps':>7} {'age ms':>7} {'client µs/frame':>16} {'copies/frame':>13} {'memfd maps':>11}")
    for r in rows:
        print(f"{r['path']:34} {r['fps']:7.1f} {r['age_ms']:7.2f} {r['client_us']:16.0f} {r['copies']:13.3f} "
              f"{r['memfd_maps']:11d}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
