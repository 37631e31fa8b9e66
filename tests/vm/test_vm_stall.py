"""Regression for the 4-frame stall (VM): streaming from the CUSE nodes of the daemon as plain
``impv4l2 serve`` starts it (CUSE nodes *and* the FUSE mount).

The node kept one waker, the FUSE mount's (added after the CUSE server's): a DQBUF or read()
parked on the CUSE node, or a poll armed there, waited for a wake-up that never came once the
client got ahead of the sensor — in most runs after the 4 frames that were ready at STREAMON.
Every CUSE capture node streams 150 frames with blocking read(), USERPTR and MMAP through the
shim (once: the cause was deterministic, a missing waker; IMPV4L2_VM_STALL_REPEATS runs
each case more often), every frame checked by
tests/clients/stream.py (complete, counter increasing).  A 1080p USERPTR capture by v4l2-ctl
(20 frames, byte-checked) and GStreamer io-mode=rw (poll + read) complete on the same daemon.
"""

from __future__ import annotations

import os
import sys

import impv4l2_tests_vm_served as served
import numpy as np
import pytest

from impv4l2.driver.sim.pattern import read_counter, y_plane
from support.paths import CLIENTS

pytestmark = pytest.mark.vm

CLIENT = str(CLIENTS / "stream.py")
FRAMES = 150  # the stall came after 4; 150 frames is 6 s at 25 fps
REPEATS = int(os.environ.get("IMPV4L2_VM_STALL_REPEATS", "1"))
SIZES = {"main": (1920, 1080), "sub": (640, 360)}


@pytest.fixture(scope="module")
def daemon():
    with served.serving("default", "stall", ("main", "sub")) as d:
        yield d


@pytest.mark.parametrize("attempt", range(REPEATS))
@pytest.mark.parametrize("mode", ["read", "userptr", "mmap"])
@pytest.mark.parametrize("role", ["sub", "main"])
def test_cuse_node_streams_150_frames(daemon, role, mode, attempt):
    dev = daemon.nodes[role]
    w, h = SIZES[role]
    cmd = [sys.executable, CLIENT, mode, dev, str(FRAMES), str(w), str(h)]  # NV12 at the channel size
    if mode == "mmap":
        cmd = [*served.RUN, *cmd]  # a CUSE node has no mmap: the preload shim maps the memfd
    r = served.run(*cmd, timeout=240)
    assert r.stdout.split()[:2] == ["OK", str(FRAMES)], r.stdout + r.stderr[-2000:]


def test_v4l2_ctl_userptr_1080p(daemon, tmp_path):
    dev = daemon.nodes["main"]
    served.run("v4l2-ctl", "-d", dev, "--set-fmt-video=width=1920,height=1080,pixelformat=NV12")
    out = tmp_path / "main.nv12"
    served.run("v4l2-ctl", "-d", dev, "--stream-user", "--stream-count=20", f"--stream-to={out}",
               timeout=300)
    size = 1920 * 1080 * 3 // 2
    assert out.stat().st_size == 20 * size  # v4l2-ctl exits 0 on failures too: the file is the proof
    data = np.memmap(out, np.uint8, "r")
    counters = [read_counter(y_plane(data[i * size:(i + 1) * size], 1920, 1080)) for i in range(20)]
    assert all(b > a for a, b in zip(counters, counters[1:])), counters


@pytest.mark.parametrize("role", ["sub", "main"])
def test_gstreamer_read_write_60(daemon, role):
    r = served.run("gst-launch-1.0", "-q", "v4l2src", f"device={daemon.nodes[role]}", "io-mode=rw",
                   "num-buffers=60", "!", "fakesink", timeout=300, check=False)
    assert r.returncode == 0 and "ERROR" not in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
