"""In-process tests of the M2M H.264 encoder node (impv4l2.v4l2.encoder) on the sim backend."""

from __future__ import annotations

import errno
import threading

import av
import numpy as np
import pytest

from impv4l2.driver import load_backend
from impv4l2.driver.h264 import NalType, nal_spans, nal_types, parse_sps
from impv4l2.fileops import POLLERR, POLLIN, POLLOUT, POLLPRI
from impv4l2.v4l2 import abi
from impv4l2.v4l2.encoder import EncoderNode

from support.encoder_client import M2MClient, err_of, make_frame, texture
from support.v4l2_helpers import ioctl

BT = abi.BufType
PF = abi.PixelFormat
BF = abi.BufFlag
CID = abi.CID
W, H = 320, 240


@pytest.fixture(scope="module")
def backend():
    b = load_backend("sim")
    yield b
    b.close()


@pytest.fixture
def node(backend):
    n = EncoderNode("video42", backend)
    n.add_waker(lambda: None)
    yield n
    n.close()


@pytest.fixture
def splane_node(backend):
    n = EncoderNode("video45", backend, apis=("splane",))
    n.add_waker(lambda: None)
    yield n
    n.close()


@pytest.fixture(scope="module")
def frames():
    tex = texture(W, H)
    return [make_frame(tex, i, W, H) for i in range(60)]


def decode(aus: list[bytes]) -> list[av.VideoFrame]:
    ctx = av.CodecContext.create("h264", "r")
    out = []
    for au in aus:
        out += ctx.decode(av.Packet(au))
    out += ctx.decode(None)
    return out


def luma(frame: av.VideoFrame) -> np.ndarray:
    p = frame.planes[0]
    return np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:frame.height, :frame.width].astype(int)


def check_idr_layout(aus: list[bytes]) -> list[int]:
    """SPS+PPS before every IDR, no AUD/SEI, 4-byte start codes; returns keyframe indexes."""
    keys = []
    for i, au in enumerate(aus):
        spans = nal_spans(au)
        types = [s.nal_type for s in spans]
        assert all(s.start_code_len == 4 for s in spans), i
        assert NalType.AUD not in types and NalType.SEI not in types
        if NalType.IDR in types:
            assert types[:2] == [NalType.SPS, NalType.PPS], (i, types)
            keys.append(i)
    return keys


# ---------------------------------------------------------------- discovery


def test_querycap(node):
    from support.v4l2_helpers import open_node
    h = open_node(node)
    cap = abi.v4l2_capability()
    ioctl(h, "QUERYCAP", cap)
    assert cap.card == b"impv4l2 encoder" and cap.bus_info == b"platform:impv4l2-encoder"
    assert cap.device_caps == abi.Cap.VIDEO_M2M_MPLANE | abi.Cap.STREAMING | abi.Cap.EXT_PIX_FORMAT
    f = abi.v4l2_format()
    f.type = BT.VIDEO_OUTPUT
    assert err_of(ioctl, h, "G_FMT", f) == errno.EINVAL  # single-planar not offered
    h.release()
    both = EncoderNode("video43", node.backend, apis=("mplane", "splane"))
    h = open_node(both)
    ioctl(h, "QUERYCAP", cap)
    want = abi.Cap.VIDEO_M2M_MPLANE | abi.Cap.VIDEO_M2M | abi.Cap.STREAMING | abi.Cap.EXT_PIX_FORMAT
    assert cap.device_caps == want
    h.release()
    both.close()


def test_formats_and_sizes(node):
    from support.v4l2_helpers import open_node
    h = open_node(node)
    from impv4l2.driver.sim.avpu import HAVE_X265
    coded = [PF.H264] + [PF.HEVC] * HAVE_X265  # HEVC: only with libx265
    for t, want in ((BT.VIDEO_OUTPUT_MPLANE, [PF.NV12, PF.YUV420]), (BT.VIDEO_CAPTURE_MPLANE, coded),
                    (BT.VIDEO_OUTPUT, [])):
        got = []
        for i in range(5):
            d = abi.v4l2_fmtdesc()
            d.index, d.type = i, t
            if err_of(ioctl, h, "ENUM_FMT", d):
                break
            got.append(d.pixelformat)
            assert bool(d.flags & abi.FmtFlag.COMPRESSED) == (d.pixelformat in coded)
        assert got == want
    c = M2MClient.__new__(M2MClient)
    c.mplane = True
    # an unsupported raw format is adjusted to NV12; odd sizes to even; out-of-range clamped
    f = M2MClient.fmt(c, BT.VIDEO_OUTPUT_MPLANE, 641, 5000, PF.YUYV)
    ioctl(h, "S_FMT", f)
    pix = f.fmt.pix_mp
    assert (pix.pixelformat, pix.width, pix.height, pix.num_planes) == (PF.NV12, 640, 2048, 1)
    assert pix.plane_fmt[0].bytesperline == 640 and pix.plane_fmt[0].sizeimage == 640 * 2048 * 3 // 2
    f = M2MClient.fmt(c, BT.VIDEO_OUTPUT_MPLANE, 1280, 720, PF.YUV420)
    ioctl(h, "TRY_FMT", f)
    assert f.fmt.pix_mp.pixelformat == PF.YUV420
    # capture: the driver picks sizeimage (worst case) unless a bigger one is asked
    f = M2MClient.fmt(c, BT.VIDEO_CAPTURE_MPLANE, 0, 0, PF.MJPEG)
    ioctl(h, "S_FMT", f)
    assert f.fmt.pix_mp.pixelformat == PF.H264 and f.fmt.pix_mp.plane_fmt[0].sizeimage >= 640 * 2048
    fs = abi.v4l2_frmsizeenum()
    fs.pixel_format = PF.H264
    ioctl(h, "ENUM_FRAMESIZES", fs)
    assert fs.type == abi.raw.Frmsizetypes.STEPWISE
    assert (fs.stepwise.max_width, fs.stepwise.max_height, fs.stepwise.step_width) == (2624, 2048, 2)
    fs.index = 1
    assert err_of(ioctl, h, "ENUM_FRAMESIZES", fs) == errno.EINVAL
    # frame rate on OUTPUT
    p = abi.v4l2_streamparm()
    p.type = BT.VIDEO_OUTPUT_MPLANE
    p.parm.output.timeperframe.numerator, p.parm.output.timeperframe.denominator = 1001, 30000
    ioctl(h, "S_PARM", p)
    q = abi.v4l2_streamparm()
    q.type = BT.VIDEO_OUTPUT_MPLANE
    ioctl(h, "G_PARM", q)
    assert (q.parm.output.timeperframe.numerator, q.parm.output.timeperframe.denominator) == (1001, 30000)
    assert q.parm.output.capability == abi.Cap.TIMEPERFRAME
    # no separate coded frame interval (no ENC_CAP_FRAME_INTERVAL): CAPTURE G/S_PARM fail
    q.type = BT.VIDEO_CAPTURE_MPLANE
    assert err_of(ioctl, h, "G_PARM", q) == errno.EINVAL
    assert err_of(ioctl, h, "S_PARM", q) == errno.EINVAL
    h.release()


def test_controls(node):
    c = M2MClient(node, W, H, n_out=1, n_cap=1)
    q = abi.v4l2_queryctrl()
    q.id = CID.MPEG_VIDEO_B_FRAMES
    ioctl(c.h, "QUERYCTRL", q)
    assert (q.minimum, q.maximum) == (0, 0)
    assert c.ctrl(CID.MPEG_VIDEO_BITRATE) == 2_000_000  # config default
    assert c.ctrl(CID.MIN_BUFFERS_FOR_OUTPUT) == 1
    assert err_of(c.ctrl, CID.MIN_BUFFERS_FOR_OUTPUT, 3) == errno.EACCES
    m = abi.v4l2_querymenu()
    m.id, m.index = CID.MPEG_VIDEO_H264_PROFILE, 3  # Extended: not offered
    assert err_of(ioctl, c.h, "QUERYMENU", m) == errno.EINVAL
    m.index = 4
    ioctl(c.h, "QUERYMENU", m)
    assert m.name == b"High"
    # GOP_SIZE and H264_I_PERIOD are one setting
    c.ctrl(CID.MPEG_VIDEO_H264_I_PERIOD, 12)
    assert c.ctrl(CID.MPEG_VIDEO_GOP_SIZE) == 12
    # controls are per file handle (per encoding session)
    d = M2MClient(node, W, H, n_out=1, n_cap=1, pid=2)
    assert d.ctrl(CID.MPEG_VIDEO_GOP_SIZE) == 50
    c.close()
    d.close()


# ---------------------------------------------------------------- encoding


def test_encode_60_frames(node, frames):
    c = M2MClient(node, W, H, controls={CID.MPEG_VIDEO_GOP_SIZE: 15})
    c.streamon()
    res = c.encode(frames, ts0_us=5_000_000)
    aus = [au for _, au in res]
    for i, (b, au) in enumerate(res):
        assert b.timestamp.secs * 1_000_000 + b.timestamp.usecs == 5_000_000 + i * 33_333
        key = NalType.IDR in nal_types(au)
        assert bool(b.flags & BF.KEYFRAME) == key and bool(b.flags & BF.PFRAME) == (not key)
        assert b.flags & BF.TIMESTAMP_COPY and b.sequence == i
    assert check_idr_layout(aus) == [0, 15, 30, 45]
    sps = parse_sps(aus[0])
    assert (sps.width, sps.height, sps.profile_idc) == (W, H, 100)
    dec = decode(aus)
    assert len(dec) == 60 and (dec[0].width, dec[0].height) == (W, H)
    # the decoded picture is the input (lossy): compare luma
    y = np.frombuffer(frames[30][:W * H], np.uint8).reshape(H, W).astype(int)
    got = luma(dec[30])
    assert np.abs(got - y).mean() < 8
    c.close()


def test_yu12_and_single_planar_and_userptr(node, splane_node, frames):
    tex = texture(W, H, 3)
    yu = [make_frame(tex, i, W, H) for i in range(8)]
    for kw in ({"fourcc": PF.YUV420}, {"mplane": False}, {"memory": abi.Memory.USERPTR},
               {"mplane": False, "memory": abi.Memory.USERPTR}):
        c = M2MClient(splane_node if kw.get("mplane") is False else node, W, H, **kw)
        c.streamon()
        aus = [au for _, au in c.encode(yu)]
        assert len(decode(aus)) == 8, kw
        c.close()


def test_header_mode_separate(node, frames):
    # not offered by default (see EncoderNode): a menu with one item
    d = M2MClient(node, W, H, n_out=1, n_cap=1)
    assert err_of(d.ctrl, CID.MPEG_VIDEO_HEADER_MODE, 0) == errno.EINVAL  # ffmpeg: a debug line
    d.close()
    node = EncoderNode("video44", node.backend, separate_headers=True)
    c = M2MClient(node, W, H, controls={CID.MPEG_VIDEO_HEADER_MODE: 0, CID.MPEG_VIDEO_GOP_SIZE: 4})
    c.streamon()
    for i in range(4):
        c.queue_cap(i)
    c.queue_out(0, frames[0], 1000)
    b0, _, hdr = c.dqbuf(c.cap_t)
    b1, _, idr = c.dqbuf(c.cap_t)
    assert nal_types(hdr) == [NalType.SPS, NalType.PPS]  # the header alone (OMX CODECCONFIG)
    assert not b0.flags & BF.KEYFRAME
    assert nal_types(idr)[0] == NalType.IDR and b1.flags & BF.KEYFRAME
    assert b1.timestamp.usecs == 1000
    c.dqbuf(c.out_t)
    c.queue_cap(b0.index)
    c.queue_cap(b1.index)
    # later IDRs carry SPS+PPS in the same buffer (REPEAT_SEQ_HEADER on)
    res = []
    for i in range(1, 6):
        c.queue_out(0, frames[i], 1000 + i)
        b, _, au = c.dqbuf(c.cap_t)
        res.append(au)
        c.queue_cap(b.index)
        c.dqbuf(c.out_t)
    assert nal_types(res[3])[:3] == [NalType.SPS, NalType.PPS, NalType.IDR]
    assert len(decode([hdr + idr] + res)) == 6  # the header as extradata-like prefix
    c.close()


def test_repeat_seq_header_off(node, frames):
    c = M2MClient(node, W, H, controls={CID.MPEG_VIDEO_REPEAT_SEQ_HEADER: 0, CID.MPEG_VIDEO_GOP_SIZE: 5})
    c.streamon()
    aus = [au for _, au in c.encode(frames[:11])]
    assert nal_types(aus[0])[:2] == [NalType.SPS, NalType.PPS]
    assert nal_types(aus[5])[0] == NalType.IDR and nal_types(aus[10])[0] == NalType.IDR
    assert len(decode(aus)) == 11
    c.close()


def test_force_key_frame(node, frames):
    c = M2MClient(node, W, H, controls={CID.MPEG_VIDEO_GOP_SIZE: 1000})
    c.streamon()
    aus = [au for _, au in c.encode(frames[:5])]
    c.ctrl(CID.MPEG_VIDEO_FORCE_KEY_FRAME, 0)
    aus += [au for _, au in c.encode(frames[5:8])]
    keys = check_idr_layout(aus)
    assert keys == [0, 5]
    c.close()


def test_bitrate_halving_while_streaming(node):
    w, h, gop = 640, 360, 15
    tex = texture(w, h, 7)
    fr = [make_frame(tex, i, w, h, noise=20) for i in range(105)]
    c = M2MClient(node, w, h, controls={CID.MPEG_VIDEO_GOP_SIZE: gop, CID.MPEG_VIDEO_BITRATE_MODE: 1,
                                        CID.MPEG_VIDEO_BITRATE: 2_000_000})
    c.streamon()
    sizes = [len(au) for _, au in c.encode(fr[:45])]
    c.ctrl(CID.MPEG_VIDEO_BITRATE, 1_000_000)
    sizes += [len(au) for _, au in c.encode(fr[45:], ts0_us=45 * 33_333)]
    before = np.mean(sizes[15:45])
    after = np.mean(sizes[45 + 2 * gop:])  # within two GOPs of the change
    assert 0.35 < after / before < 0.65, (before, after)
    # and close to the targets (30 fps)
    assert 0.7 < before * 8 * 30 / 2_000_000 < 1.3
    c.close()


def test_two_sessions_at_once(node, frames):
    a = M2MClient(node, W, H, pid=1)
    b = M2MClient(node, 640, 360, fourcc=PF.YUV420, pid=2)
    tex = texture(640, 360)
    big = [make_frame(tex, i, 640, 360) for i in range(20)]
    out = {}

    def run(c, fr, key):
        c.streamon()
        out[key] = [au for _, au in c.encode(fr)]

    ts = [threading.Thread(target=run, args=(a, frames[:20], "a")),
          threading.Thread(target=run, args=(b, big, "b"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert [f.width for f in decode(out["a"])] == [W] * 20
    assert [f.width for f in decode(out["b"])] == [640] * 20
    # their buffers do not overlap in the node memory
    spans = sorted((o, o + n) for c in (a, b) for o, n in c.out_bufs + c.cap_bufs)
    assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:]))
    a.close()
    b.close()


@pytest.mark.parametrize("rect", [(8, 4, 300, 200), (0, 6, W, 200)], ids=["strided", "rows"])
def test_crop(splane_node, frames, rect):
    """A column crop is a numpy strided copy; a rows-only crop is contiguous slices (the
    camera's path, no numpy)."""
    left, top, cw, ch = rect
    c = M2MClient(splane_node, W, H, n_out=2, n_cap=2, mplane=False)
    sel = abi.raw.v4l2_selection()
    sel.type, sel.target = BT.VIDEO_OUTPUT, abi.raw.SelectionTarget.CROP_BOUNDS
    ioctl(c.h, "G_SELECTION", sel)
    assert (sel.r.width, sel.r.height) == (W, H)
    sel.target = abi.raw.SelectionTarget.CROP
    sel.r.left, sel.r.top, sel.r.width, sel.r.height = rect
    ioctl(c.h, "S_SELECTION", sel)
    assert (sel.r.left, sel.r.top, sel.r.width, sel.r.height) == rect
    sel.type = BT.VIDEO_CAPTURE
    assert err_of(ioctl, c.h, "G_SELECTION", sel) == errno.EINVAL
    c.streamon()
    aus = [au for _, au in c.encode(frames[:3])]
    sps = parse_sps(aus[0])
    assert (sps.width, sps.height) == (cw, ch)
    dec = decode(aus)
    y = np.frombuffer(frames[2][:W * H], np.uint8).reshape(H, W)[top:top + ch, left:left + cw].astype(int)
    assert np.abs(luma(dec[2]) - y).mean() < 8
    uv = np.frombuffer(frames[2][W * H:], np.uint8).reshape(H // 2, W)
    want = uv[top // 2:(top + ch) // 2, left:left + cw].astype(int)  # a chroma edge crosses the crop
    assert np.abs(dec[2].to_ndarray(format="nv12")[ch:].astype(int) - want).mean(axis=1).max() < 8  # per row
    c.close()


# ---------------------------------------------------------------- drain


def test_drain_last_epipe_eos_and_resume(node, frames):
    c = M2MClient(node, W, H, n_out=4, n_cap=4)
    sub = abi.v4l2_event_subscription()
    sub.type = abi.EventType.EOS
    ioctl(c.h, "SUBSCRIBE_EVENT", sub)
    c.streamon()
    for i in range(3):
        c.queue_out(i, frames[i], i)
    # no CAPTURE buffer yet: the drain cannot finish; a second STOP is EBUSY
    c.encoder_cmd(1)
    assert err_of(c.encoder_cmd, 1) == errno.EBUSY
    assert err_of(c.encoder_cmd, 0) == errno.EBUSY  # START during a drain
    for i in range(4):
        c.queue_cap(i)
    got = [c.dqbuf(c.cap_t) for _ in range(3)]
    assert [bool(b.flags & BF.LAST) for b, _, _ in got] == [False, False, True]
    assert all(n > 0 for _, n, _ in got)
    assert err_of(c.dqbuf, c.cap_t) == errno.EPIPE
    assert c.h.poll() & POLLPRI and c.h.poll() & POLLIN
    ev = abi.v4l2_event()
    ioctl(c.h, "DQEVENT", ev)
    assert ev.type == abi.EventType.EOS
    for _ in range(3):
        c.dqbuf(c.out_t)
    # STOP again while stopped: nothing to do
    c.encoder_cmd(1)
    # START resumes: the stream continues (no new IDR needed)
    c.encoder_cmd(0)
    c.queue_out(0, frames[3], 3)
    b, n, au = c.dqbuf(c.cap_t)
    assert n > 0 and not b.flags & BF.LAST and nal_types(au)[0] == NalType.SLICE
    c.dqbuf(c.out_t)
    # a drain with nothing queued: an empty buffer with LAST
    c.queue_cap(0)
    c.encoder_cmd(1)
    b, n, _ = c.dqbuf(c.cap_t)
    assert n == 0 and b.flags & BF.LAST
    assert err_of(c.dqbuf, c.cap_t) == errno.EPIPE
    # STREAMOFF/STREAMON(CAPTURE) resets: encoding restarts with SPS+PPS+IDR
    c.streamoff(c.cap_t)
    ioctl(c.h, "STREAMON", abi.c_int(c.cap_t))
    aus = [au for _, au in c.encode(frames[4:6])]
    assert nal_types(aus[0])[:3] == [NalType.SPS, NalType.PPS, NalType.IDR]
    c.close()


def test_try_encoder_cmd(node):
    c = M2MClient(node, W, H, n_out=1, n_cap=1)
    cmd = c.encoder_cmd(1, "TRY_ENCODER_CMD")
    assert cmd.flags == 0
    for bad in (2, 3, 7):
        assert err_of(c.encoder_cmd, bad, "TRY_ENCODER_CMD") == errno.EINVAL
        assert err_of(c.encoder_cmd, bad) == errno.EINVAL
    c.encoder_cmd(1)  # not streaming: accepted, no drain
    c.close()


# ---------------------------------------------------------------- errors


def test_bad_input(node, frames):
    c = M2MClient(node, W, H, n_out=2, n_cap=2)
    # S_FMT with buffers allocated
    f = c.fmt(c.cap_t, 0, 0, PF.H264)
    assert err_of(ioctl, c.h, "S_FMT", f) == errno.EBUSY
    f = c.fmt(c.out_t, 640, 480, PF.NV12)
    assert err_of(ioctl, c.h, "S_FMT", f) == errno.EBUSY
    # an unknown buffer type, the other API while buffers exist
    assert err_of(c.dqbuf, BT.VIDEO_CAPTURE) == errno.EINVAL  # single-planar not offered
    assert err_of(c.dqbuf, c.cap_t) == errno.EINVAL  # not streaming
    c.streamon()
    # bytesused > length: EINVAL at QBUF, the buffer stays with the client
    assert err_of(c.queue_out, 0, frames[0], 0, c.frame_size + 1) == errno.EINVAL
    # a short frame: returned with ERROR, the stream goes on
    c.queue_cap(0)
    c.queue_out(0, frames[0][:1000], 0)
    b, n, _ = c.dqbuf(c.out_t)
    assert b.flags & BF.ERROR
    c.queue_out(0, frames[1], 1)
    b, n, au = c.dqbuf(c.cap_t)
    assert n > 0 and nal_types(au)[:2] == [NalType.SPS, NalType.PPS]
    assert node.contexts()[0].bad_input == 1
    c.close()


def test_capture_buffer_too_small(node):
    # FIXQP at QP 1 on noise makes AUs bigger than the smallest accepted CAPTURE buffer
    tex = texture(W, H, 9)
    fr = [make_frame(tex, i, W, H, noise=100) for i in range(4)]
    c = M2MClient(node, W, H, n_out=2, n_cap=2, sizeimage=1,
                  controls={CID.MPEG_VIDEO_FRAME_RC_ENABLE: 0, CID.MPEG_VIDEO_H264_I_FRAME_QP: 1,
                            CID.MPEG_VIDEO_H264_P_FRAME_QP: 1})
    f = c.fmt(c.cap_t, 0, 0, PF.H264)
    ioctl(c.h, "G_FMT", f)
    c.streamoff(c.cap_t)
    r = abi.v4l2_requestbuffers()
    r.type, r.memory = c.cap_t, abi.Memory.MMAP
    ioctl(c.h, "REQBUFS", r)  # free, then a small sizeimage
    f = c.fmt(c.cap_t, 0, 0, PF.H264, 64 << 10)
    ioctl(c.h, "S_FMT", f)
    assert f.fmt.pix_mp.plane_fmt[0].sizeimage == 64 << 10
    c.cap_bufs = c.reqbufs(c.cap_t, 2)
    c.streamon()
    res = c.encode(fr[:2])
    assert res[0][0].flags & BF.ERROR and res[0][0].flags & BF.ERROR
    assert node.contexts()[0].lost >= 1
    # back to normal rate control: the stream recovers with an IDR
    c.ctrl(CID.MPEG_VIDEO_FRAME_RC_ENABLE, 1)
    c.ctrl(CID.MPEG_VIDEO_FORCE_KEY_FRAME, 0)
    res = c.encode(fr[2:4])
    assert not res[-1][0].flags & BF.ERROR
    c.close()


def test_fatal_backend_error_is_eio(node, frames, monkeypatch):
    c = M2MClient(node, W, H, n_out=2, n_cap=2)
    c.streamon()
    c.encode(frames[:1])
    ctx = node.contexts()[0]

    def boom(*a):
        raise RuntimeError("AVPU hung")

    monkeypatch.setattr(ctx.channel, "encode_into", boom)
    c.queue_cap(1)
    c.queue_out(1, frames[1], 1)
    for _ in range(500):
        if ctx.fatal:
            break
        threading.Event().wait(0.01)
    assert err_of(c.dqbuf, c.cap_t) == errno.EIO
    assert err_of(c.ctrl, CID.MPEG_VIDEO_BITRATE) == errno.EIO
    assert c.h.poll() & POLLERR
    # another session is unaffected
    d = M2MClient(node, W, H, pid=7)
    d.streamon()
    assert len(d.encode(frames[:2])) == 2
    d.close()
    c.close()


def test_poll(node, frames):
    c = M2MClient(node, W, H, n_out=2, n_cap=2)
    assert c.h.poll() & POLLERR  # nothing streaming
    c.streamon()
    c.queue_cap(0)
    c.queue_out(0, frames[0], 0)
    c.dqbuf(c.cap_t)
    mask = c.h.poll()
    assert mask & POLLOUT and not mask & POLLERR
    c.close()


def test_eos_is_pending_when_the_last_buffer_is_done(node, frames):
    """A client woken by the LAST buffer (POLLIN) must see the EOS event in the same poll:
    the event is posted before the buffer is done (v4l2-compliance 1.30 'MMAP (select)':
    !got_eos && !got_source_change, the race allegro-dvt had)."""
    c = M2MClient(node, W, H, n_out=2, n_cap=2)
    sub = abi.v4l2_event_subscription()
    sub.type = abi.EventType.EOS
    ioctl(c.h, "SUBSCRIBE_EVENT", sub)
    c.streamon()
    seen = []
    q = c.h.ctx.cap_q
    done = q.done

    def checked_done(buf, *args, **kw):
        flags = args[3] if len(args) > 3 else kw.get("flags", 0)
        if flags & BF.LAST:
            seen.append(c.h.events.has_pending())
        return done(buf, *args, **kw)

    q.done = checked_done
    c.queue_out(0, frames[0], 0)
    c.queue_cap(0)
    c.queue_cap(1)
    c.encoder_cmd(1)
    while not c.dqbuf(c.cap_t)[0].flags & BF.LAST:
        pass
    assert seen == [True]
    c.close()
