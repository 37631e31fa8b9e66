"""Fan-out through `impv4l2 serve --backend t31` on the fake libimp (issue 12 item 1), FUSE door,
real ffmpeg: [main] nodes = 3, NV12 on main and H.264 on main-2 at once, a third client
joining the H.264 stream on main-3; the IMP record shows one encoder channel for both."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from test_t31_serve import (H, W, Serve, fake_lib, ffmpeg, h264_file, imp_calls,  # noqa: F401 (fixtures)
                            mounted)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")]


@pytest.fixture
def served(tmp_path, fake_lib, h264_file):  # noqa: F811 (the fixtures imported above)
    log = tmp_path / "imp.log"
    d = Serve(tmp_path, "t31", {"IMPV4L2_LIBIMP": str(fake_lib), "IMPFAKE_LOG": str(log),
                                "IMPFAKE_H264": str(h264_file)}, base=70)
    cfg = tmp_path / "t31.toml"
    # three clients within the camera's 24 MiB of buffers: 6 MiB each (t31's default 12 fits two)
    cfg.write_text(cfg.read_text().replace("[main]\n", "[main]\nnodes = 3\n", 1)
                   .replace("[nodes]\n", "[nodes]\nbuffer_mb = 6\n", 1))
    d.imp_log = log
    yield d.start()
    d.stop()


def nal_types(data: bytes) -> list[int]:
    return [p[0] & 0x1F for p in data.split(b"\x00\x00\x00\x01")[1:] if p]


def test_nv12_and_two_h264_clients_on_one_frame_source(served, tmp_path):
    raw, early, late = tmp_path / "main.nut", tmp_path / "main-2.h264", tmp_path / "main-3.h264"
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "v4l2", "-video_size", f"{W}x{H}"]
    procs = [subprocess.Popen([*cmd, "-input_format", "nv12", "-i", served.node("main"), "-frames:v", "90",
                               "-c:v", "rawvideo", str(raw)], stderr=subprocess.PIPE),
             subprocess.Popen([*cmd, "-input_format", "h264", "-i", served.node("main-2"), "-frames:v", "90",
                               "-c", "copy", str(early)], stderr=subprocess.PIPE)]
    time.sleep(1.0)  # a second in: mid-GOP of the 15-frame GOP the fake replays
    procs.append(subprocess.Popen([*cmd, "-input_format", "h264", "-i", served.node("main-3"), "-frames:v", "20",
                                   "-c", "copy", str(late)], stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for f in (early, late):
        dec = ffmpeg("-v", "error", "-i", str(f), "-f", "null", "-")
        assert dec.returncode == 0 and dec.stderr == b"", dec.stderr
    assert nal_types(late.read_bytes())[:3] == [7, 8, 5]  # the joiner starts at SPS, PPS, IDR
    n = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                        "stream=nb_read_frames", "-of", "csv=p=0", str(raw)], capture_output=True, text=True,
                       timeout=60).stdout.strip()
    assert n == "90"
    assert served.stop() == 0
    calls = imp_calls(served.imp_log)
    creates = [ln for ln in served.imp_log.read_text().splitlines() if ln.startswith("IMP_Encoder_CreateChn")]
    assert len(creates) == 1, creates  # one IMP encoder channel served main-2 and main-3
    assert calls.count("IMP_Encoder_RequestIDR") >= 1  # asked for the joiner
    assert not mounted(str(served.mount))
    assert " ERROR " not in served.text() and "Traceback" not in served.text(), served.text()

