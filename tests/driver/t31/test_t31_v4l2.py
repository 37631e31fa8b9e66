"""The t31 backend under the V4L2 capture node, in-process, over the fake libimp (issue 10):
what a client does through ioctls reaches the library as the vendor takes it."""

from __future__ import annotations

import ctypes

import pytest

from support import t31_fake  # noqa: E402
from support.v4l2_helpers import buf, ctrl, dqbuf, fmt, ioctl, open_node, reqbufs, streamon  # noqa: E402

from impv4l2.v4l2 import abi  # noqa: E402
from impv4l2.v4l2.capture import CaptureNode  # noqa: E402

CAP = abi.BufType.VIDEO_CAPTURE
CID = abi.CID
PF = abi.PixelFormat

make_fake, fake = t31_fake.make_fake, t31_fake.fake  # the fixtures of the fake libimp


@pytest.fixture
def node_of(fake):
    made = []

    def make(role: int = 0, **kw):
        be = fake.backend(**kw)
        node = CaptureNode(f"video{60 + role}", be, be.channels[role])
        node.add_waker(lambda: None)
        made.append((node, be))
        return node

    yield make
    for node, be in made:
        node.close()
        be.close()


def start(h, fourcc, size, count=4):
    f = fmt(*size, fourcc=fourcc)
    ioctl(h, "S_FMT", f)
    r = reqbufs(h, count)
    for i in range(r.count):
        ioctl(h, "QBUF", buf(i))
    streamon(h)
    return f


def next_frame(node, h) -> bytes:
    b = dqbuf(h)
    data = bytes(node.memory.view(b.m.offset, b.bytesused))
    ioctl(h, "QBUF", buf(b.index))
    return data


def test_bitrate_through_s_ext_ctrls_while_streaming_reaches_the_library_in_bit_per_s(node_of, fake):
    node = node_of()
    h = open_node(node)
    ctrl(h, CID.MPEG_VIDEO_BITRATE_MODE, 1)  # CBR
    start(h, PF.H264, (320, 240))
    next_frame(node, h)
    arr = (abi.v4l2_ext_control * 1)()
    arr[0].id, arr[0].value = CID.MPEG_VIDEO_BITRATE, 3_000_000
    cs = abi.v4l2_ext_controls()
    cs.which, cs.count = abi.CtrlClass.CODEC, 1
    cs.controls = ctypes.cast(arr, ctypes.POINTER(abi.v4l2_ext_control))
    ioctl(h, "S_EXT_CTRLS", cs)
    next_frame(node, h)  # the same stream goes on
    assert fake.bitrate(0, 0) == 3_000_000  # before STREAMOFF: DestroyChn forgets the channel
    ioctl(h, "STREAMOFF", abi.c_int(CAP))
    h.release()
    assert [ln.split()[1:3] for ln in fake.lines() if ln.startswith("IMP_Encoder_SetChnBitRate")] == \
        [["0", "3000000"]]
    assert fake.errors() == 0


def test_s_fmt_gives_a_width_the_frame_source_takes(node_of, fake):
    """A 1000-wide sensor: S_FMT 1000x562 is adjusted to 992 (a multiple of 16), and streams."""
    node = node_of(sensor_width=1000, sensor_height=562, channels=None)
    h = open_node(node)
    f = start(h, PF.NV12, (1000, 562))
    assert (f.fmt.pix.width, f.fmt.pix.height) == (992, 562)
    assert len(next_frame(node, h)) == 992 * 562 * 3 // 2
    ioctl(h, "STREAMOFF", abi.c_int(CAP))
    h.release()
    assert fake.errors() == 0


def test_nv12_at_360_lines_carries_the_vendors_chroma(node_of, fake):
    """640x360 (the sub channel): the UV plane is read from w * ALIGN16(360) = w * 368."""
    node = node_of(role=1, channels=[(1920, 1080, 30), (640, 360, 30)])
    h = open_node(node)
    start(h, PF.NV12, (640, 360))
    for _ in range(2):
        data = next_frame(node, h)
        assert data[640 * 360:] == b"\x50\xb0" * (640 * 360 // 4)
    ioctl(h, "STREAMOFF", abi.c_int(CAP))
    h.release()
    assert fake.errors() == 0
