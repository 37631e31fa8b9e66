"""Fan-out end to end (issue 12 item 1): plain `impv4l2 serve` with [main] nodes = 3 and
[sub] nodes = 3, real ffmpeg clients on the FUSE door, several at once on one channel.

Every frame carries the sim's burned-in counter (the channel's sequence number), so each
client's decoded frames show which sensor frames it got; a frame a client lacks must be
one the daemon dropped for that node because the client had no buffer queued (its
"stopped (N frames, M dropped)" line), never one the fan-out lost.  The daemon's
SIGUSR2 stats count the encoder channels running on each frame channel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import av
import pytest

from impv4l2.driver.sim.pattern import read_counter, y_plane

from support.daemon import IMPV4L2, SERVING
from support.paths import ROOT

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse"),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg"),
]
STOPPED = re.compile(r"(video\d+): stopped \((\d+) frames, (\d+) dropped\)")


class Served:
    """A running `impv4l2 serve` and what it logs."""

    def __init__(self, tmp: Path):
        base = next((b for b in range(40, 90, 8)
                     if not any(os.path.lexists(f"/dev/video{n}") for n in range(b, b + 8))), None)
        if base is None:
            pytest.skip("no free /dev/videoN range")
        self.mount, self.log = tmp / "mnt", tmp / "daemon.log"
        self.cfg = cfg = tmp / "impv4l2.toml"
        cfg.write_text(textwrap.dedent(f"""
            [main]
            nodes = 3
            [sub]
            nodes = 3
            [nodes]
            base = {base}
            [nodes.main-3]
            readers = "shared"
            [transport]
            cuse = "off"
            mount = "{self.mount}"
            dev_links = false
        """))
        self.proc = subprocess.Popen([*IMPV4L2, "--config", str(cfg), "serve"], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not SERVING.search(self.text()):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()
            time.sleep(0.1)
        pairs = re.findall(r"(video\d+) \(([\w-]+)\)", SERVING.search(self.text()).group(1))
        self.path = {role: str(self.mount / name) for name, role in pairs}
        self.name = {role: name for name, role in pairs}

    def text(self) -> str:
        return self.log.read_text()

    def stats(self, key: str = "channels"):
        """A part of the daemon's SIGUSR2 stats line."""
        before = self.text().count("stats: {")
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while self.text().count("stats: {") == before:
            assert time.monotonic() < deadline, "no stats line"
            time.sleep(0.05)
        line = [ln for ln in self.text().splitlines() if "stats: {" in ln][-1]
        return json.loads(line.split("stats: ", 1)[1])[key]

    def channels_when(self, ready, timeout: float = 30) -> dict:
        """Channel stats once ``ready(channels)`` holds (clients take a while to start), or the
        last ones seen."""
        deadline = time.monotonic() + timeout
        while True:
            channels = self.stats()
            if ready(channels) or time.monotonic() > deadline:
                return channels
            time.sleep(0.3)

    def dropped(self, role: str) -> int:
        """Frames the daemon dropped for the node (no buffer queued), over its stops so far."""
        return sum(int(d) for name, _f, d in STOPPED.findall(self.text()) if name == self.name[role])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("fanout"))
    yield s
    s.stop()
    assert "Traceback" not in s.text(), s.text()


def ffmpeg(path: str, fmt: str, size: tuple[int, int] | None, frames: int, out: str, raw: bool = False):
    """ffmpeg -f v4l2 on a node: -c copy into ``out`` (compressed) or raw frames to ``out``."""
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "v4l2", "-input_format", fmt]
    if size:
        cmd += ["-video_size", f"{size[0]}x{size[1]}"]
    cmd += ["-i", path, "-frames:v", str(frames)]
    # passthrough: ffmpeg's default output rate would duplicate frames on irregular timestamps
    cmd += (["-fps_mode", "passthrough", "-f", "rawvideo", "-c:v", "rawvideo"] if raw else ["-c", "copy"])
    cmd += [out]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE if out == "-" else subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def raw_counters(proc: subprocess.Popen, size: tuple[int, int], frames: int) -> list[int]:
    """Counters of ``frames`` NV12 frames ffmpeg writes to its stdout (read as they come)."""
    w, h = size
    n = w * h * 3 // 2
    counters = []
    for _ in range(frames):
        data = proc.stdout.read(n)
        assert len(data) == n, f"ffmpeg ended after {len(counters)} frames: {proc.stderr.read()!r}"
        counters.append(read_counter(y_plane(data, w, h)))
    return counters


def decoded_frames(path: str) -> list[tuple[int, bool]]:
    """Decode a stream file: every frame's (counter, key frame) (PyAV raises on a decode error)."""
    with av.open(path) as c:
        return [(read_counter(f.reformat(format="gray").to_ndarray()), bool(f.key_frame))
                for f in c.decode(video=0)]


def decoded_counters(path: str) -> list[int]:
    return [n for n, _key in decoded_frames(path)]


def decode_clean(path: str) -> None:
    dec = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-f", "null", "-"],
                         capture_output=True, text=True, timeout=300)
    assert dec.returncode == 0 and dec.stderr == "", dec.stderr


def nal_types(data: bytes, hevc: bool = False) -> list[int]:
    parts = data.split(b"\x00\x00\x00\x01")
    return [(p[0] >> 1) & 0x3F if hevc else p[0] & 0x1F for p in parts[1:] if p]


def gaps(counters: list[int]) -> int:
    """Sensor frames missing between a client's first and last frame."""
    assert all(b > a for a, b in zip(counters, counters[1:])), counters
    return counters[-1] - counters[0] + 1 - len(counters)


def wait(proc: subprocess.Popen, timeout: float = 300) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err


def test_list_shows_the_roles(served):
    out = subprocess.run([*IMPV4L2, "--config", str(served.cfg), "list", "--json"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    roles = {n["name"]: n["role"] for n in json.loads(out)}
    assert sorted(roles.values()) == ["encoder", "main", "main-2", "main-3", "sub", "sub-2", "sub-3"]
    assert all(roles[name] == role for role, name in served.name.items())


def test_nv12_1080p_on_main_and_h264_on_main_2_at_once(served, tmp_path):
    """300 frames each, at once: both decode clean and both see every sensor frame, but for
    the frames the daemon counted as dropped for that client (no buffer queued)."""
    h264 = str(tmp_path / "main-2.h264")
    overruns = served.stats("sensor_overruns")
    raw = ffmpeg(served.path["main"], "nv12", (1920, 1080), 300, "-", raw=True)
    coded = ffmpeg(served.path["main-2"], "h264", (1920, 1080), 300, h264)
    got: dict[str, list[int]] = {}
    reader = threading.Thread(target=lambda: got.setdefault("raw", raw_counters(raw, (1920, 1080), 300)))
    reader.start()
    channels = served.channels_when(lambda c: c["main"]["consumers"] == 2)
    reader.join(300)
    wait(raw)
    wait(coded)
    assert channels["main"]["encoders"] == {"h264": 1}, channels
    assert channels["main"]["consumers"] == 2, channels
    decode_clean(h264)
    coded_counters = decoded_counters(h264)
    assert len(coded_counters) == 300
    time.sleep(0.5)  # the stop lines
    overruns = served.stats("sensor_overruns") - overruns
    # In the range both clients streamed, a frame one lacks and the other has was produced
    # and not given to it: only allowed as a drop for lack of a buffer (the client's); a
    # frame both lack was never produced (a sensor overrun on this loaded host).
    raw_set, coded_set = set(got["raw"]), set(coded_counters)
    span = range(max(got["raw"][0], coded_counters[0]), min(got["raw"][-1], coded_counters[-1]) + 1)
    neither = [n for n in span if n not in raw_set and n not in coded_set]
    for name, mine, other, role in (("nv12", raw_set, coded_set, "main"), ("h264", coded_set, raw_set, "main-2")):
        counters = sorted(mine)
        only_other = [n for n in span if n not in mine and n in other]
        print(f"{name} on {role}: 300 frames, sensor frames {counters[0]}..{counters[-1]}, "
              f"{gaps(counters)} missing in all; in the common span {len(only_other)} the other client got, "
              f"daemon dropped {served.dropped(role)} for lack of a client buffer")
        assert len(only_other) <= served.dropped(role), (name, only_other)
    print(f"common span {len(span)} frames, {len(neither)} missing from both, sensor overruns {overruns}")
    assert len(neither) <= overruns, neither
    assert len(raw_set & coded_set) >= 250  # the same sensor frames reach both


def test_two_h264_clients_one_encoder(served, tmp_path):
    """main-2 (vb2) and two readers of main-3 (readers = "shared"): one AVPU channel."""
    files = [str(tmp_path / f"{i}.h264") for i in range(3)]
    before = served.stats()["main"]["encoders_opened"]
    procs = [ffmpeg(served.path["main-2"], "h264", None, 100, files[0])]
    time.sleep(1)
    procs += [ffmpeg(served.path["main-3"], "h264", None, 100, f) for f in files[1:]]
    channels = served.channels_when(lambda c: c["main"]["encoders"].get("h264") == 3)
    for p in procs:
        wait(p)
    assert channels["main"]["encoders"] == {"h264": 3}, channels  # three clients, one channel
    assert channels["main"]["encoders_opened"] == before + 1, channels
    for f in files:
        decode_clean(f)
        data = Path(f).read_bytes()
        assert nal_types(data)[:3] == [7, 8, 5], f  # each starts with SPS, PPS, IDR
        counters = decoded_counters(f)
        assert len(counters) == 100 and all(b > a for a, b in zip(counters, counters[1:]))


def test_three_clients_on_sub(served, tmp_path):
    """MJPEG on sub, H.264 on sub-2, NV12 on sub-3 at once: one raw delivery, one encoder
    channel per format."""
    mjpeg, h264 = str(tmp_path / "sub.mjpeg"), str(tmp_path / "sub-2.h264")
    procs = [ffmpeg(served.path["sub"], "mjpeg", (640, 360), 150, mjpeg),
             ffmpeg(served.path["sub-2"], "h264", (640, 360), 150, h264),
             ffmpeg(served.path["sub-3"], "nv12", (640, 360), 150, "-", raw=True)]
    got: dict[str, list[int]] = {}
    reader = threading.Thread(target=lambda: got.setdefault("raw", raw_counters(procs[2], (640, 360), 150)))
    reader.start()
    channels = served.channels_when(lambda c: c["sub"]["consumers"] == 3)
    reader.join(300)
    for p in procs:
        wait(p)
    assert channels["sub"]["encoders"] == {"jpeg": 1, "h264": 1}, channels
    assert channels["sub"]["consumers"] == 3, channels
    for f in (mjpeg, h264):
        decode_clean(f)
        counters = decoded_counters(f)
        assert len(counters) == 150 and all(b > a for a, b in zip(counters, counters[1:]))
    assert len(got["raw"]) == 150 and all(b > a for a, b in zip(got["raw"], got["raw"][1:]))


@pytest.mark.parametrize("late", ["main-3", "main-2"])
def test_joining_h264_mid_gop_starts_with_sps_pps_idr(served, tmp_path, late):
    """A client that joins a running H.264 stream 1.1 s in (GOP 50 at 25 fps: mid-GOP)
    gets SPS, PPS and an IDR first, and decodes from its first frame."""
    first = "main-2" if late == "main-3" else "main-3"
    early_file, late_file = str(tmp_path / "early.h264"), str(tmp_path / "late.h264")
    early = ffmpeg(served.path[first], "h264", None, 100, early_file)
    time.sleep(1.1)
    joined = ffmpeg(served.path[late], "h264", None, 25, late_file)
    wait(joined)
    wait(early)
    data = Path(late_file).read_bytes()
    assert nal_types(data)[:3] == [7, 8, 5], nal_types(data)[:8]
    decode_clean(late_file)
    late_frames, early_frames = decoded_frames(late_file), decoded_frames(early_file)
    assert len(late_frames) == 25 and late_frames[0][1]
    decode_clean(early_file)
    # One encoder: the IDR asked for at the join is in the early client's stream too, at the
    # same sensor frame, after the frames it had already got (it joined mid-stream).
    early = dict(early_frames)
    start = late_frames[0][0]
    assert early.get(start) is True, (start, early_frames)
    assert min(early) < start
    assert [n for n, _k in late_frames] == [n for n in sorted(early) if n >= start][:25]
