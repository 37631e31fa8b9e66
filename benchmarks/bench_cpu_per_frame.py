"""Daemon CPU per delivered frame, beside the floor: a raw CUSE server that does no frame work.

One client (here, in this process) runs the same V4L2 sequence against each server: S_FMT,
REQBUFS 4 MMAP, QBUF all, STREAMON, then blocking DQBUF + QBUF per frame, STREAMOFF.  It
never maps the buffers: what is measured is the server's cost of delivering a frame, not
the client's of reading it.  CPU is the server's utime + stime (/proc/PID/stat, all
threads) over ``--frames`` frames after ``--warmup``, per delivered frame and per frame the
sensor made (a server that falls behind drops frames, which cost it too); the idle line is
each server's CPU with nothing streaming.  On the t31 fake, the daemon's figure includes the
fake's synthesis of each frame (memsets of the NV12 pool), work the ISP's DMA does on a camera.

The floor (``--floor NAME``, a child process started by the runner) is the least a Python
CUSE server must do per frame: it reads /dev/cuse itself (the FUSE wire format with
``struct``, no impv4l2.fuse), answers QUERYCAP/S_FMT/REQBUFS/QBUF/DQBUF/STREAMON/STREAMOFF
with canned structs, parks a blocking DQBUF and answers it at the next tick of its own
frame clock (``--fps``, the daemon's rate), one thread, no buffers behind the numbers.
Reusing impv4l2.fuse with a trivial device was the other choice; it would hide the
transport's own cost inside the floor, and the transport is part of what the ratio judges.

Run (root, cuse.ko; in the MIPS guest tests/mips/guest.py runs it):
    python3 benchmarks/bench_cpu_per_frame.py --pid PID --main /dev/video10 --sub /dev/video11
Needs only the standard library and impv4l2.ioc (the ioctl encoding of the running machine).
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # _common
if (HERE.parent / "impv4l2").is_dir():
    sys.path.insert(0, str(HERE.parent))  # a source tree; in the guest the bundle is on PYTHONPATH
from _common import cpu_seconds  # noqa: E402
from impv4l2.ioc import NATIVE  # noqa: E402

# ------------------------------------------------------------ the V4L2 ABI this needs (native sizes)
_ALIGN = struct.calcsize("@l")
BUF = struct.Struct("@IIIIIllIIBBBB4sIILIII")  # v4l2_buffer: 68 bytes on o32, 88 on x86-64
BUF_SIZE = -(-BUF.size // _ALIGN) * _ALIGN
FMT_OFF = struct.calcsize("@IP") - struct.calcsize("@P")  # the union is pointer-aligned
FMT_SIZE = FMT_OFF + 200
PIX = struct.Struct("@12I")  # v4l2_pix_format
REQ = struct.Struct("@IIIIB3x")  # v4l2_requestbuffers
CAP_SIZE = 104
B_INDEX, B_TYPE, B_BYTES, B_FLAGS, B_FIELD, B_SEC, B_USEC = range(7)
B_SEQ, B_MEMORY, B_LENGTH = 14, 15, 17

V = "V"
QUERYCAP = NATIVE.IOR(V, 0, CAP_SIZE)
G_FMT, S_FMT = NATIVE.IOWR(V, 4, FMT_SIZE), NATIVE.IOWR(V, 5, FMT_SIZE)
REQBUFS = NATIVE.IOWR(V, 8, REQ.size)
QBUF, DQBUF = NATIVE.IOWR(V, 15, BUF_SIZE), NATIVE.IOWR(V, 17, BUF_SIZE)
STREAMON, STREAMOFF = NATIVE.IOW(V, 18, 4), NATIVE.IOW(V, 19, 4)
CAPTURE, MMAP, FIELD_NONE = 1, 1, 1
FLAG_QUEUED, FLAG_DONE = 0x2, 0x4
FOURCC = {"NV12": b"NV12", "H264": b"H264"}

# ------------------------------------------------------------ the raw CUSE floor
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")
CUSE_INIT_OUT = struct.Struct("<IIIIIIII40x")
IOCTL_IN = struct.Struct("<QIIQII")  # fh flags cmd arg in_size out_size
IOCTL_OUT = struct.Struct("<iIII")
OPEN_OUT = struct.Struct("<QIi")
POLL_OUT = struct.Struct("<II")
OPEN, RELEASE, FLUSH, INTERRUPT, IOCTL, POLL, CUSE_INIT = 14, 18, 25, 36, 39, 40, 4096
MAX_IO = 64 * 1024
ENOSYS, ENOTTY, EINVAL = 38, 25, 22


class Floor:
    """One CUSE device /dev/NAME answering a capture client from canned structs."""

    def __init__(self, name: str, fps: int) -> None:
        self.name, self.period = name, 1.0 / fps
        self.fd = os.open("/dev/cuse", os.O_RDWR | os.O_CLOEXEC)
        self.fmt = bytes(FMT_SIZE)
        self.nbufs = 0
        self.queued: collections.deque[int] = collections.deque()
        self.done: collections.deque[tuple[int, int, float]] = collections.deque()  # index, seq, time
        self.parked: list[tuple[int, bytes]] = []  # blocking DQBUFs: (unique, the client's struct)
        self.next_tick = 0.0
        self.seq = 0
        self.ops: dict[int, Callable[[int, memoryview], None]] = {
            CUSE_INIT: self._init, OPEN: lambda u, p: self._reply(u, OPEN_OUT.pack(1, 0, 0)),
            RELEASE: lambda u, p: self._reply(u), FLUSH: lambda u, p: self._reply(u),
            INTERRUPT: lambda u, p: None, IOCTL: self._ioctl, POLL: self._poll}
        self.ioctls: dict[int, Callable[[bytes], bytes | None]] = {
            QUERYCAP: self._querycap, G_FMT: lambda d: self.fmt, S_FMT: self._s_fmt, REQBUFS: self._reqbufs,
            QBUF: self._qbuf, STREAMON: self._streamon, STREAMOFF: self._streamoff}

    def _reply(self, unique: int, payload: bytes = b"", error: int = 0) -> None:
        os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique) + payload)

    def _init(self, unique: int, p: memoryview) -> None:
        minor = struct.unpack_from("<I", p, 4)[0]
        self._reply(unique, CUSE_INIT_OUT.pack(7, minor, 0, 0, MAX_IO, MAX_IO, 0, 0)
                    + f"DEVNAME={self.name}\0".encode())

    def _poll(self, unique: int, p: memoryview) -> None:
        self._reply(unique, POLL_OUT.pack(0x1 if self.done else 0, 0))

    def _ioctl(self, unique: int, p: memoryview) -> None:
        _fh, _flags, cmd, _arg, in_size, _out_size = IOCTL_IN.unpack_from(p)
        data = bytes(p[IOCTL_IN.size:IOCTL_IN.size + in_size])
        if cmd == DQBUF:
            self.parked.append((unique, data))
            self._deliver()
            return
        handler = self.ioctls.get(cmd)
        if handler is None:
            self._reply(unique, error=ENOTTY)
            return
        try:
            out = handler(data) or b""
        except ValueError:
            self._reply(unique, error=EINVAL)
            return
        self._reply(unique, IOCTL_OUT.pack(0, 0, 0, 0) + out)

    def _querycap(self, data: bytes) -> bytes:
        return struct.pack("@16s32s32sIII12x", b"floor", b"cuse floor", b"platform:floor", 0x60100,
                           0x84000001, 0x04000001)

    def _s_fmt(self, data: bytes) -> bytes:
        self.fmt = data
        return data

    def _reqbufs(self, data: bytes) -> bytes:
        count, typ, memory, _caps, _flags = REQ.unpack(data)
        self.nbufs = min(count, 8)
        self.queued.clear()
        self.done.clear()
        return REQ.pack(self.nbufs, typ, memory, 0x1, 0)

    def _qbuf(self, data: bytes) -> bytes:
        b = list(BUF.unpack_from(data))
        if not 0 <= b[B_INDEX] < self.nbufs:
            raise ValueError(b[B_INDEX])
        self.queued.append(b[B_INDEX])
        b[B_FLAGS] = FLAG_QUEUED
        return BUF.pack(*b).ljust(BUF_SIZE, b"\0")

    def _streamon(self, data: bytes) -> None:
        self.next_tick, self.seq = time.monotonic() + self.period, 0

    def _streamoff(self, data: bytes) -> None:
        self.next_tick = 0.0
        self.queued.clear()
        self.done.clear()

    def _tick(self, now: float) -> None:
        """The frame clock: each period the oldest queued buffer is done (none queued: a drop)."""
        while self.next_tick and now >= self.next_tick:
            if self.queued:
                self.done.append((self.queued.popleft(), self.seq, now))
            self.seq += 1
            self.next_tick += self.period
        self._deliver()

    def _deliver(self) -> None:
        while self.parked and self.done:
            unique, data = self.parked.pop(0)
            index, seq, t = self.done.popleft()
            b = list(BUF.unpack_from(data))
            b[B_INDEX], b[B_TYPE], b[B_BYTES], b[B_FLAGS], b[B_FIELD] = index, CAPTURE, 4096, FLAG_DONE, FIELD_NONE
            b[B_SEC], b[B_USEC], b[B_SEQ], b[B_MEMORY], b[B_LENGTH] = int(t), int(t % 1 * 1e6), seq, MMAP, 4096
            self._reply(unique, IOCTL_OUT.pack(0, 0, 0, 0) + BUF.pack(*b).ljust(BUF_SIZE, b"\0"))

    def serve(self) -> None:
        buf = bytearray(MAX_IO + 4096)
        print(f"floor /dev/{self.name} up", flush=True)
        while True:
            timeout = max(0.0, self.next_tick - time.monotonic()) if self.next_tick else None
            if select.select([self.fd], [], [], timeout)[0]:
                n = os.readv(self.fd, [buf])
                _len, opcode, unique, *_ = IN_HEADER.unpack_from(buf)
                op = self.ops.get(opcode)
                if op is None:
                    self._reply(unique, error=ENOSYS)
                else:
                    op(unique, memoryview(buf)[IN_HEADER.size:n])
            self._tick(time.monotonic())


# ------------------------------------------------------------ the client and the table
class Row(NamedTuple):
    server: str
    stream: str
    frames: int
    drops: int
    fps: float
    cpu_ms_per_frame: float  # per delivered frame
    cpu_ms_per_sensor_frame: float  # per frame the sensor made (delivered + dropped)


def _ioctl(fd: int, cmd: int, data: bytes) -> bytearray:
    buf = bytearray(data)
    fcntl.ioctl(fd, cmd, buf, True)
    return buf


def v4l2_buffer(index: int) -> bytes:
    """A v4l2_buffer naming buffer ``index`` of the MMAP capture queue."""
    fields: list = [0] * 20
    fields[B_INDEX], fields[B_TYPE], fields[B_MEMORY], fields[13] = index, CAPTURE, MMAP, b""
    return BUF.pack(*fields).ljust(BUF_SIZE, b"\0")


def start_capture(fd: int, fourcc: str, width: int, height: int, count: int = 4) -> list[bytes]:
    """S_FMT, REQBUFS ``count`` MMAP, QBUF all, STREAMON; the v4l2_buffer of each buffer."""
    fmt = bytearray(FMT_SIZE)
    struct.pack_into("@I", fmt, 0, CAPTURE)
    PIX.pack_into(fmt, FMT_OFF, width, height, struct.unpack("<I", FOURCC[fourcc])[0], FIELD_NONE, *[0] * 8)
    _ioctl(fd, S_FMT, fmt)
    n = REQ.unpack(_ioctl(fd, REQBUFS, REQ.pack(count, CAPTURE, MMAP, 0, 0)))[0]
    empty = [v4l2_buffer(i) for i in range(n)]
    for b in empty:
        _ioctl(fd, QBUF, b)
    _ioctl(fd, STREAMON, struct.pack("@I", CAPTURE))
    return empty


def stream(dev: str, pid: int, fourcc: str, width: int, height: int, frames: int, warmup: int) -> tuple[int, int, float, float]:
    """Capture ``warmup`` + ``frames`` frames from ``dev``; (frames, drops, seconds, server CPU s)
    over the measured ones.  Drops: sequence numbers skipped between the first and the last."""
    fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    try:
        empty = start_capture(fd, fourcc, width, height)
        seqs: list[int] = []
        t0 = c0 = 0.0
        for k in range(warmup + frames):
            if k == warmup:
                t0, c0 = time.monotonic(), cpu_seconds(pid)
            b = _ioctl(fd, DQBUF, v4l2_buffer(0))
            fields = BUF.unpack_from(b)
            if k >= warmup:
                seqs.append(fields[B_SEQ])
            _ioctl(fd, QBUF, empty[fields[B_INDEX]])
        seconds, cpu = time.monotonic() - t0, cpu_seconds(pid) - c0
        _ioctl(fd, STREAMOFF, struct.pack("@I", CAPTURE))
        _ioctl(fd, REQBUFS, REQ.pack(0, CAPTURE, MMAP, 0, 0))
    finally:
        os.close(fd)
    return frames, seqs[-1] - seqs[0] + 1 - len(seqs), seconds, cpu


STREAMS = {"main NV12": ("NV12", 1920, 1080), "sub H.264": ("H264", 640, 360)}


def idle_ms_per_s(pid: int, seconds: float) -> float:
    """The server's CPU while nothing streams: what a frame's share must not be confused with."""
    c0 = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / seconds * 1000


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, float]]:
    """Both servers, stream by stream (each stream's two rows close together in time: a TCG
    guest's speed follows the host's load)."""
    floor = subprocess.Popen([sys.executable, __file__, "--floor", args.floor_name, "--fps", str(args.fps)],
                             stdout=subprocess.PIPE, text=True)
    rows: list[Row] = []
    try:
        assert floor.stdout is not None
        floor.stdout.readline()  # "floor ... up": it has /dev/cuse open
        dev = f"/dev/{args.floor_name}"
        deadline = time.monotonic() + 30
        while not os.path.exists(dev) and time.monotonic() < deadline:
            time.sleep(0.05)
        servers = {"impv4l2": (args.pid, {"main NV12": args.main, "sub H.264": args.sub}),
                   "floor": (floor.pid, {name: dev for name in STREAMS})}
        idle = {name: idle_ms_per_s(pid, args.idle) for name, (pid, _) in servers.items()}
        for name, (fourcc, w, h) in STREAMS.items():
            for server, (pid, nodes) in servers.items():
                f, d, s, c = stream(nodes[name], pid, fourcc, w, h, args.frames, args.warmup)
                rows.append(Row(server, name, f, d, f / s, c / f * 1000, c / (f + d) * 1000))
    finally:
        floor.kill()
        floor.wait()
    return rows, idle


def table(rows: list[Row], idle: dict[str, float]) -> tuple[str, dict[str, float]]:
    """The printed table and the ratios (impv4l2 / floor, CPU per delivered frame)."""
    floor = {r.stream: r.cpu_ms_per_frame for r in rows if r.server == "floor"}
    lines = [f"{'stream':<10} {'server':<8} {'frames':>6} {'drops':>5} {'fps':>5} {'CPU ms/frame':>12} "
             f"{'ms/sensor frame':>15} {'x floor':>7}"]
    ratios = {}
    for r in rows:
        ratio = r.cpu_ms_per_frame / floor[r.stream] if floor.get(r.stream) else float("nan")
        if r.server != "floor":
            ratios[r.stream] = round(ratio, 2)
        lines.append(f"{r.stream:<10} {r.server:<8} {r.frames:>6} {r.drops:>5} {r.fps:>5.1f} "
                     f"{r.cpu_ms_per_frame:>12.1f} {r.cpu_ms_per_sensor_frame:>15.1f} {ratio:>7.2f}")
    lines.append("idle (nothing streaming), CPU ms per s: " + ", ".join(f"{k} {v:.1f}" for k, v in idle.items()))
    return "\n".join(lines), ratios


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pid", type=int, help="the daemon's pid")
    p.add_argument("--main", default="/dev/video10")
    p.add_argument("--sub", default="/dev/video11")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--idle", type=float, default=2.0, help="seconds of the idle measurement")
    p.add_argument("--fps", type=int, default=15, help="the floor's frame clock (the daemon's rate)")
    p.add_argument("--floor-name", default="impv4l2-floor")
    p.add_argument("--floor", metavar="NAME", help=argparse.SUPPRESS)  # the child: serve /dev/NAME,...
    p.add_argument("--json", help="also write the rows and ratios here")
    args = p.parse_args()
    if args.floor:  # NAME[,NAME...]: one device per thread (tests/mips/guest.py's hot-plug stand-ins)
        floors = [Floor(name, args.fps) for name in args.floor.split(",")]
        for f in floors[1:]:
            threading.Thread(target=f.serve, daemon=True).start()
        floors[0].serve()
        return 0
    if args.pid is None:
        p.error("--pid is required")
    rows, idle = run(args)
    text, ratios = table(rows, idle)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [r._asdict() for r in rows], "ratio": ratios,
                                               "idle_ms_per_s": idle}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
