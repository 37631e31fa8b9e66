"""Compressed capture (H.264 / MJPEG) on the capture nodes, in-process and over a real FUSE mount.

The AVPU channel bound to a frame channel (``channel.start_encoded``) writes one
access unit / one JPEG per buffer; the encoder controls live on the capture node
and are INACTIVE while they do not apply to the selected format.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time

import av
import numpy as np
import pytest

from impv4l2.driver.h264 import NalType, nal_types
from impv4l2.driver.sim.pattern import read_counter
from impv4l2.fileops import POLLPRI, WouldBlock
from impv4l2.v4l2 import abi

from support.v4l2_helpers import (buf, ctrl, dqbuf, err, fmt, frames, ioctl, luma, open_node, query, start)

CAP = abi.BufType.VIDEO_CAPTURE
CID = abi.CID
PF = abi.PixelFormat
BF = abi.BufFlag
INACTIVE = abi.CtrlFlag.INACTIVE
H264_CIDS = (CID.MPEG_VIDEO_BITRATE_MODE, CID.MPEG_VIDEO_BITRATE, CID.MPEG_VIDEO_GOP_SIZE,
             CID.MPEG_VIDEO_H264_I_PERIOD, CID.MPEG_VIDEO_H264_PROFILE, CID.MPEG_VIDEO_H264_LEVEL,
             CID.MPEG_VIDEO_H264_MIN_QP, CID.MPEG_VIDEO_H264_MAX_QP, CID.MPEG_VIDEO_FORCE_KEY_FRAME)
JPEG_Q = CID.JPEG_COMPRESSION_QUALITY


# ---------------------------------------------------------------- formats

def test_enum_fmt_sizes_and_g_fmt(nodes, backend):
    for node in nodes:
        h = open_node(node)
        descs = {}
        for i in range(16):
            d = abi.v4l2_fmtdesc()
            d.index, d.type = i, CAP
            if err(h, "ENUM_FMT", d):
                break
            descs[d.pixelformat] = (d.flags, d.description)
        assert descs[PF.H264] == (abi.FmtFlag.COMPRESSED, b"H.264")
        assert descs[PF.MJPEG] == (abi.FmtFlag.COMPRESSED, b"Motion-JPEG")
        assert descs[PF.NV12][0] == 0
        sizes = [tuple(s) for s in node.channel.sizes()]
        for fourcc in (PF.H264, PF.MJPEG):
            got = []
            for i in range(10):
                s = abi.v4l2_frmsizeenum()
                s.index, s.pixel_format = i, fourcc
                if err(h, "ENUM_FRAMESIZES", s):
                    break
                got.append((s.discrete.width, s.discrete.height))
            assert got == sizes
            iv = abi.v4l2_frmivalenum()
            iv.pixel_format, (iv.width, iv.height) = fourcc, sizes[-1]
            ioctl(h, "ENUM_FRAMEINTERVALS", iv)
            assert iv.discrete.denominator == node.channel.frame_rates()[0]
            w, ht = sizes[0]
            f = fmt(w, ht, fourcc)
            ioctl(h, "S_FMT", f)
            g = fmt()
            ioctl(h, "G_FMT", g)
            pix = g.fmt.pix
            assert (pix.pixelformat, pix.width, pix.height, pix.bytesperline) == (fourcc, w, ht, 0)
            assert pix.sizeimage >= w * ht * 3 // 2  # a worst-case picture fits
            want_cs = abi.Colorspace.JPEG if fourcc == PF.MJPEG else abi.Colorspace.REC709
            assert pix.colorspace == want_cs
        h.release()


# ---------------------------------------------------------------- controls

def test_encoder_controls_inactive_unless_they_apply(nodes):
    main, _ = nodes
    h, watcher = open_node(main), open_node(main, pid=2)
    for cid in (CID.CODEC_CLASS, abi.CtrlClass.JPEG | 1):  # the class controls exist
        assert query(h, cid).type == abi.CtrlType.CTRL_CLASS
    assert query(h, CID.MPEG_VIDEO_BITRATE).name == b"Video Bitrate"
    assert query(h, JPEG_Q).name == b"Compression Quality"
    s = abi.v4l2_event_subscription()
    s.type, s.id = abi.EventType.CTRL, CID.MPEG_VIDEO_BITRATE
    ioctl(watcher, "SUBSCRIBE_EVENT", s)
    s.id = JPEG_Q
    ioctl(watcher, "SUBSCRIBE_EVENT", s)

    def inactive():
        return {cid: bool(query(h, cid).flags & INACTIVE) for cid in H264_CIDS + (JPEG_Q,)}

    assert all(inactive().values())  # NV12: no encoder
    assert not query(h, CID.BRIGHTNESS).flags & INACTIVE
    ioctl(h, "S_FMT", fmt(640, 360, PF.H264))
    st = inactive()
    assert not any(st[c] for c in H264_CIDS) and st[JPEG_Q]
    ev = abi.v4l2_event()
    ioctl(watcher, "DQEVENT", ev)  # bitrate became active
    assert (ev.id, ev.u.ctrl.changes) == (CID.MPEG_VIDEO_BITRATE, abi.EVENT_CTRL_CH_FLAGS)
    assert not ev.u.ctrl.flags & INACTIVE and ev.u.ctrl.value == ctrl(h, CID.MPEG_VIDEO_BITRATE)
    assert err(watcher, "DQEVENT", abi.v4l2_event()) == errno.ENOENT  # JPEG quality unchanged
    ioctl(h, "S_FMT", fmt(640, 360, PF.MJPEG))
    st = inactive()
    assert all(st[c] for c in H264_CIDS) and not st[JPEG_Q]
    got = set()
    while watcher.poll() & POLLPRI:
        ev = abi.v4l2_event()
        ioctl(watcher, "DQEVENT", ev)
        assert ev.u.ctrl.changes == abi.EVENT_CTRL_CH_FLAGS
        got.add((ev.id, bool(ev.u.ctrl.flags & INACTIVE)))
    assert got == {(CID.MPEG_VIDEO_BITRATE, True), (JPEG_Q, False)}
    # Inactive controls can still be set (they apply when their format is chosen).
    assert ctrl(h, CID.MPEG_VIDEO_BITRATE, 1_000_000) == 1_000_000
    assert err(h, "S_CTRL", abi.v4l2_control(JPEG_Q, 101)) == errno.ERANGE
    ioctl(h, "S_FMT", fmt(640, 360, PF.NV12))
    assert all(inactive().values())
    h.release()
    watcher.release()


# ---------------------------------------------------------------- H.264

def test_h264_access_units_idr_layout_and_flags(nodes):
    main, _ = nodes
    h = open_node(main)
    ctrl(h, CID.MPEG_VIDEO_GOP_SIZE, 10)
    assert ctrl(h, CID.MPEG_VIDEO_H264_I_PERIOD) == 10  # one setting
    start(h, PF.H264, (640, 360), 4)
    got = frames(main, h, 25)
    ioctl(h, "STREAMOFF", abi.c_int(CAP))
    keys = []
    for i, (au, flags, _) in enumerate(got):
        assert au[:4] == b"\0\0\0\1"
        types = nal_types(au)
        assert NalType.AUD not in types and NalType.SEI not in types
        idr = NalType.IDR in types
        if idr:
            assert types[:3] == [NalType.SPS, NalType.PPS, NalType.IDR]  # a client can join here
            keys.append(i)
        else:
            assert NalType.SPS not in types and set(types) == {NalType.SLICE}
        assert flags & (BF.KEYFRAME | BF.PFRAME) == (BF.KEYFRAME if idr else BF.PFRAME)
        assert not flags & BF.ERROR
    assert keys == [0, 10, 20]  # GOP 10 counts encoded frames
    # The AUs decode (also from the second IDR on) and the burned-in counter is the sequence.
    for first in (0, 10):
        dec = av.CodecContext.create("h264", "r")
        for au, _, seq in got[first:]:
            pics = dec.decode(av.Packet(au))
            assert len(pics) == 1
            assert read_counter(luma(pics[0])) == seq
    seqs = [s for _, _, s in got]
    assert all(b > a for a, b in zip(seqs, seqs[1:]))
    h.release()


def test_force_key_frame_makes_next_frame_idr(nodes):
    main, _ = nodes
    h = open_node(main)
    ctrl(h, CID.MPEG_VIDEO_GOP_SIZE, 1000)
    # One buffer: while the client holds it no frame is encoded (the channel drops
    # them before encoding), so the frame after QBUF is the one after the control.
    start(h, PF.H264, (640, 360), 1)
    for press in range(2):
        got = []
        for _ in range(3):
            b = dqbuf(h)
            got.append(b.flags)
            ioctl(h, "QBUF", buf(b.index))
        assert all(f & BF.PFRAME for f in got[1:]), got  # first may be the stream's IDR
        b = dqbuf(h)
        assert b.flags & BF.PFRAME
        ctrl(h, CID.MPEG_VIDEO_FORCE_KEY_FRAME, 0)
        ioctl(h, "QBUF", buf(b.index))
        b = dqbuf(h)
        au = bytes(main.memory.view(b.m.offset, b.bytesused))
        assert b.flags & BF.KEYFRAME and nal_types(au)[:3] == [7, 8, 5]
        ioctl(h, "QBUF", buf(b.index))
    h.release()


def test_bitrate_change_while_streaming_lowers_frame_size(nodes):
    main, _ = nodes
    h = open_node(main)
    # The synthetic scene is easy to code: only a short GOP and QP down to 0 let
    # the high rate show in the frame sizes.
    ctrl(h, CID.MPEG_VIDEO_GOP_SIZE, 5)
    ctrl(h, CID.MPEG_VIDEO_BITRATE_MODE, 1)  # CBR
    ctrl(h, CID.MPEG_VIDEO_H264_MIN_QP, 0)
    ctrl(h, CID.MPEG_VIDEO_BITRATE, 8_000_000)
    start(h, PF.H264, (1280, 720), 4)
    high = frames(main, h, 20)
    ctrl(h, CID.MPEG_VIDEO_BITRATE, 100_000)  # EncoderChannel.update, same stream
    low = frames(main, h, 25)
    ioctl(h, "STREAMOFF", abi.c_int(CAP))
    # The change was applied in place: the IDR cadence went on undisturbed.
    keys = [i for i, (_, f, _) in enumerate(high + low) if f & BF.KEYFRAME]
    assert keys == list(range(0, 45, 5))
    b_high = np.mean([len(a) for a, _, _ in high[5:]])
    b_low = np.mean([len(a) for a, _, _ in low[10:]])  # after the rate control settled
    assert b_low < b_high / 2, (b_high, b_low)
    h.release()


# ---------------------------------------------------------------- MJPEG

def test_mjpeg_pictures_and_quality(nodes):
    _, sub = nodes
    h = open_node(sub)
    ctrl(h, JPEG_Q, 95)
    start(h, PF.MJPEG, (640, 360), 4)
    good = frames(sub, h, 6)
    ctrl(h, JPEG_Q, 5)
    poor = frames(sub, h, 6)
    ioctl(h, "STREAMOFF", abi.c_int(CAP))
    dec = av.CodecContext.create("mjpeg", "r")
    for jpeg, flags, seq in good + poor:
        assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
        assert flags & BF.KEYFRAME and not flags & (BF.PFRAME | BF.ERROR)
        (pic,) = dec.decode(av.Packet(jpeg))
        assert (pic.width, pic.height) == (640, 360)
        assert read_counter(luma(pic)) == seq
    # Quality applies from the next picture: the last ones are much smaller.
    assert np.mean([len(j) for j, _, _ in poor[2:]]) < 0.75 * np.mean([len(j) for j, _, _ in good])
    h.release()


def test_read_gives_whole_pictures(nodes):
    _, sub = nodes
    h = open_node(sub, nonblock=False)
    ioctl(h, "S_FMT", fmt(320, 180, PF.MJPEG))
    for _ in range(2):
        data, deadline = None, time.monotonic() + 5
        while data is None and time.monotonic() < deadline:
            try:
                data = bytes(h.read(1 << 20, 0))
            except WouldBlock:  # no picture yet (the transport would wait)
                time.sleep(0.005)
        assert data and data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    h.release()


# ---------------------------------------------------------------- FUSE end to end

def ffmpeg_copy(path: str, fmt_name: str, size: tuple[int, int], n: int, out) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "v4l2",
                    "-input_format", fmt_name, "-video_size", f"{size[0]}x{size[1]}",
                    "-i", path, "-c", "copy", "-frames:v", str(n), str(out)],
                   check=True, timeout=120)


@pytest.mark.root
@pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse")
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
@pytest.mark.parametrize("index,fmt_name,size,count", [
    (0, "h264", (1920, 1080), 75),
    (1, "mjpeg", (640, 360), 75),
])
def test_ffmpeg_copy_decodes_with_counter(served, tmp_path, index, fmt_name, size, count):
    out = tmp_path / f"{fmt_name}.mp4"
    ffmpeg_copy(served[index], fmt_name, size, count, out)
    dec = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(out), "-f", "null", "-"],
                         capture_output=True, text=True, timeout=120)
    assert dec.returncode == 0 and dec.stderr == "", dec.stderr  # decodes without a single error
    n = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                        "-show_entries", "stream=codec_name,width,height,nb_read_frames",
                        "-of", "csv=p=0", str(out)],
                       check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    codec = {"h264": "h264", "mjpeg": "mjpeg"}[fmt_name]
    assert n == f"{codec},{size[0]},{size[1]},{count}"
    with av.open(str(out)) as c:
        counters = [read_counter(luma(f)) for f in c.decode(video=0)]
    assert len(counters) == count
    assert all(b > a for a, b in zip(counters, counters[1:])), counters
