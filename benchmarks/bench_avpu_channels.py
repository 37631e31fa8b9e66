"""Sim AVPU: main 1080p H.264 and sub 640x360 MJPEG encoding at once, as a camera runs them.

    .venv/bin/python benchmarks/bench_avpu_channels.py [--seconds 4] [--threads 0 1]

Each channel encodes on a thread of its own, flat out, from pre-generated NV12
frames; printed per x264 thread setting: frames/s of each channel while both
run (real time needs >= 30 each), CPU per second, and slice NALs per H.264
access unit (the T31's AVPU codes one).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from impv4l2.driver.base import Codec, EncoderParams  # noqa: E402
from impv4l2.driver.sim import avpu  # noqa: E402


def frames(w: int, h: int, n: int = 8) -> list[memoryview]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        f = np.empty(w * h * 3 // 2, np.uint8)
        f[:w * h] = (np.add.outer(np.arange(h), np.arange(w)) + 8 * i).astype(np.uint8).ravel()
        f[:w * h] += rng.integers(0, 8, w * h, dtype=np.uint8)
        f[w * h:] = 128
        out.append(memoryview(f))
    return out


def slices(au: bytes) -> int:
    return sum(1 for nal in au.split(b"\x00\x00\x00\x01")[1:] if nal and nal[0] & 0x1F in (1, 5))


def run(threads: int, seconds: float) -> dict:
    main = avpu.SimH264Channel(EncoderParams(width=1920, height=1080, fps_num=30, gop=30), threads=threads)
    sub = avpu.SimJpegChannel(EncoderParams(codec=Codec.JPEG, width=640, height=360, fps_num=30))
    counts, nslices = {"main": 0, "sub": 0}, []
    stop = threading.Event()

    def loop(name, ch, src, out):
        i = 0
        while not stop.is_set():
            n, _key = ch.encode_into(src[i % len(src)], i, out)
            if name == "main" and len(nslices) < 60:
                nslices.append(slices(bytes(out[:n])))
            counts[name] += 1
            i += 1

    jobs = [threading.Thread(target=loop, args=("main", main, frames(1920, 1080), memoryview(bytearray(4 << 20)))),
            threading.Thread(target=loop, args=("sub", sub, frames(640, 360), memoryview(bytearray(1 << 20))))]
    c0, t0 = time.process_time(), time.monotonic()
    for j in jobs:
        j.start()
    time.sleep(seconds)
    stop.set()
    for j in jobs:
        j.join()
    dt, cpu = time.monotonic() - t0, time.process_time() - c0
    return {"main": counts["main"] / dt, "sub": counts["sub"] / dt, "cpu": cpu / dt,
            "slices": sorted(set(nslices))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--threads", type=int, nargs="+", default=[0, avpu.X264_THREADS])
    a = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, x264 ultrafast zerolatency; both channels flat out for {a.seconds:g} s")
    print(f"{'x264 threads':>13} {'main 1080p H.264 fps':>21} {'sub 360p MJPEG fps':>19} {'CPU s/s':>8}"
          f" {'slices/AU':>10}")
    for t in a.threads:
        r = run(t, a.seconds)
        label = f"{t}{' (auto)' if t == 0 else ''}"
        print(f"{label:>13} {r['main']:>21.1f} {r['sub']:>19.1f} {r['cpu']:>8.2f} {','.join(map(str, r['slices'])):>10}")


if __name__ == "__main__":
    main()
