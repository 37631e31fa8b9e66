"""Fan-out on the t31 backend, in-process over the fake libimp (issue 12 item 1): several
capture nodes on one FrameSource channel, one IMP encoder channel per distinct compressed
stream, within the AVPU's limits the fake enforces as the vendor does (9 encoder
channels, 2 per group, the rmem budget)."""

from __future__ import annotations

import ctypes
import errno
import threading

import pytest

from support import t31_fake  # noqa: E402
from support.t31_fake import split_nals  # noqa: E402
from support.v4l2_helpers import buf, dqbuf, err, fmt, ioctl, open_node, reqbufs  # noqa: E402

from impv4l2.driver.base import Codec, EncoderParams  # noqa: E402
from impv4l2.driver.t31.stream import ENC_CHN_PER_GROUP, encoder_attr  # noqa: E402
from impv4l2.v4l2 import abi  # noqa: E402
from impv4l2.v4l2.capture import CaptureNode  # noqa: E402
from impv4l2.v4l2.readers import SharedReadersNode  # noqa: E402

CAP = abi.BufType.VIDEO_CAPTURE
PF = abi.PixelFormat
SIZE = (320, 180)  # a size the fake's 1080p sensor channel scales to

make_fake, fake = t31_fake.make_fake, t31_fake.fake  # the fixtures of the fake libimp


@pytest.fixture
def nodes(fake):
    """Nodes on channel 0 of one fake backend: nodes(3) -> [main, main-2, main-3]."""
    made = []
    be = fake.backend()
    idle = fake.open_resources()  # the system's own (ISP, sensor, System_Init, tuning)

    def make(count: int, shared: bool = False):
        for k in range(len(made), count):
            role = "main" if k == 0 else f"main-{k + 1}"
            cls = SharedReadersNode if shared and k else CaptureNode
            node = cls(f"video{70 + k}", be, be.channels[0], role=role)
            node.add_waker(lambda: None)
            made.append(node)
        return made

    make.idle = idle  # type: ignore[attr-defined]
    yield make
    for node in made:
        node.close()
    be.close()


def prepare(h, fourcc, count=4):
    ioctl(h, "S_FMT", fmt(*SIZE, fourcc=fourcc))
    r = reqbufs(h, count)
    for i in range(r.count):
        ioctl(h, "QBUF", buf(i))


def frames(node, h, n: int) -> list[tuple[bytes, int, int]]:
    """n frames: (data, flags, sequence)."""
    out = []
    for _ in range(n):
        b = dqbuf(h)
        out.append((bytes(node.memory.view(b.m.offset, b.bytesused)), b.flags, b.sequence))
        ioctl(h, "QBUF", buf(b.index))
    return out


def created(fake) -> list[str]:
    return [ln for ln in fake.lines() if ln.startswith("IMP_Encoder_CreateChn")]


def test_two_h264_nodes_one_imp_encoder_channel(nodes, fake):
    main, main2 = nodes(2)
    a, b = open_node(main), open_node(main2, pid=2)
    for h in (a, b):
        prepare(h, PF.H264)
    ioctl(a, "STREAMON", abi.c_int(CAP))
    first = frames(main, a, 3)
    ioctl(b, "STREAMON", abi.c_int(CAP))
    joined = frames(main2, b, 3)
    assert len(created(fake)) == 1, created(fake)  # one IMP channel for both clients
    assert main.hub.encoders == {Codec.H264: 2}
    # the joiner starts at an IDR with SPS and PPS before it (asked for with RequestIDR)
    assert [n[0] & 0x1F for n in split_nals(joined[0][0])] == [7, 8, 5]
    assert joined[0][1] & abi.BufFlag.KEYFRAME and joined[0][2] == 0
    assert "IMP_Encoder_RequestIDR" in fake.calls()
    assert first[0][1] & abi.BufFlag.KEYFRAME
    for h in (a, b):
        h.release()
    assert main.hub.encoders == {}
    assert fake.open_resources() == nodes.idle and fake.errors() == 0


def test_raw_and_two_codecs_within_the_group_limit(nodes, fake):
    """NV12 + H.264 + JPEG on one frame source: two encoder channels in its group; a third
    distinct stream (H.265) is refused with EBUSY before libimp sees it."""
    n = nodes(4)
    hs = [open_node(x, pid=10 + i) for i, x in enumerate(n)]
    for h, fourcc in zip(hs, (PF.NV12, PF.H264, PF.MJPEG, PF.HEVC)):
        prepare(h, fourcc)
    for h in hs[:3]:
        ioctl(h, "STREAMON", abi.c_int(CAP))
    assert err(hs[3], "STREAMON", abi.c_int(CAP)) == errno.EBUSY  # the group has its 2 channels
    assert ENC_CHN_PER_GROUP == 2
    raw = frames(n[0], hs[0], 2)
    assert [(len(d), f & abi.BufFlag.ERROR) for d, f, _s in raw] == [(SIZE[0] * SIZE[1] * 3 // 2, 0)] * 2
    assert frames(n[1], hs[1], 2)[0][1] & abi.BufFlag.KEYFRAME
    assert frames(n[2], hs[2], 2)[0][0][:2] == b"\xff\xd8"
    chans = sorted(int(ln.split()[1]) for ln in created(fake))
    assert chans == [0, 4]  # the SDK samples' numbering: H.264 = channel, JPEG = 4 + channel
    ioctl(hs[2], "STREAMOFF", abi.c_int(CAP))  # the JPEG channel goes: H.265 fits now
    ioctl(hs[3], "STREAMON", abi.c_int(CAP))
    assert frames(n[3], hs[3], 1)[0][1] & abi.BufFlag.KEYFRAME
    assert int(created(fake)[-1].split()[1]) == 1  # channel 0 is H.264's: the next free number
    for h in hs:
        h.release()
    assert fake.open_resources() == nodes.idle and fake.errors() == 0


def test_shared_readers_each_get_the_stream(nodes, fake):
    main, shared = nodes(2, shared=True)
    readers = [open_node(shared, pid=20 + i) for i in range(3)]
    for h in readers:
        prepare(h, PF.H264, count=3)
        ioctl(h, "STREAMON", abi.c_int(CAP))  # no EBUSY: each file has its own queue
    got = [frames(shared, h, 2) for h in readers]
    assert len(created(fake)) == 1 and main.hub.encoders == {Codec.H264: 3}
    for f in got:
        assert [n[0] & 0x1F for n in split_nals(f[0][0])][:3] == [7, 8, 5]
    # a vb2 node keeps the kernel's rule: a second file taking its queue gets EBUSY
    a, b = open_node(main, pid=30), open_node(main, pid=31)
    prepare(a, PF.H264)
    assert err(b, "REQBUFS", reqbufs_struct(2)) == errno.EBUSY
    for h in (*readers, a, b):
        h.release()
    assert fake.open_resources() == nodes.idle and fake.errors() == 0


def reqbufs_struct(count: int) -> abi.v4l2_requestbuffers:
    r = abi.v4l2_requestbuffers()
    r.count, r.type, r.memory = count, CAP, abi.Memory.MMAP
    return r


def test_the_fake_refuses_a_third_channel_in_a_group(fake):
    """The vendor's rule itself, below the backend: RegisterChn of a third encoder channel to
    one group fails (the backend never asks, see above)."""
    be = fake.backend()
    ch = be.channels[0]
    ch.start_encoded(EncoderParams(width=320, height=240, fps_num=60), t31_fake.Sink(1 << 16))
    ch.start_encoded(EncoderParams(codec=Codec.JPEG, width=320, height=240, fps_num=60), t31_fake.Sink(1 << 16))
    attr = encoder_attr(be.lib, EncoderParams(codec=Codec.HEVC, width=320, height=240, fps_num=60))
    assert be.lib.IMP_Encoder_CreateChn(2, ctypes.byref(attr)) == 0
    assert be.lib.IMP_Encoder_RegisterChn(0, 2) < 0
    assert fake.errors() == 1 and "group has its 2 encoder channels" in "\n".join(fake.lines())
    assert be.lib.IMP_Encoder_DestroyChn(2) == 0
    ch.stop()


def test_a_stream_beyond_the_rmem_budget_is_ebusy_and_the_others_go_on(nodes, fake, monkeypatch):
    main, main2 = nodes(2)
    a, b = open_node(main), open_node(main2, pid=2)
    prepare(a, PF.H264)
    prepare(b, PF.HEVC)
    ioctl(a, "STREAMON", abi.c_int(CAP))
    frames(main, a, 1)
    monkeypatch.setenv("IMPFAKE_RMEM", str(fake.rmem_used() + 4096))  # no room for a second channel
    assert err(b, "STREAMON", abi.c_int(CAP)) == errno.EBUSY
    assert "RMEM IMP_Encoder_CreateChn" in "\n".join(fake.lines())
    assert len(frames(main, a, 3)) == 3  # the running stream is untouched
    monkeypatch.delenv("IMPFAKE_RMEM")
    ioctl(b, "STREAMON", abi.c_int(CAP))
    assert frames(main2, b, 1)[0][1] & abi.BufFlag.KEYFRAME
    for h in (a, b):
        h.release()
    assert fake.open_resources() == nodes.idle and fake.errors() == 1  # the one refused CreateChn


def test_nv12_and_h264_nodes_at_once_see_every_frame_but_their_own_drops(nodes, fake):
    """Both clients of one frame source see every frame it produced, but for the frames the
    daemon dropped for that client (no buffer queued): sequence gaps <= its sink's drops."""
    main, main2 = nodes(2)
    a, b = open_node(main), open_node(main2, pid=2)
    prepare(a, PF.NV12, count=6)
    prepare(b, PF.H264, count=6)
    ioctl(a, "STREAMON", abi.c_int(CAP))
    ioctl(b, "STREAMON", abi.c_int(CAP))
    got = {}

    def run(node, h, key):
        got[key] = frames(node, h, 40)

    ts = [threading.Thread(target=run, args=(main, a, "nv12")), threading.Thread(target=run, args=(main2, b, "h264"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    for key, node in (("nv12", main), ("h264", main2)):
        seqs = [s for _d, _f, s in got[key]]
        assert all(y > x for x, y in zip(seqs, seqs[1:])), (key, seqs)
        gaps = seqs[-1] - seqs[0] + 1 - len(seqs)
        # H.264: after a drop the stream resumes at the IDR asked for then (the fake's next AU),
        # so a drop costs that frame and at most the one the AVPU had already coded
        allowed = node.sink.dropped * (2 if key == "h264" else 1)
        assert gaps <= allowed, (key, seqs, node.sink.dropped)
        assert not any(f & abi.BufFlag.ERROR for _d, f, _s in got[key])
    assert [n[0] & 0x1F for n in split_nals(got["h264"][0][0])] == [7, 8, 5]
    for h in (a, b):
        h.release()
    assert fake.open_resources() == nodes.idle and fake.errors() == 0
