"""End to end: capture nodes over a real FUSE mount, read by ffmpeg/ffprobe and linuxpy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from impv4l2.driver import load_backend
from impv4l2.driver.sim.pattern import read_counter
from impv4l2.v4l2.capture import CaptureNode
from support.mounted import capture_nodes, served_on_mount
from support.paths import CLIENTS

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse"),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg"),
]


@pytest.fixture(scope="module")
def served():
    backend = load_backend("sim", fps=30)
    nodes = capture_nodes(backend)
    with served_on_mount(nodes, "impv4l2-v4l2-test-") as paths:
        yield backend, nodes, paths
    backend.close()


def capture(path: str, fourcc: str, size: tuple[int, int], frames: int, tmp_path) -> np.ndarray:
    """ffmpeg -f v4l2 (MMAP streaming) -> raw frames; returns (frames, bytes) uint8."""
    out = tmp_path / f"cap-{fourcc}.nut"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "v4l2",
                    "-input_format", fourcc, "-video_size", f"{size[0]}x{size[1]}", "-i", path,
                    "-frames:v", str(frames), "-c:v", "rawvideo", str(out)],
                   check=True, timeout=60)
    n = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                        "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(out)],
                       check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    assert int(n) == frames
    pix = {"nv12": "nv12", "yuyv422": "yuyv422"}[fourcc]
    raw = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(out), "-fps_mode", "passthrough", "-f", "rawvideo",
                          "-pix_fmt", pix, "-"], check=True, capture_output=True, timeout=120).stdout
    return np.frombuffer(raw, np.uint8).reshape(frames, -1)


def luma(frame: np.ndarray, fourcc: str, w: int, h: int) -> np.ndarray:
    if fourcc == "nv12":
        return frame[: w * h].reshape(h, w)
    return np.ascontiguousarray(frame.reshape(h, w * 2)[:, 0::2])


@pytest.mark.parametrize("index,fourcc,size,count", [
    (0, "nv12", (1920, 1080), 100),
    (0, "yuyv422", (1280, 720), 30),
    (1, "nv12", (640, 360), 100),
])
def test_ffmpeg_counter_increases(served, tmp_path, index, fourcc, size, count):
    backend, nodes, paths = served
    frames = capture(paths[index], fourcc, size, count, tmp_path)
    counters = [read_counter(luma(f, fourcc, *size)) for f in frames]
    assert all(b > a for a, b in zip(counters, counters[1:])), counters


def test_controls_between_captures(served, tmp_path):
    from linuxpy.video.device import Device

    backend, nodes, paths = served
    w, h = 640, 360
    base = capture(paths[1], "nv12", (w, h), 3, tmp_path)[-1]
    with Device(paths[1]) as dev:  # linuxpy's S_CTRL over the FUSE file
        dev.controls.brightness.value = 230
    try:
        bright = capture(paths[1], "nv12", (w, h), 3, tmp_path)[-1]
        assert luma(bright, "nv12", w, h)[40:].mean() > luma(base, "nv12", w, h)[40:].mean() + 10
    finally:
        backend.isp.set("brightness", 128)
    with Device(paths[0]) as dev:  # set on main: the ISP (and sub) flips
        dev.controls.horizontal_flip.value = 1
    try:
        flipped = capture(paths[1], "nv12", (w, h), 3, tmp_path)[-1]
        yb, yf = luma(base, "nv12", w, h)[200:240].astype(int), luma(flipped, "nv12", w, h)[200:240].astype(int)
        assert np.abs(yf[:, ::-1] - yb).mean() < np.abs(yf - yb).mean()
    finally:
        backend.isp.set("hflip", 0)


STREAM_CLIENT = str(CLIENTS / "stream.py")


def run_stream_client(mode: str, path: str, frames: int, timeout: float = 60) -> list[str]:
    """tests/clients/stream.py in its own process; returns its last line split."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, STREAM_CLIENT, mode, path, str(frames)], capture_output=True,
                       text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=root))
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


@pytest.mark.parametrize("door", [0, 1])
def test_node_on_two_doors_streams_on_each(door):
    """The daemon serves each node through two transports (CUSE and the mount).
    Regression for the 4-frame stall: the node kept only the last transport's
    waker, so a DQBUF parked (or a poll armed) on the first door was never
    woken; here two mounts stand in for the two doors."""
    from impv4l2.fuse.mount import FuseMount

    backend = load_backend("sim", fps=30)
    d = tempfile.mkdtemp(prefix="impv4l2-v4l2-test-")
    mounts = [FuseMount(os.path.join(d, f"door{i}")) for i in range(2)]
    node = CaptureNode("video11", backend, backend.channels[1])
    try:
        paths = []
        for m in mounts:
            m.start()
            paths.append(m.add(node))
        for mode in ("userptr", "mmap"):
            out = run_stream_client(mode, paths[door], 45)
            assert out[:2] == ["OK", "45"], out
    finally:
        for m in mounts:
            m.stop()
            os.rmdir(m.mountpoint)
        node.close()
        backend.close()
        os.rmdir(d)
