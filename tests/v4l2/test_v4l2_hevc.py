"""H.265 (V4L2_PIX_FMT_HEVC) on the capture nodes: the sim AVPU's libx265 channel in-process,
ffmpeg over a real FUSE mount, and the t31 backend over the fake libimp (issue 12 item 2).

What the T31 emits and so what every path must show: VPS+SPS+PPS before every IDR, no AUD,
no SEI, one slice per picture, KEYFRAME on IDRs only; the HEVC controls as the kernel names
them, INACTIVE unless HEVC is the selected format.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import av
import pytest

from impv4l2.driver.h264 import HEVC, HevcNalType as N, nal_spans, nal_types, unescape_rbsp
from impv4l2.driver.sim.avpu import HAVE_X265
from impv4l2.driver.sim.pattern import read_counter
from impv4l2.v4l2 import abi
from impv4l2.v4l2.capture import CaptureNode

from support import t31_fake  # noqa: E402
from support.paths import CLIENTS, ROOT
from support.v4l2_helpers import (buf, ctrl, dqbuf, err, fmt, frames, ioctl, luma, open_node, query, reqbufs,
                                  streamon)

make_fake, fake = t31_fake.make_fake, t31_fake.fake  # the fixtures of the fake libimp

pytestmark = pytest.mark.skipif(not HAVE_X265, reason="PyAV without libx265: HEVC not offered")

CAP = abi.BufType.VIDEO_CAPTURE
CID = abi.CID
PF = abi.PixelFormat
BF = abi.BufFlag
INACTIVE = abi.CtrlFlag.INACTIVE
PARAMS = [N.VPS, N.SPS, N.PPS]
IDRS = {N.IDR_W_RADL, N.IDR_N_LP}
# HEVC control -> (type, minimum, maximum, the kernel's name)
HEVC_CIDS = {
    CID.MPEG_VIDEO_HEVC_PROFILE: (abi.CtrlType.MENU, 0, 0, b"HEVC Profile"),
    CID.MPEG_VIDEO_HEVC_LEVEL: (abi.CtrlType.MENU, 0, 12, b"HEVC Level"),
    CID.MPEG_VIDEO_HEVC_TIER: (abi.CtrlType.MENU, 0, 1, b"HEVC Tier"),
    CID.MPEG_VIDEO_HEVC_MIN_QP: (abi.CtrlType.INTEGER, 0, 51, b"HEVC Minimum QP Value"),
    CID.MPEG_VIDEO_HEVC_MAX_QP: (abi.CtrlType.INTEGER, 0, 51, b"HEVC Maximum QP Value"),
    CID.MPEG_VIDEO_HEVC_REFRESH_TYPE: (abi.CtrlType.MENU, 2, 2, b"HEVC Refresh Type"),
    CID.MPEG_VIDEO_HEVC_REFRESH_PERIOD: (abi.CtrlType.INTEGER, 1, 65535, b"HEVC Refresh Period"),
}


def start(h, size, count):
    ioctl(h, "S_FMT", fmt(*size, fourcc=PF.HEVC))
    r = reqbufs(h, count)
    for i in range(r.count):
        ioctl(h, "QBUF", buf(i))
    streamon(h)


def fmtdesc_of(h, fourcc: int) -> tuple[int, bytes] | None:
    """(flags, description) of ``fourcc`` in the node's ENUM_FMT list, None if absent."""
    d = abi.v4l2_fmtdesc()
    index = 0
    while True:
        d.index, d.type = index, CAP
        if err(h, "ENUM_FMT", d):
            return None
        if d.pixelformat == fourcc:
            return d.flags, d.description
        index += 1


def check_layout(aus) -> list[int]:
    """The T31 layout of each AU (bytes, keyframe flag); returns the indexes of the IDRs."""
    keys = []
    for i, (au, key) in enumerate(aus):
        assert au[:4] == b"\0\0\0\1"
        types = nal_types(au, HEVC)
        assert not HEVC.drop & set(types), (i, types)  # no AUD, no SEI
        vcl = [t for t in types if t in HEVC.vcl]
        assert len(vcl) == 1, (i, types)  # one slice per picture
        if vcl[0] in IDRS:
            assert types == PARAMS + vcl, (i, types)  # a client can join here
            keys.append(i)
        else:
            assert types == [N.TRAIL_R] or types == [N.TRAIL_N], (i, types)
        assert key == (vcl[0] in IDRS), (i, types, key)
    return keys


def sps_ptl(au: bytes) -> tuple[int, int, int]:
    """(general_profile_idc, general_tier_flag, general_level_idc) of the AU's SPS."""
    sps = next(s for s in nal_spans(au, HEVC) if s.nal_type == N.SPS)
    rbsp = unescape_rbsp(au[sps.payload + 2:sps.end])
    # byte 0: vps id, max_sub_layers, nesting; byte 1: profile_space, tier, profile_idc;
    # 4 bytes of compatibility flags, 6 of constraint flags, then general_level_idc
    return rbsp[1] & 0x1F, rbsp[1] >> 5 & 1, rbsp[12]


# ---------------------------------------------------------------- in-process (sim)

def test_hevc_format_and_controls(nodes):
    for node in nodes:
        h = open_node(node)
        assert fmtdesc_of(h, PF.HEVC) == (abi.FmtFlag.COMPRESSED, b"HEVC")
        for cid, (t, lo, hi, name) in HEVC_CIDS.items():
            q = query(h, cid)
            assert (q.type, q.minimum, q.maximum, q.name) == (t, lo, hi, name), hex(cid)
            assert q.flags & INACTIVE  # NV12 selected
        m = abi.v4l2_querymenu()
        m.id, m.index = CID.MPEG_VIDEO_HEVC_PROFILE, 0
        ioctl(h, "QUERYMENU", m)
        assert m.name == b"Main"
        ioctl(h, "S_FMT", fmt(*node.channel.sizes()[-1], fourcc=PF.HEVC))
        g = fmt()
        ioctl(h, "G_FMT", g)
        assert g.fmt.pix.pixelformat == PF.HEVC and g.fmt.pix.bytesperline == 0
        for cid in (*HEVC_CIDS, CID.MPEG_VIDEO_GOP_SIZE, CID.MPEG_VIDEO_BITRATE,
                    CID.MPEG_VIDEO_FORCE_KEY_FRAME):
            assert not query(h, cid).flags & INACTIVE, hex(cid)
        for cid in (CID.MPEG_VIDEO_H264_PROFILE, CID.MPEG_VIDEO_H264_MIN_QP, CID.JPEG_COMPRESSION_QUALITY):
            assert query(h, cid).flags & INACTIVE, hex(cid)
        # GOP_SIZE and HEVC_REFRESH_PERIOD are one setting
        ctrl(h, CID.MPEG_VIDEO_GOP_SIZE, 12)
        assert ctrl(h, CID.MPEG_VIDEO_HEVC_REFRESH_PERIOD) == 12
        h.release()


def test_hevc_access_units_layout_decode_and_controls(nodes):
    _, sub = nodes
    h = open_node(sub)
    ctrl(h, CID.MPEG_VIDEO_GOP_SIZE, 10)
    ctrl(h, CID.MPEG_VIDEO_HEVC_LEVEL, 4)  # "3.1"
    ctrl(h, CID.MPEG_VIDEO_HEVC_TIER, 1)  # High
    start(h, (640, 360), 4)
    got = frames(sub, h, 25)
    ioctl(h, "STREAMOFF", abi.c_int(CAP))
    h.release()
    assert check_layout([(au, bool(f & BF.KEYFRAME)) for au, f, _ in got]) == [0, 10, 20]
    assert all(f & (BF.KEYFRAME | BF.PFRAME) and not f & BF.ERROR for _, f, _ in got)
    # Main profile, level 3.1 (30 x 3.1); x265 takes High tier as a permission and codes Main
    # tier while the Main tier limits suffice (its --high-tier doc), as here
    assert sps_ptl(got[0][0]) == (1, 0, 93)
    for first in (0, 10):  # decodes from each IDR on; the burned-in counter is the sequence
        dec = av.CodecContext.create("hevc", "r")
        for au, _, seq in got[first:]:
            pics = dec.decode(av.Packet(au))
            assert len(pics) == 1
            assert read_counter(luma(pics[0])) == seq


def test_hevc_force_key_frame(nodes):
    _, sub = nodes
    h = open_node(sub)
    ctrl(h, CID.MPEG_VIDEO_GOP_SIZE, 1000)
    start(h, (640, 360), 1)  # one buffer: the frame after QBUF is encoded after the control
    for _ in range(2):
        for _ in range(3):
            b = dqbuf(h)
            ioctl(h, "QBUF", buf(b.index))
        b = dqbuf(h)
        assert b.flags & BF.PFRAME
        ctrl(h, CID.MPEG_VIDEO_FORCE_KEY_FRAME, 0)
        ioctl(h, "QBUF", buf(b.index))
        b = dqbuf(h)
        au = bytes(sub.memory.view(b.m.offset, b.bytesused))
        types = nal_types(au, HEVC)
        assert b.flags & BF.KEYFRAME and types[:3] == PARAMS and types[3:] in ([N.IDR_N_LP], [N.IDR_W_RADL])
        ioctl(h, "QBUF", buf(b.index))
    h.release()


# ---------------------------------------------------------------- ffmpeg over FUSE

CLIENT = CLIENTS / "compressed.py"


@pytest.mark.root
@pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse")
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_linuxpy_hevc_from_main_remuxes_and_decodes(served, tmp_path):
    """300 frames of 1080p HEVC from main by linuxpy (MMAP, its own process), remuxed into MP4 by
    ffmpeg (-c copy) and decoded without an error.  ffmpeg's own v4l2 input cannot ask for HEVC:
    its format table (libavdevice/v4l2-common.c) maps no codec to V4L2_PIX_FMT_HEVC."""
    raw, mp4 = tmp_path / "main.hevc", tmp_path / "main.mp4"
    main = served[0]
    root = ROOT
    p = subprocess.run([sys.executable, str(CLIENT), main, "HEVC", "1920", "1080", "300", str(raw)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(root)))
    assert p.returncode == 0, p.stderr[-3000:]
    meta = [ln.split() for ln in p.stdout.splitlines()]
    assert len(meta) == 300
    seqs = [int(m[0]) for m in meta]
    assert all(b > a for a, b in zip(seqs, seqs[1:])), seqs
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "hevc", "-framerate", "25",
                    "-i", str(raw), "-c", "copy", str(mp4)], check=True, timeout=120)
    dec = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(mp4), "-f", "null", "-"],
                         capture_output=True, text=True, timeout=120)
    assert dec.returncode == 0 and dec.stderr == "", dec.stderr
    n = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                        "-show_entries", "stream=codec_name,profile,width,height,nb_read_frames",
                        "-of", "csv=p=0", str(mp4)], check=True, capture_output=True, text=True,
                       timeout=60).stdout.strip()
    assert n == "hevc,Main,1920,1080,300"
    # the buffers as the client got them: one AU each, the T31 layout, KEYFRAME on the IDRs
    data, pos, aus = raw.read_bytes(), 0, []
    for _, used, _ in meta:
        aus.append(data[pos:pos + int(used)])
        pos += int(used)
    keys = check_layout([(au, m[2] == "K") for au, m in zip(aus, meta)])
    assert keys[0] == 0 and len(keys) >= 300 // 50  # GOP 50 (the default) counts encoded frames
    with av.open(str(mp4)) as c:
        counters = [read_counter(luma(f)) for f in c.decode(video=0)]
    assert counters == seqs  # every picture is the frame the sensor numbered


# ---------------------------------------------------------------- t31 over the fake libimp

def test_t31_hevc_channel(fake):
    """An HEVC stream on the t31 backend: IMP_ENC_PROFILE_HEVC_MAIN reaches CreateChn, key frames
    come from the packs' h265NalType, and the AUs have the T31 layout."""
    be = fake.backend()
    node = CaptureNode("video60", be, be.channels[0])
    node.add_waker(lambda: None)
    try:
        h = open_node(node)
        ctrl(h, CID.MPEG_VIDEO_GOP_SIZE, 5)
        start(h, (320, 240), 4)
        got = frames(node, h, 12)
        ioctl(h, "STREAMOFF", abi.c_int(CAP))
        h.release()
    finally:
        node.close()
        be.close()
    created = [ln.split() for ln in fake.lines() if ln.startswith("IMP_Encoder_CreateChn")]
    assert [c[2] for c in created] == [hex((1 << 24) | 1)], created  # IMP_ENC_PROFILE_HEVC_MAIN
    assert check_layout([(au, bool(f & BF.KEYFRAME)) for au, f, _ in got]) == [0, 5, 10]
    assert fake.errors() == 0
