"""Fan-out: the daemon's CPU per frame with 1, 2 and 4 clients on one channel, raw and H.264.

    .venv/bin/python benchmarks/bench_fanout.py [--size 1920x1080] [--fps 25] [--seconds 6]

Starts a plain `impv4l2 serve` (sim, FUSE door only, [main] nodes = 4) and for each format
runs 1, 2 and 4 clients at once, one per node main .. main-4 (threads of this process: S_FMT,
REQBUFS 8 MMAP, QBUF, STREAMON, then blocking DQBUF + QBUF; they never map the buffers, so
what is measured is the daemon's cost of delivering, not a client's of reading).  CPU is the
daemon's utime + stime over ``--seconds`` after a warm-up, per channel frame (the frames the
channel produced in that window, from the first client's sequence numbers).

Goals (issue 12): raw fan-out costs no extra frame render (the frame is rendered once into
the first client's buffer and copied into the others': one memcpy per extra client); H.264
fan-out costs no extra encode (one encoder channel, its access unit copied).  The table
gives the ratios to 1 client and the encoder channels running (SIGUSR2 stats); the copy of a
1080p NV12 frame (3.1 MB) is measured beside it, since that is what each extra raw client adds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import cpu_seconds  # noqa: E402
from bench_cpu_per_frame import (B_INDEX, B_SEQ, BUF, CAPTURE, DQBUF, MMAP, QBUF, REQ, REQBUFS,  # noqa: E402
                                 STREAMOFF, _ioctl, start_capture, v4l2_buffer)


class Client(threading.Thread):
    """One streaming client of a node; counts frames and keeps the sequence numbers."""

    def __init__(self, path: str, fourcc: str, w: int, h: int, ready: threading.Barrier):
        super().__init__(daemon=True)
        self.path, self.fourcc, self.w, self.h, self.ready = path, fourcc, w, h, ready
        self.stop = threading.Event()
        self.measure = threading.Event()
        self.seqs: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - reported by the runner
            self.error = e
            self.ready.abort()

    def _run(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            empty = start_capture(fd, self.fourcc, self.w, self.h, count=8)
            for _ in range(5):  # warm up: the stream runs
                self._one(fd, empty)
            self.ready.wait(60)
            while not self.stop.is_set():
                seq = self._one(fd, empty)
                if self.measure.is_set():
                    self.seqs.append(seq)
            _ioctl(fd, STREAMOFF, struct.pack("@I", CAPTURE))
            _ioctl(fd, REQBUFS, REQ.pack(0, CAPTURE, MMAP, 0, 0))
        finally:
            os.close(fd)

    @staticmethod
    def _one(fd: int, empty: list[bytes]) -> int:
        b = BUF.unpack_from(_ioctl(fd, DQBUF, v4l2_buffer(0)))
        _ioctl(fd, QBUF, empty[b[B_INDEX]])
        return b[B_SEQ]


class Daemon:
    def __init__(self, tmp: Path, w: int, h: int, fps: int):
        self.log, mount = tmp / "daemon.log", tmp / "mnt"
        base = next(b for b in range(40, 200, 8) if not any(os.path.lexists(f"/dev/video{n}")
                                                              for n in range(b, b + 8)))
        cfg = tmp / "impv4l2.toml"
        cfg.write_text(textwrap.dedent(f"""
            log_level = "info"
            [main]
            width = {w}
            height = {h}
            fps = {fps}
            nodes = 4
            [sub]
            fps = {fps}
            [nodes]
            base = {base}
            [transport]
            cuse = "off"
            mount = "{mount}"
            dev_links = false
        """))
        self.proc = subprocess.Popen([sys.executable, "-m", "impv4l2.cli", "--config", str(cfg), "serve"],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, cwd=HERE.parent)
        names = [f"video{base + k}" for k in range(4)]  # main, main-2, main-3, main-4
        self.paths = [str(mount / n) for n in names]
        deadline = time.monotonic() + 60
        while not all(os.path.exists(p) for p in self.paths):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("daemon did not start:\n" + self.log.read_text())
            time.sleep(0.1)

    def stats(self) -> dict:
        """The daemon's counters (SIGUSR2 logs them at info: read the counters line)."""
        before = self.log.read_text().count("stats: {")
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while self.log.read_text().count("stats: {") == before and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [ln for ln in self.log.read_text().splitlines() if "stats: {" in ln]
        return json.loads(lines[-1].split("stats: ", 1)[1]) if lines else {}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(d: Daemon, fourcc: str, clients: int, w: int, h: int, seconds: float) -> dict:
    before = d.stats()
    ready = threading.Barrier(clients + 1)
    cs = [Client(d.paths[k], fourcc, w, h, ready) for k in range(clients)]
    for c in cs:
        c.start()
    ready.wait(120)
    time.sleep(0.5)
    for c in cs:
        c.measure.set()
    t0, c0 = time.monotonic(), cpu_seconds(d.proc.pid)
    time.sleep(seconds / 2)
    stats = d.stats()
    time.sleep(seconds / 2)
    cpu, wall = cpu_seconds(d.proc.pid) - c0, time.monotonic() - t0
    overruns = d.stats().get("sensor_overruns", 0) - before.get("sensor_overruns", 0)
    main, opened = stats.get("channels", {}).get("main", {}), before["channels"]["main"]["encoders_opened"]
    for c in cs:
        c.measure.clear()
        c.stop.set()
    for c in cs:
        c.join(30)
        if c.error:
            raise c.error
    seqs = cs[0].seqs
    frames = seqs[-1] - seqs[0] + 1
    drops = sum(c.seqs[-1] - c.seqs[0] + 1 - len(c.seqs) for c in cs if c.seqs)
    time.sleep(1)  # the channel stops: the next row starts from an idle channel
    return {"format": fourcc, "clients": clients, "frames": frames, "drops": drops, "overruns": overruns,
            "wall": wall, "cpu_ms_per_frame": cpu / frames * 1000, "encoders": main.get("encoders", {}),
            "encoders_opened": main.get("encoders_opened", 0) - opened}


def memcpy_ms(w: int, h: int, n: int = 50) -> float:
    """One frame copy as the fan-out makes it (memoryview slice assignment)."""
    a, b = bytearray(w * h * 3 // 2), bytearray(w * h * 3 // 2)
    src, dst = memoryview(a), memoryview(b)
    np.frombuffer(a, np.uint8)[:] = 7
    t = time.perf_counter()
    for _ in range(n):
        dst[:] = src
    return (time.perf_counter() - t) / n * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1920x1080")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--clients", default="1,2,4")
    p.add_argument("--formats", default="NV12,H264")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        d = Daemon(Path(tmp), w, h, args.fps)
        rows = []
        try:
            c0 = cpu_seconds(d.proc.pid)
            time.sleep(2)
            idle = (cpu_seconds(d.proc.pid) - c0) / 2 * 1000
            for fourcc in args.formats.split(","):
                for n in counts:
                    rows.append(measure(d, fourcc, n, w, h, args.seconds))
                    r = rows[-1]
                    print(f"  {fourcc} x{n}: {r['cpu_ms_per_frame']:.2f} ms/frame", file=sys.stderr, flush=True)
        finally:
            d.stop()
    print(f"daemon CPU per channel frame, main {w}x{h}@{args.fps}, {args.seconds:.0f} s per row "
          f"(load {os.getloadavg()[0]:.1f}); idle {idle:.1f} ms CPU per s")
    print(f"{'format':<6} {'clients':>7} {'frames':>6} {'drops':>5} {'overruns':>8} {'CPU ms/frame':>12} {'x 1 client':>10} "
          f"{'encoder channels (clients)':>26} {'opened':>6}")
    one = {r["format"]: r["cpu_ms_per_frame"] for r in rows if r["clients"] == counts[0]}
    for r in rows:
        enc = ",".join(f"1 {k} ({v})" for k, v in r["encoders"].items()) or "-"
        print(f"{r['format']:<6} {r['clients']:>7} {r['frames']:>6} {r['drops']:>5} {r['overruns']:>8} {r['cpu_ms_per_frame']:>12.2f} "
              f"{r['cpu_ms_per_frame'] / one[r['format']]:>10.2f} {enc:>26} {r['encoders_opened']:>6}")
    print(f"one {w}x{h} NV12 frame copy (what each extra raw client adds): {memcpy_ms(w, h):.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
