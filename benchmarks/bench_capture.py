#!/usr/bin/env python3
"""Capture streaming through `impv4l2 serve`: 1920x1080 NV12 at 30 fps, per memory mode.

    .venv/bin/python benchmarks/bench_capture.py [--seconds 60] [--modes passthrough,direct,cached,userptr]

Root and /dev/fuse needed.  One daemon (`impv4l2 serve`, sim backend, a temp
TOML config with [main] 1920x1080 fps = 30, so the sim sensor runs at 30 fps)
per row: FUSE MMAP in each --mmap-mode (passthrough, direct, cached) and FUSE
USERPTR (the mount's auto mode; the mmap mode does not matter for USERPTR).
A Python client (raw ioctl + mmap, 4 buffers, blocking DQBUF) streams for
--seconds after a 1 s warm-up and records per frame: sequence, buffer
timestamp, CLOCK_MONOTONIC at DQBUF return; it touches one byte per page of
the Y plane (what a consumer reading the frame at least costs).  Columns:

* frames — frames DQBUF'd in the window; dropped — sequence gaps in it;
  (no buf/overrun) — of those, the daemon's own counts: frames with no
  buffer queued (CaptureSink.dropped: the client was late) and sensor
  frames skipped because the sensor thread overran (SensorClock.skipped);
* lat p50/p99 — DQBUF return minus buffer timestamp (the sensor's
  CLOCK_MONOTONIC start of frame; includes the sim's render time);
* ready p50/p99 — in the daemon, buffer DONE minus buffer timestamp (sensor
  thread wake-up + render; measured by the launcher): the rest of lat is the
  transport (wake the parked DQBUF, answer it, the client wakes up);
* CPU % — daemon utime+stime (/proc/<pid>/stat, all threads: sim sensor/ISP
  frame generation included) over the window, % of one core;
* RSS — daemon VmRSS, MiB, max of samples every 0.25 s;
* copies/frame — measured, the sum of
  - io: bytes moved by read/write-family syscalls of daemon + client
    (/proc/<pid>/io rchar+wchar; NOTIFY_STORE into the page cache = 1 per frame),
  - vm: bytes the daemon wrote into the client with process_vm_writev (the
    USERPTR path; /proc/io misses it) — counted by wrapping the libc call in
    the daemon process (the launcher below), return values summed,
  - stage: those of the vm bytes whose local source lies outside the node's
    buffer memfd mapping — a copy of the frame made first (today
    sysapi.vm_write's bytearray(data)) — checked by the same wrapper,
  each divided by frames x frame size.

The daemon is started as `impv4l2 serve --config X --mmap-mode M` through a
small launcher that installs those counters and answers "snap" on stdin with
a JSON line of them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RssSampler, cpu_seconds, io_bytes, percentile  # noqa: E402

W, H, FPS = 1920, 1080, 30
FRAME = W * H * 3 // 2
NODE = "video70"

CONFIG = """\
backend = "sim"
log_level = "warning"
[main]
width = {w}
height = {h}
fps = {fps}
[nodes]
main = "{node}"
sub = "video71"
encoder = "video72"
[transport]
cuse = "off"
mount = "{mount}"
dev_links = false
"""

# The daemon: `impv4l2 serve` with copy counters (see the module docstring).
LAUNCHER = r"""
import ctypes, json, sys, threading, time, weakref
from impv4l2 import cli, memfd
from impv4l2.driver.sim import sensor
from impv4l2.fuse import mount, sysapi
from impv4l2.v4l2 import capture, queue
counts = {"vm_bytes": 0, "vm_calls": 0, "stage_bytes": 0, "mode": None, "ready_ms": []}
found = {"mem": weakref.WeakSet(), "sink": weakref.WeakSet(), "clock": weakref.WeakSet()}
def _recorded(cls, kind):
    init = cls.__init__
    def __init__(self, *a, **k):
        init(self, *a, **k)
        found[kind].add(self)
    cls.__init__ = __init__
_recorded(memfd.MemfdMemory, "mem"); _recorded(capture.CaptureSink, "sink"); _recorded(sensor.SensorClock, "clock")
def _in_buffer_memory(addr):
    return any(getattr(m, "_addr", None) and m._addr <= addr < m._addr + m._reserve for m in list(found["mem"]))
_pvw = sysapi._libc.process_vm_writev
def _counted_pvw(pid, local, nl, remote, nr, flags):
    n = _pvw(pid, local, nl, remote, nr, flags)
    if n > 0:
        counts["vm_bytes"] += n
        counts["vm_calls"] += 1
        if not _in_buffer_memory(getattr(local, "_obj", local).base):
            counts["stage_bytes"] += n              # the source is a copy, not the buffer memory
    return n
sysapi._libc.process_vm_writev = _counted_pvw      # vm_write looks it up per call
_done = queue.BufferQueue.done
def _timed_done(self, buf, bytesused, sequence, timestamp_ns, *a, **k):
    if timestamp_ns:                                  # frame due -> buffer DONE (sensor wake + render)
        counts["ready_ms"].append((time.monotonic_ns() - timestamp_ns) / 1e6)
    return _done(self, buf, bytesused, sequence, timestamp_ns, *a, **k)
queue.BufferQueue.done = _timed_done
_start = mount.FuseMount.start
def _start_recorded(self, *a, **k):
    _start(self, *a, **k)
    counts["mode"] = self.mmap_mode
mount.FuseMount.start = _start_recorded
def _answer():
    for _ in sys.stdin:
        counts["no_buffer"] = sum(k.dropped for k in list(found["sink"]))
        counts["overrun"] = sum(c.skipped for c in list(found["clock"]))
        print(json.dumps(counts), flush=True)
        counts["ready_ms"] = []
threading.Thread(target=_answer, daemon=True).start()
sys.exit(cli.main(sys.argv[1:]))
"""

# The client: raw ioctls, one reused v4l2_buffer, per-frame records in arrays.
CLIENT = r"""
import array, ctypes, fcntl, json, mmap, os, sys, time
import numpy as np
from linuxpy.video import raw
from benchmarks._common import io_bytes
path, memory, w, h, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
fd = os.open(path, os.O_RDWR)
def ioc(cmd, s):
    fcntl.ioctl(fd, cmd & 0xFFFFFFFF, s)
CAP = raw.BufType.VIDEO_CAPTURE
MEM = raw.Memory.MMAP if memory == "mmap" else raw.Memory.USERPTR
f = raw.v4l2_format(type=CAP)
ioc(raw.IOC.G_FMT, f)
f.fmt.pix.width, f.fmt.pix.height, f.fmt.pix.pixelformat = w, h, raw.PixelFormat.NV12
ioc(raw.IOC.S_FMT, f)
size = f.fmt.pix.sizeimage
req = raw.v4l2_requestbuffers(count=4, type=CAP, memory=MEM)
ioc(raw.IOC.REQBUFS, req)
views, keep = [], []
for i in range(req.count):
    b = raw.v4l2_buffer(index=i, type=CAP, memory=MEM)
    if MEM == raw.Memory.MMAP:
        ioc(raw.IOC.QUERYBUF, b)
        m = mmap.mmap(fd, b.length, mmap.MAP_SHARED, mmap.PROT_READ, offset=b.m.offset)
    else:
        m = mmap.mmap(-1, size)                          # page-aligned anonymous memory
        c = ctypes.c_char.from_buffer(m)
        keep.append(c)
        b.m.userptr, b.length = ctypes.addressof(c), size
    views.append(np.frombuffer(m, np.uint8)[:w * h:4096])  # one byte per page of the Y plane
    ioc(raw.IOC.QBUF, b)
ioc(raw.IOC.STREAMON, ctypes.c_int(CAP))
b = raw.v4l2_buffer(type=CAP, memory=MEM)
clock, MONO = time.clock_gettime, time.CLOCK_MONOTONIC
DQBUF, QBUF = raw.IOC.DQBUF & 0xFFFFFFFF, raw.IOC.QBUF & 0xFFFFFFFF
ioctl = fcntl.ioctl
warm_end = clock(MONO) + 1.0
while clock(MONO) < warm_end:                           # warm-up: caches, page faults
    ioctl(fd, DQBUF, b); last_seq = b.sequence; int(views[b.index].sum()); ioctl(fd, QBUF, b)
seqs, stamps, dqs = array.array("q"), array.array("q"), array.array("d")
io0 = io_bytes()
print("start", flush=True)
end = clock(MONO) + seconds
touched = 0
now = 0.0
while now < end:
    ioctl(fd, DQBUF, b)
    now = clock(MONO)
    seqs.append(b.sequence)
    stamps.append(b.timestamp.secs * 1_000_000 + b.timestamp.usecs)
    dqs.append(now)
    touched += int(views[b.index].sum())
    ioctl(fd, QBUF, b)
io1 = io_bytes()
print("end", flush=True)
ioc(raw.IOC.STREAMOFF, ctypes.c_int(CAP))
s = np.frombuffer(seqs, np.int64)
lat = (np.frombuffer(dqs, np.float64) - np.frombuffer(stamps, np.int64) / 1e6) * 1e3
gaps = np.diff(np.concatenate([[last_seq], s])) - 1
print(json.dumps({"frames": len(s), "dropped": int(gaps[gaps > 0].sum()),
                  "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                  "max": float(lat.max()), "io": io1 - io0, "touched": touched,
                  "gap_at": [[int(i), int(gaps[i]), int(s[i])] for i in np.nonzero(gaps)[0][:8]]}))
"""


def _line(proc: subprocess.Popen, timeout: float) -> str:
    """One stdout line of ``proc`` (blocking; the timeout only guards a dead process)."""
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"pid {proc.pid} ended (rc {proc.wait(timeout)})")
    return line.strip()


def run_mode(label: str, mmap_mode: str, memory: str, seconds: float, tmp: str) -> dict:
    mnt = os.path.join(tmp, "mnt")
    cfg = os.path.join(tmp, "impv4l2.toml")
    Path(cfg).write_text(CONFIG.format(w=W, h=H, fps=FPS, node=NODE, mount=mnt))
    log = open(os.path.join(tmp, f"daemon-{label}.log"), "w+")
    d = subprocess.Popen([sys.executable, "-c", LAUNCHER, "--config", cfg, "serve", "--mmap-mode", mmap_mode],
                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        path = os.path.join(mnt, NODE)
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if d.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"daemon did not serve {path}:\n{log.read()[-2000:]}")
            time.sleep(0.05)

        def snap() -> dict:
            d.stdin.write("snap\n")
            d.stdin.flush()
            s = json.loads(_line(d, 5))
            s.update(cpu=cpu_seconds(d.pid), io=io_bytes(d.pid), t=time.monotonic())
            return s

        c = subprocess.Popen([sys.executable, "-c", CLIENT, path, memory, str(W), str(H), str(seconds)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            with RssSampler(d.pid) as rss:
                if _line(c, 30) != "start":
                    raise RuntimeError("client protocol")
                s0 = snap()
                if _line(c, seconds + 30) != "end":
                    raise RuntimeError("client protocol")
                s1 = snap()
            res = json.loads(_line(c, 30))
        finally:
            if c.wait(30):
                raise RuntimeError(f"client failed (rc {c.returncode})")
        ready = s1["ready_ms"]   # frames made DONE between the two snapshots
        res.update(ready50=percentile(ready, 50), ready99=percentile(ready, 99))
        wall = s1["t"] - s0["t"]
        n = max(res["frames"], 1) * FRAME
        res.update(label=label, mode=s0["mode"], cpu=(s1["cpu"] - s0["cpu"]) / wall * 100, rss=rss.max / 2**20,
                   c_io=(s1["io"] - s0["io"] + res["io"]) / n, c_vm=(s1["vm_bytes"] - s0["vm_bytes"]) / n,
                   c_stage=(s1["stage_bytes"] - s0["stage_bytes"]) / n,
                   no_buffer=s1["no_buffer"] - s0["no_buffer"], overrun=s1["overrun"] - s0["overrun"], fps=res["frames"] / wall)
        if res["gap_at"]:
            print(f"{label}: first gaps [index, missing, sequence]: {res['gap_at']}", file=sys.stderr)
        return res
    finally:
        d.send_signal(signal.SIGTERM)
        try:
            d.wait(30)
        except subprocess.TimeoutExpired:
            d.kill()
            d.wait()
        log.close()


ROWS = {  # label -> (--mmap-mode, client memory)
    "passthrough": ("passthrough", "mmap"),
    "direct": ("direct", "mmap"),
    "cached": ("cached", "mmap"),
    "userptr": ("auto", "userptr"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="measured streaming time per mode")
    p.add_argument("--modes", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    a = p.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="impv4l2-bench-") as tmp:
        for label in a.modes.split(","):
            mmap_mode, memory = ROWS[label]
            try:
                rows.append(run_mode(label, mmap_mode, memory, a.seconds, tmp))
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                print(f"{label}: {e}", file=sys.stderr)
    print(f"\nFUSE capture, {W}x{H} NV12 @ {FPS} fps (sim), {a.seconds:g} s per mode, "
          f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[1]:.2f} (5 min), kernel {os.uname().release}")
    print(f"{'memory':27} {'frames':>7} {'fps':>6} {'dropped (no buf/overrun)':>24} {'lat p50':>8} {'p99 ms':>7} {'max ms':>7} "
          f"{'ready p50/p99':>14} {'CPU %':>6} {'RSS MiB':>8} {'copies/frame':>13}  (io + vm + stage)")
    for r in rows:
        name = f"MMAP {r['mode']}" if r["label"] != "userptr" else f"USERPTR (mount {r['mode']})"
        total = r["c_io"] + r["c_vm"] + r["c_stage"]
        print(f"{name:27} {r['frames']:7d} {r['fps']:6.2f} {r['dropped']:8d} ({r['no_buffer']:4d}/{r['overrun']:4d})     {r['p50']:8.2f} {r['p99']:7.2f} "
              f"{r['max']:7.2f} {r['ready50']:6.2f}/{r['ready99']:<7.2f} {r['cpu']:6.1f} {r['rss']:8.1f} {total:13.2f}  "
              f"({r['c_io']:.2f} + {r['c_vm']:.2f} + {r['c_stage']:.2f})")
    print("goals: no drops; p99 < 5 ms on FUSE mmap; daemon CPU < 25 % of one core; <= 1 copy/frame")
    return 0 if len(rows) == len(a.modes.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
