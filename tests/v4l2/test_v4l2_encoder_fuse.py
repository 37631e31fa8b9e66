"""The M2M encoder node served over a real FUSE mount, driven by real clients:
ffmpeg's h264_v4l2m2m (found through a /dev/videoN symlink, as ffmpeg scans
/dev) and a Python client using fcntl.ioctl + mmap on the node file."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

from impv4l2.driver.h264 import NalType, nal_types

from support.encoder_client import FdHandle, M2MClient, err_of, make_frame, texture
from support.v4l2_helpers import ioctl

pytestmark = pytest.mark.root

from impv4l2.v4l2 import abi  # noqa: E402

CID = abi.CID
BF = abi.BufFlag


def _free_video_number() -> int:
    for n in range(64, 100):
        if not os.path.lexists(f"/dev/video{n}"):
            return n
    pytest.skip("no free /dev/videoN name")


@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    """(node, path of the FUSE file, /dev/videoN symlink to it)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    from impv4l2.driver import load_backend
    from impv4l2.fuse import FuseMount
    from impv4l2.v4l2.encoder import EncoderNode

    n = _free_video_number()
    backend = load_backend("sim")
    node = EncoderNode(f"video{n}", backend)
    mnt = FuseMount(str(tmp_path_factory.mktemp("enc") / "mnt"), mmap_mode=getattr(request, "param", "auto"))
    mnt.start()
    link = f"/dev/video{n}"
    try:
        path = mnt.add(node)
        os.symlink(path, link)
        yield node, path, link
    finally:
        if os.path.islink(link):
            os.unlink(link)
        mnt.stop()
        node.close()
        backend.close()


def _probe(path: str, entries: str) -> list[str]:
    r = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries", entries,
                        "-of", "csv=p=0", *(["-count_frames"] if "nb_read" in entries else []), path],
                       capture_output=True, text=True, check=True)
    return r.stdout.split()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
@pytest.mark.parametrize("pix_fmt,fourcc", [("yuv420p", "YU12"), ("nv12", "NV12")])
# auto is passthrough on this kernel (the client maps the memfd); direct and cached (Debian 6.1's
# mode) go through the page cache: i_size pushed with the memory (once SIGBUS at the first
# OUTPUT write), client-written frames fetched with NOTIFY_RETRIEVE, the worker woken when
# they land.  (The in-process client below cannot use them: it would fault its own mount.)
@pytest.mark.parametrize("served", ["auto", "direct", "cached"], indirect=True)
def test_ffmpeg_h264_v4l2m2m(served, tmp_path, pix_fmt, fourcc):
    node, path, link = served
    out = tmp_path / "out.mp4"
    r = subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "verbose", "-nostdin", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30", "-frames:v", "300",
         "-pix_fmt", pix_fmt, "-c:v", "h264_v4l2m2m", "-b:v", "2M", "-g", "30", str(out)],
        capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Using device {link}" in r.stderr
    assert f"output={fourcc} capture=H264" in r.stderr
    # decodes without errors, 300 frames, an IDR every 30 frames, ~2 Mb/s
    d = subprocess.run(["ffmpeg", "-v", "error", "-i", str(out), "-f", "null", "-"],
                       capture_output=True, text=True)
    assert d.returncode == 0 and d.stderr.strip() == "", d.stderr
    bit_rate, frames = _probe(str(out), "stream=bit_rate,nb_read_frames")[0].split(",")
    assert int(frames) == 300
    assert abs(int(bit_rate) - 2_000_000) < 0.2 * 2_000_000, bit_rate
    flags = _probe(str(out), "packet=flags")
    keys = [i for i, f in enumerate(flags) if f.startswith("K")]
    assert keys == list(range(0, 300, 30))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_ffmpeg_hevc_v4l2m2m(served, tmp_path):
    """HEVC as the coded format: ffmpeg's hevc_v4l2m2m finds the node, the stream decodes clean,
    a key frame every 30 frames, VPS+SPS+PPS with each (the in-band headers the MP4 keeps)."""
    from impv4l2.driver.h264 import HEVC
    from impv4l2.driver.sim.avpu import HAVE_X265

    if not HAVE_X265:
        pytest.skip("PyAV without libx265: the node offers no HEVC")
    node, path, link = served
    out, raw = tmp_path / "out.mp4", tmp_path / "out.hevc"
    r = subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "verbose", "-nostdin", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30", "-frames:v", "150",
         "-pix_fmt", "nv12", "-c:v", "hevc_v4l2m2m", "-b:v", "1M", "-g", "30", str(out)],
        capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Using device {link}" in r.stderr
    assert "output=NV12 capture=HEVC" in r.stderr
    d = subprocess.run(["ffmpeg", "-v", "error", "-i", str(out), "-f", "null", "-"],
                       capture_output=True, text=True)
    assert d.returncode == 0 and d.stderr.strip() == "", d.stderr
    assert _probe(str(out), "stream=codec_name,nb_read_frames")[0] == "hevc,150"
    keys = [i for i, f in enumerate(_probe(str(out), "packet=flags")) if f.startswith("K")]
    assert keys == list(range(0, 150, 30))
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(out), "-c", "copy", "-f", "hevc", str(raw)],
                   check=True)
    # (the mp4 -> Annex-B filter may add hvcC's parameter sets too: check what precedes each IDR)
    types = nal_types(raw.read_bytes(), HEVC)
    idrs = [i for i, t in enumerate(types) if t in HEVC.idr]
    assert len(idrs) == 5 and all(types[i - 3:i] == [32, 33, 34] for i in idrs), types  # VPS, SPS, PPS
    assert not HEVC.drop & set(types)  # no AUD, no SEI


def test_python_client_drain_and_controls(served):
    """Streaming control over the real transport: FORCE_KEY_FRAME, drain
    (LAST, EPIPE as the errno of the real DQBUF, EOS event), resume."""
    node, path, link = served
    w, h = 320, 240
    tex = texture(w, h)
    fr = [make_frame(tex, i, w, h) for i in range(12)]
    c = M2MClient(node, w, h, handle=FdHandle(path), controls={CID.MPEG_VIDEO_GOP_SIZE: 100})
    try:
        sub = abi.v4l2_event_subscription()
        sub.type = abi.EventType.EOS
        ioctl(c.h, "SUBSCRIBE_EVENT", sub)
        c.streamon()
        aus = [au for _, au in c.encode(fr[:4])]
        c.ctrl(CID.MPEG_VIDEO_FORCE_KEY_FRAME, 0)
        aus += [au for _, au in c.encode(fr[4:6], ts0_us=4 * 33_333)]
        assert [NalType.IDR in nal_types(a) for a in aus] == [True, False, False, False, True, False]
        for i in range(3):
            c.queue_out(i, fr[6 + i], i)
        for i in range(4):
            c.queue_cap(i)
        c.encoder_cmd(1)
        got = [c.dqbuf(c.cap_t)]
        while not got[-1][0].flags & BF.LAST and len(got) < 4:
            got.append(c.dqbuf(c.cap_t))
        # The LAST flag rides on the third frame, or (when all three were
        # encoded before the STOP arrived) on an empty fourth buffer, as
        # v4l2_update_last_buf_state does with an empty OUTPUT queue.
        assert [n > 0 for _, n, _ in got] in ([True] * 3, [True] * 3 + [False])
        assert [bool(b.flags & BF.LAST) for b, _, _ in got] == [False] * (len(got) - 1) + [True]
        assert err_of(c.dqbuf, c.cap_t) == errno.EPIPE
        ev = abi.v4l2_event()
        ioctl(c.h, "DQEVENT", ev)
        assert ev.type == abi.EventType.EOS
        for _ in range(3):
            c.dqbuf(c.out_t)
        c.encoder_cmd(0)
        # a CAPTURE buffer to resume into: when the LAST flag came on an empty fourth buffer,
        # the drain took all four (the race the assertion above allows)
        c.queue_cap(got[0][0].index)
        c.queue_out(0, fr[9], 9)
        b, n, au = c.dqbuf(c.cap_t)
        assert n > 0 and not b.flags & BF.LAST
    finally:
        c.close()
