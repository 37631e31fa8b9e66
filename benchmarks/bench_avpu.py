"""Sim AVPU throughput vs. libx264 through PyAV directly, identical settings.

    .venv/bin/python benchmarks/bench_avpu.py [--frames-1080p 120] [--rounds 3]

For each size: NV12 frames (moving pattern + noise, pre-generated) go
through SimH264Channel.encode_into() and through a bare PyAV CodecContext
opened with the very options the channel uses (the channel's own option set,
read from it).  Runs alternate A/B ``rounds`` times; the best fps of each is
reported, with the ratio sim/direct (goal >= 0.85).  "raw copies" counts
copies of the input frame made on the way into libx264 outside x264 itself,
checked by comparing the AVFrame's plane pointer with the input address.
"""

from __future__ import annotations

import argparse
import fractions
import os
import sys
import time

import av
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from impv4l2.driver.base import Codec, EncoderParams, Profile, RcMode  # noqa: E402
from impv4l2.driver.sim import avpu  # noqa: E402


def make_frames(w: int, h: int, n: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    x = np.arange(w, dtype=np.int32)
    frames = []
    for i in range(n):
        f = np.empty((h * 3 // 2, w), np.uint8)
        f[:h] = ((x[None, :] + 8 * i) % 256).astype(np.uint8)
        f[:h] += rng.integers(0, 24, (h, w), dtype=np.uint8)
        f[h:] = 128
        frames.append(f)
    return frames


def run_sim(params: EncoderParams, frames, count: int, threads: int) -> tuple[float, int]:
    ch = avpu.SimH264Channel(params, threads=threads)
    out = memoryview(bytearray(params.width * params.height * 2))
    total = 0
    t0 = time.perf_counter()
    for i in range(count):
        n, _ = ch.encode_into(memoryview(frames[i % len(frames)]), i, out)
        total += n
    dt = time.perf_counter() - t0
    ch.close()
    return count / dt, total


def run_direct(params: EncoderParams, frames, count: int, threads: int) -> tuple[float, int]:
    # Same options as the channel builds (read from a throwaway channel).
    probe = avpu.SimH264Channel(params, threads=threads)
    opts, bit_rate = dict(probe._opts), probe._bit_rate
    probe.close()
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = params.width, params.height, "nv12"
    ctx.time_base = fractions.Fraction(params.fps_den, params.fps_num)
    ctx.framerate = fractions.Fraction(params.fps_num, params.fps_den)
    ctx.thread_count, ctx.thread_type = threads, "SLICE"
    if bit_rate:
        ctx.bit_rate = bit_rate
    ctx.options = opts
    ctx.open()
    total = 0
    t0 = time.perf_counter()
    for i in range(count):
        f = av.VideoFrame.from_numpy_buffer(frames[i % len(frames)], format="nv12")
        f.pts = i
        for p in ctx.encode(f):
            total += p.size
    dt = time.perf_counter() - t0
    return count / dt, total


def raw_copies(params: EncoderParams) -> int:
    """0 if the AVFrame handed to x264 points into the caller's memory."""
    f = make_frames(params.width, params.height, 1)[0]
    frame = avpu._frame_from_memory(memoryview(f), params, "nv12")
    return 0 if frame.planes[0].buffer_ptr == f.ctypes.data else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames-1080p", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=avpu.X264_THREADS,
                    help="x264 slice threads (0 = auto; default the channel's X264_THREADS)")
    ap.add_argument("--profile", default="high", choices=[p.value for p in Profile])
    a = ap.parse_args()
    sizes = [(640, 360), (1280, 720), (1920, 1080)]
    print(f"libx264 ultrafast zerolatency, {a.profile}, CBR 2 Mbit/s, gop 50, "
          f"threads={a.threads}, best of {a.rounds}")
    print(f"{'size':>10} {'frames':>6} {'sim fps':>9} {'direct fps':>10} {'ratio':>6}"
          f" {'sim kB/f':>8} {'raw copies':>10} {'AU copies':>9}")
    for w, h in sizes:
        params = EncoderParams(codec=Codec.H264, width=w, height=h, fps_num=25,
                               rc_mode=RcMode.CBR, bitrate=2_000_000, gop=50,
                               profile=Profile(a.profile), level="5.1")
        count = max(30, int(a.frames_1080p * (1920 * 1080) / (w * h)))
        frames = make_frames(w, h)
        best_s = best_d = 0.0
        bytes_s = 0
        for _ in range(a.rounds):
            fs, bytes_s = run_sim(params, frames, count, a.threads)
            fd, _ = run_direct(params, frames, count, a.threads)
            best_s, best_d = max(best_s, fs), max(best_d, fd)
        print(f"{w}x{h:<5} {count:>6} {best_s:>9.1f} {best_d:>10.1f} {best_s / best_d:>6.2f}"
              f" {bytes_s / count / 1000:>8.1f} {raw_copies(params):>10} {1:>9}")
    print("raw copies: copies of the NV12 frame before libx264 (x264 itself copies the "
          "picture into its frame pool in both paths); AU copies: encode_into() copies the "
          "compressed access unit once into the destination buffer.")


if __name__ == "__main__":
    main()
