"""Benchmark of the sim sensor/ISP/channels.

Prints (1) per-frame generation time (render into a sink-like buffer + OSD)
for main 1080p and sub 640x360, default and non-default tuning, and (2) the
CPU used by the running backend (1080p30 main + 640x360 sub, paced) over a
wall-clock window, as % of one core (process CPU time; the benchmark's own
thread only sleeps).

    .venv/bin/python benchmarks/bench_sim.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from impv4l2.driver.base import FrameBuffer, SensorInfo  # noqa: E402
from impv4l2.driver.sim.backend import SimBackend  # noqa: E402
from impv4l2.driver.sim.isp import SimIsp  # noqa: E402
from impv4l2.driver.sim.pattern import pattern  # noqa: E402
from impv4l2.driver.sim.sensor import FileScene, SyntheticScene  # noqa: E402

TUNINGS = {
    "default": {},
    "bcsh+flip+night": dict(brightness=150, contrast=160, saturation=60, hue=140,
                            hflip=1, vflip=1, day_night=1, sharpness=200),
    "manual exp/gain": dict(exposure_auto=1, exposure=3000, gain_auto=0, gain=40),
    "flicker bands": dict(power_line_frequency=2),
}


def per_frame(width: int, height: int, values: dict, n: int = 300) -> float:
    isp = SimIsp(SensorInfo("bench", 1920, 1080, 30))
    for k, v in values.items():
        isp.set(k, v)
    scene = SyntheticScene(30)
    pat = pattern(width, height)
    dst = np.empty(width * height * 3 // 2, np.uint8)
    tuning = isp.tuning()
    scene.render(dst, width, height, 0, tuning)  # build caches outside the timing
    t0 = time.perf_counter()
    for i in range(n):
        t = isp.tuning()
        scene.render(dst, width, height, i, t)
        pat.draw_osd(dst, i, time.monotonic_ns())
    return (time.perf_counter() - t0) / n


def per_frame_file(path: str, n: int = 100) -> tuple[float, float, float]:
    """File input: (decode, main 1080p scale+copy+OSD, sub) seconds per frame."""
    isp = SimIsp(SensorInfo("bench", 1920, 1080, 30))
    scene = FileScene(path)
    dst_m = np.empty(1920 * 1080 * 3 // 2, np.uint8)
    dst_s = np.empty(640 * 360 * 3 // 2, np.uint8)
    t = isp.tuning()
    dec = main = sub = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        scene.begin_frame(i)
        t1 = time.perf_counter()
        scene.render(dst_m, 1920, 1080, i, t)
        pattern(1920, 1080).draw_osd(dst_m, i, 0)
        t2 = time.perf_counter()
        scene.render(dst_s, 640, 360, i, t)
        pattern(640, 360).draw_osd(dst_s, i, 0)
        t3 = time.perf_counter()
        dec, main, sub = dec + t1 - t0, main + t2 - t1, sub + t3 - t2
    scene.close()
    return dec / n, main / n, sub / n


class CountingSink:
    def __init__(self, size: int) -> None:
        self.buf = FrameBuffer(memoryview(bytearray(size)), 0)
        self.frames = 0
        self.last_seq = -1

    def get_buffer(self):
        return self.buf

    def frame_done(self, buf, info) -> None:
        self.frames += 1
        self.last_seq = info.sequence


def paced(seconds: float, values: dict) -> tuple[float, int, int, int]:
    be = SimBackend(fps=30)
    for k, v in values.items():
        be.isp.set(k, v)
    main, sub = be.channels
    ms, ss = CountingSink(main.frame_bytes), CountingSink(sub.frame_bytes)
    main.start(ms)
    sub.start(ss)
    time.sleep(0.5)  # warm-up: bases built, caches filled
    f0, s0, k0 = ms.frames, ss.frames, be.clock.skipped
    c0, w0 = time.process_time(), time.monotonic()
    time.sleep(seconds)
    cpu, wall = time.process_time() - c0, time.monotonic() - w0
    result = 100 * cpu / wall, ms.frames - f0, ss.frames - s0, be.clock.skipped - k0
    be.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()

    print("per-frame generation (copy base + box + bands + OSD), mean of 300 frames")
    print(f"{'tuning':<18} {'main 1920x1080':>15} {'sub 640x360':>12}")
    for name, values in TUNINGS.items():
        m = per_frame(1920, 1080, values)
        s = per_frame(640, 360, values)
        print(f"{name:<18} {m * 1e3:>12.3f} ms {s * 1e3:>9.3f} ms")

    with tempfile.TemporaryDirectory() as tmp:
        clip = os.path.join(tmp, "clip.mp4")
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                        "testsrc2=size=1920x1080:rate=30", "-frames:v", "60",
                        "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", clip],
                       check=True)
        dec, m, s = per_frame_file(clip)
    print(f"{'file 1080p h264':<18} {m * 1e3:>12.3f} ms {s * 1e3:>9.3f} ms"
          f"   (+ {dec * 1e3:.3f} ms decode per sensor frame; swscale to NV12)")

    print()
    print(f"paced backend 1080p30 main + 640x360 sub, {args.seconds:.0f} s window")
    print(f"{'tuning':<18} {'CPU % of 1 core':>16} {'main fr':>8} {'sub fr':>7} {'skipped':>8}")
    for name in ("default", "bcsh+flip+night", "flicker bands"):
        cpu, fm, fs, skipped = paced(args.seconds, TUNINGS[name])
        print(f"{name:<18} {cpu:>15.1f}% {fm:>8} {fs:>7} {skipped:>8}")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"\nmax RSS {ru.ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
