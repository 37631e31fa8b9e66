"""Fan-out in-process (issue 12 item 1, issue 13 item 4): the driver's ChannelHub/Fanout with
recording sinks, and several capture nodes on one sim channel through the V4L2 core."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from impv4l2.driver.base import Codec, EncodedFrame, EncoderChannel, EncoderParams, FrameBuffer, FrameInfo
from impv4l2.driver.fanout import Fanout, _Member, hub_of
from impv4l2.driver.sim.pattern import read_counter, y_plane
from impv4l2.v4l2 import abi
from impv4l2.v4l2.capture import CaptureNode
from impv4l2.v4l2.readers import SharedReadersNode

from support.v4l2_helpers import buf, dqbuf, err, fmt, ioctl, open_node, reqbufs, streamon

CAP = abi.BufType.VIDEO_CAPTURE
PF = abi.PixelFormat


# ---------------------------------------------------------------- the driver's fan-out

class Member:
    """A MemberSink with ``free`` buffers; records what it gets."""

    def __init__(self, free: int = 100, size: int = 64):
        self.free, self.size = free, size
        self.got: list[tuple[bytes, FrameInfo]] = []
        self.cancelled = 0

    def get_buffer(self):
        if not self.free:
            return None
        self.free -= 1
        return FrameBuffer(memoryview(bytearray(self.size)), 0)

    def frame_done(self, b, info):
        self.got.append((bytes(b.view[:info.bytesused]), info))
        self.free += 1

    def cancel(self, b):
        self.cancelled += 1
        self.free += 1


class Encoder(EncoderChannel):
    def __init__(self):
        self.params = EncoderParams()
        self.idr_requests = 0

    def encode(self, nv12, timestamp_ns) -> EncodedFrame:
        raise NotImplementedError

    def request_idr(self):
        self.idr_requests += 1

    def update(self, **changes):
        pass

    def close(self):
        pass


def produce(fan: Fanout, seq: int, payload: bytes, key: bool = False) -> None:
    """What a backend does for one frame."""
    b = fan.get_buffer()
    if b is None:
        return
    b.view[:len(payload)] = payload
    fan.frame_done(b, FrameInfo(seq * 1000, seq, bytesused=len(payload), keyframe=key))


def test_fanout_copies_the_frame_to_every_member_once():
    fan = Fanout("t")
    members = [Member() for _ in range(3)]
    for m in members:
        fan.add(member_of(m))
    for seq in range(5):
        produce(fan, seq, bytes([seq]) * 10)
    for m in members:
        assert [(d, i.sequence) for d, i in m.got] == [(bytes([k]) * 10, k) for k in range(5)]
    assert (fan.frames, fan.copies) == (5, 10)  # the producer wrote once, 2 copies per frame


def member_of(sink, **kw):
    return _Member(object(), sink, **kw)


def test_inter_stream_member_without_a_buffer_waits_for_the_next_idr():
    fan = Fanout("t", inter=True)
    fan.encoder = enc = Encoder()
    a, b = Member(), Member(free=0)
    fan.add(member_of(a))
    fan.add(member_of(b))
    produce(fan, 0, b"I", key=True)  # b has no buffer: it misses an AU
    assert enc.idr_requests == 1
    b.free = 5
    produce(fan, 1, b"P")  # b must not get a P-frame that references the AU it missed
    produce(fan, 2, b"I", key=True)
    produce(fan, 3, b"P")
    assert [i.sequence for _d, i in a.got] == [0, 1, 2, 3]
    assert [i.sequence for _d, i in b.got] == [2, 3] and b.cancelled == 1
    # asked when it missed frame 0 (itself the IDR), again once its buffers were back (frame
    # 1), then no more: not once per frame
    assert enc.idr_requests == 2


def test_joining_member_counts_from_zero_at_its_first_key_frame():
    fan = Fanout("t", inter=True)
    fan.encoder = Encoder()
    a, late = Member(), Member()
    fan.add(member_of(a))
    produce(fan, 0, b"I", key=True)
    produce(fan, 1, b"P")
    fan.add(member_of(late, base=None, waiting_key=True))
    produce(fan, 2, b"P")
    produce(fan, 3, b"I", key=True)
    produce(fan, 4, b"P")
    assert [(d, i.sequence) for d, i in late.got] == [(b"I", 0), (b"P", 1)]
    assert [i.sequence for _d, i in a.got] == [0, 1, 2, 3, 4]


def test_a_member_with_a_short_buffer_gets_an_error_not_a_truncated_frame():
    fan = Fanout("t")
    big, small = Member(size=64), Member(size=4)
    fan.add(member_of(big))
    fan.add(member_of(small))
    produce(fan, 0, b"x" * 10)
    assert big.got[0][0] == b"x" * 10 and not big.got[0][1].error
    assert small.got[0][1].error and small.got[0][1].bytesused == 0


def test_hub_starts_the_backend_once_and_stops_after_the_last(backend):
    ch = backend.channels[1]
    hub = hub_of(ch)
    assert hub_of(ch) is hub and hub_of(hub.port()) is hub
    ports = [hub.port() for _ in range(3)]
    sinks = [Member(size=ch.frame_bytes) for _ in ports]
    for p, s in zip(ports, sinks):
        p.start(s)
    with pytest.raises(RuntimeError):
        ports[0].start(sinks[0])  # one raw consumer per port
    time.sleep(0.5)
    renders, due = ch.renders, ch.frames_due
    ports[0].stop()
    assert ch.streaming  # the others still take frames
    for p in ports[1:]:
        p.stop()
    assert not ch.streaming and not hub.busy
    counts = [len(s.got) for s in sinks]
    assert min(counts) >= 5
    assert renders <= due and max(counts) <= renders + 1  # one render per frame, for 3 consumers
    for s in sinks:  # each consumer's frames carry its own sequence, from 0
        seqs = [i.sequence for _d, i in s.got]
        assert seqs[0] == 0 or s is not sinks[0]
        assert all(b > a for a, b in zip(seqs, seqs[1:]))
        for data, info in s.got[:3]:
            assert read_counter(y_plane(data, 640, 360)) - info.sequence == \
                read_counter(y_plane(s.got[0][0], 640, 360)) - s.got[0][1].sequence


# ---------------------------------------------------------------- nodes on one channel

@pytest.fixture
def sub_nodes(backend):
    """Three vb2 nodes and one shared-readers node on the sub channel."""
    ch = backend.channels[1]
    nodes = [CaptureNode("video20", backend, ch), CaptureNode("video21", backend, ch, role="sub-2"),
             CaptureNode("video22", backend, ch, role="sub-3"),
             SharedReadersNode("video23", backend, ch, role="sub-4")]
    for n in nodes:
        n.add_waker(lambda: None)
    yield nodes
    for n in nodes:
        n.close()


def start(h, fourcc=PF.NV12, size=(640, 360), count=4):
    ioctl(h, "S_FMT", fmt(*size, fourcc=fourcc))
    r = reqbufs(h, count)
    for i in range(r.count):
        ioctl(h, "QBUF", buf(i))
    streamon(h)


def take(node, h, n):
    out = []
    for _ in range(n):
        b = dqbuf(h)
        out.append((bytes(node.memory.view(b.m.offset, b.bytesused)), b))
        ioctl(h, "QBUF", buf(b.index))
    return out


def test_roles_name_the_nodes(sub_nodes):
    for n, role in zip(sub_nodes, ("sub", "sub-2", "sub-3", "sub-4")):
        h = open_node(n)
        c = abi.v4l2_capability()
        ioctl(h, "QUERYCAP", c)
        assert (c.card, c.bus_info) == (f"impv4l2 {role} (sim)".encode(), f"platform:impv4l2-{role}".encode())
        h.release()


def test_each_node_streams_its_own_format_from_one_render(sub_nodes, backend):
    """NV12, YUYV and MJPEG on three nodes of one channel: one render per sensor frame."""
    ch = backend.channels[1]
    hs = [open_node(n, pid=100 + i) for i, n in enumerate(sub_nodes[:3])]
    start(hs[0], PF.NV12)
    start(hs[1], PF.YUYV)
    start(hs[2], PF.MJPEG)
    r0, f0 = ch.renders, ch.frames_due
    got = [take(n, h, 6) for n, h in zip(sub_nodes, hs)]
    nv12 = [read_counter(y_plane(d, 640, 360)) for d, _b in got[0]]
    yuyv = [read_counter(y_plane(d[0::2], 640, 360)) for d, _b in got[1]]
    assert all(b > a for a, b in zip(nv12, nv12[1:])) and all(b > a for a, b in zip(yuyv, yuyv[1:]))
    assert set(nv12) & set(yuyv)  # the same sensor frames
    assert all(d[:2] == b"\xff\xd8" for d, _b in got[2])
    assert sub_nodes[0].hub.encoders == {Codec.JPEG: 1} and sub_nodes[0].hub.consumers() == 3
    r1, f1 = ch.renders, ch.frames_due
    assert 6 <= r1 - r0 <= f1 - f0  # at most one render per channel frame, for 3 consumers
    for h in hs:
        h.release()
    assert not sub_nodes[0].hub.busy


def test_a_second_file_gets_ebusy_on_a_vb2_node_not_on_a_shared_one(sub_nodes):
    vb2, shared = sub_nodes[0], sub_nodes[3]
    a, b = open_node(vb2, pid=1), open_node(vb2, pid=2)
    reqbufs(a, 2)
    assert err(b, "REQBUFS", reqbufs_struct(2)) == errno.EBUSY
    with pytest.raises(OSError) as ex:
        b.read(100, 0)
    assert ex.value.errno == errno.EBUSY
    r1, r2 = open_node(shared, pid=3), open_node(shared, pid=4)
    start(r1)
    start(r2)  # its own queue
    d1, d2 = take(shared, r1, 3), take(shared, r2, 3)
    assert [b.sequence for _d, b in d2][0] == 0  # counts from its own first frame
    assert {b.m.offset for _d, b in d1}.isdisjoint({b.m.offset for _d, b in d2})  # own buffers
    assert err(r1, "S_FMT", fmt(320, 180)) == errno.EBUSY  # one format for all its readers
    for h in (a, b, r1, r2):
        h.release()


def reqbufs_struct(count):
    r = abi.v4l2_requestbuffers()
    r.count, r.type, r.memory = count, CAP, abi.Memory.MMAP
    return r


def test_another_size_while_the_channel_runs_is_ebusy(sub_nodes):
    a, b = open_node(sub_nodes[0], pid=1), open_node(sub_nodes[1], pid=2)
    start(a, size=(640, 360))
    ioctl(b, "S_FMT", fmt(320, 180, fourcc=PF.H264))  # allowed: its own format
    reqbufs(b, 2)
    assert err(b, "STREAMON", abi.c_int(CAP)) == errno.EBUSY  # the channel runs at 640x360
    ioctl(a, "STREAMOFF", abi.c_int(CAP))
    streamon(b)  # the channel is free: its size now
    for h in (a, b):
        h.release()


def test_record_priority_on_one_node_locks_format_changes_on_the_channel(sub_nodes):
    a, b = open_node(sub_nodes[0], pid=1), open_node(sub_nodes[1], pid=2)
    ioctl(a, "S_PRIORITY", abi.c_uint(abi.Priority.RECORD))
    p = abi.c_uint()
    ioctl(b, "G_PRIORITY", p)
    assert p.value == abi.Priority.RECORD
    assert err(b, "S_FMT", fmt(320, 180)) == errno.EBUSY
    assert err(b, "REQBUFS", reqbufs_struct(2)) == errno.EBUSY
    ioctl(b, "G_FMT", fmt())  # reading stays allowed
    a.release()
    ioctl(b, "S_FMT", fmt(320, 180))
    b.release()


def test_encoder_controls_of_a_node_reach_the_shared_channel(sub_nodes, backend):
    """Controls stay per node; a change on either node reaches the one encoder channel."""
    a, b = open_node(sub_nodes[0], pid=1), open_node(sub_nodes[1], pid=2)
    start(a, PF.H264)
    start(b, PF.H264)
    take(sub_nodes[1], b, 2)
    enc = sub_nodes[0].enc_channel
    c = abi.v4l2_control()
    c.id, c.value = abi.CID.MPEG_VIDEO_BITRATE, 1_234_000
    ioctl(b, "S_CTRL", c)
    take(sub_nodes[0], a, 6)  # applied from the next frame (4 were done before)
    assert enc.params.bitrate == 1_234_000
    g = abi.v4l2_control()
    g.id = abi.CID.MPEG_VIDEO_BITRATE
    ioctl(a, "G_CTRL", g)
    assert g.value != 1_234_000  # node a's own control value is unchanged
    for h in (a, b):
        h.release()


def test_streams_stop_cleanly_under_churn(sub_nodes):
    """Clients coming and going on a shared channel never stop another's frames."""
    keeper = open_node(sub_nodes[0], pid=1)
    start(keeper, PF.H264)
    stop = threading.Event()

    def churn():
        k = 0
        while not stop.is_set():
            h = open_node(sub_nodes[1 + k % 2], pid=50 + k)
            start(h, (PF.H264, PF.NV12)[k % 2], count=2)
            take(sub_nodes[1 + k % 2], h, 1)
            h.release()
            k += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        got = take(sub_nodes[0], keeper, 30)
    finally:
        stop.set()
        t.join(30)
    seqs = [b.sequence for _d, b in got]
    assert all(b > a for a, b in zip(seqs, seqs[1:]))
    assert not any(b.flags & abi.BufFlag.ERROR for _d, b in got)
    keeper.release()
    assert not sub_nodes[0].hub.busy


def test_a_waiting_member_that_missed_its_idr_gets_the_next_one_at_once():
    """A slow client misses an AU, then also the IDR asked for it (still no buffer): when its
    buffers come back an IDR is asked again, not left to the end of the GOP."""
    fan = Fanout("t", inter=True)
    fan.encoder = enc = Encoder()
    fast, slow = Member(), Member(free=0)
    fan.add(member_of(fast))
    fan.add(member_of(slow))
    produce(fan, 0, b"P")  # slow misses it: waits, IDR asked
    produce(fan, 1, b"I", key=True)  # slow still has no buffer: misses the IDR too
    assert enc.idr_requests == 1
    slow.free = 4
    produce(fan, 2, b"P")  # slow has a buffer again, still waiting: an IDR is asked
    assert enc.idr_requests == 2 and slow.cancelled == 1
    produce(fan, 3, b"I", key=True)
    assert [(d, i.sequence) for d, i in slow.got] == [(b"I", 3)]


def _have_x265() -> bool:
    try:
        from impv4l2.driver.sim.avpu import HAVE_X265
    except ImportError:
        return False
    return HAVE_X265


@pytest.mark.skipif(not _have_x265(), reason="PyAV without libx265: no HEVC on the sim")
def test_joining_hevc_starts_with_vps_sps_pps_and_an_idr(sub_nodes):
    a, b = open_node(sub_nodes[0], pid=1), open_node(sub_nodes[1], pid=2)
    start(a, PF.HEVC)
    take(sub_nodes[0], a, 5)  # mid-GOP now
    start(b, PF.HEVC)
    first = take(sub_nodes[1], b, 1)[0]
    types = [(p[0] >> 1) & 0x3F for p in first[0].split(b"\x00\x00\x00\x01")[1:] if p]
    assert types[:3] == [32, 33, 34] and types[3] in (19, 20), types  # VPS SPS PPS IDR
    assert first[1].flags & abi.BufFlag.KEYFRAME and first[1].sequence == 0
    assert sub_nodes[0].hub.encoders == {Codec.HEVC: 2}
    for h in (a, b):
        h.release()
