"""Buffer memory budget (issue 14 item 4): REQBUFS/CREATE_BUFS grant what fits the node's and
the daemon's budget and say so in the log; ENOMEM (with the numbers) only when not even the
queue's minimum fits.  Capture nodes and every M2M context charge it alike."""

from __future__ import annotations

import errno
import logging

import pytest

from impv4l2.memfd import page_align
from impv4l2.v4l2 import abi
from impv4l2.v4l2.budget import MiB, BufferBudget
from impv4l2.v4l2.capture import CaptureNode
from impv4l2.v4l2.encoder import EncoderNode

from support.v4l2_helpers import err, ioctl, open_node, reqbufs

NV12_1080P = page_align(1920 * 1080 * 3 // 2)  # 3,112,960 bytes
BT = abi.BufType


def test_budget_grants_what_fits_and_refuses_below_the_minimum():
    b = BufferBudget(per_node=10 * MiB, total=12 * MiB)
    q1, q2, q3 = object(), object(), object()
    assert b.take("a", q1, 3 * MiB, 32, 1) == 3  # per node: 10 // 3
    assert b.take("a", q2, 1 * MiB, 32, 1) == 1  # the node's last megabyte
    assert b.take("b", q3, 1 * MiB, 32, 1) == 2  # the total's last two
    with pytest.raises(OSError) as e:
        b.take("b", q3, 1 * MiB, 1, 1)
    assert e.value.errno == errno.ENOMEM
    assert "12 MiB in all" in e.value.strerror and "node b holds 2097152 bytes" in e.value.strerror
    b.release("a", q1)
    assert b.held() == 3 * MiB and b.held("b") == 2 * MiB
    assert b.take("b", q3, 1 * MiB, 32, 1) == 8  # node b: 10 - 2; the total would allow 9
    assert BufferBudget().take("x", q1, 1 << 40, 5, 1) == 5  # no limit


@pytest.fixture
def main(backend):
    node = CaptureNode("video30", backend, backend.channels[0], budget=BufferBudget(per_node=16 * MiB))
    node.add_waker(lambda: None)
    yield node
    node.close()


def test_reqbufs_256_at_1080p_gets_what_fits(main, caplog):
    h = open_node(main)
    with caplog.at_level(logging.INFO, "impv4l2"):
        r = reqbufs(h, 256)  # what ffmpeg asks
    fits = 16 * MiB // NV12_1080P
    assert r.count == fits == 5
    assert f"5 of 32 buffers of {NV12_1080P} bytes granted (buffer budget: 16 MiB per node)" in caplog.text
    # the buffers are usable: QUERYBUF answers for every granted index, not past it
    b = abi.v4l2_buffer()
    b.type, b.memory, b.index = BT.VIDEO_CAPTURE, abi.Memory.MMAP, fits - 1
    ioctl(h, "QUERYBUF", b)
    b.index = fits
    assert err(h, "QUERYBUF", b) == errno.EINVAL
    # CREATE_BUFS past the budget: nothing fits -> ENOMEM
    c = abi.v4l2_create_buffers()
    c.count, c.memory = 1, abi.Memory.MMAP
    c.format.type = BT.VIDEO_CAPTURE
    ioctl(h, "G_FMT", c.format)
    assert err(h, "CREATE_BUFS", c) == errno.ENOMEM
    # REQBUFS(0) gives it all back: a second client can allocate
    reqbufs(h, 0)
    h.release()
    h2 = open_node(main, pid=2)
    assert reqbufs(h2, 3).count == 3
    h2.release()
    assert main.budget.held() == 0  # closing the file released the queue's share


def test_budget_below_one_buffer_is_enomem_with_the_numbers(backend, caplog):
    node = CaptureNode("video31", backend, backend.channels[0], budget=BufferBudget(per_node=2 * MiB))
    node.add_waker(lambda: None)
    h = open_node(node)
    try:
        r = abi.v4l2_requestbuffers()
        r.count, r.type, r.memory = 4, BT.VIDEO_CAPTURE, abi.Memory.MMAP
        with caplog.at_level(logging.WARNING, "impv4l2"):
            assert err(h, "REQBUFS", r) == errno.ENOMEM
        assert f"1 buffer(s) of {NV12_1080P} bytes do not fit the buffer budget (2 MiB per node" in caplog.text
        # read() allocates through the same queue: it fails too, it does not hang
        with pytest.raises(OSError) as e:
            h.read(NV12_1080P, 0)
        assert e.value.errno == errno.ENOMEM
    finally:
        h.release()
        node.close()


def test_nodes_share_the_daemon_total(backend):
    budget = BufferBudget(per_node=16 * MiB, total=20 * MiB)
    nodes = [CaptureNode(f"video3{i}", backend, backend.channels[0], budget=budget) for i in (2, 3)]
    hs = []
    try:
        for n in nodes:
            n.add_waker(lambda: None)
            hs.append(open_node(n))
        assert reqbufs(hs[0], 32).count == 5  # the node limit
        assert reqbufs(hs[1], 32).count == (20 * MiB - 5 * NV12_1080P) // NV12_1080P == 1  # the total's rest
    finally:
        for h in hs:
            h.release()
        for n in nodes:
            n.close()


def test_m2m_contexts_charge_the_encoder_node(backend):
    """Each open of the M2M node is a context with its own queues, all in the node's budget."""
    node = EncoderNode("video34", backend, apis=("splane",), budget=BufferBudget(per_node=4 * MiB))
    node.add_waker(lambda: None)
    a, b = open_node(node), open_node(node, pid=2)
    each = page_align(1280 * 720 * 3 // 2)
    try:
        for h in (a, b):
            f = abi.v4l2_format()
            f.type = BT.VIDEO_OUTPUT
            ioctl(h, "G_FMT", f)
            f.fmt.pix.width, f.fmt.pix.height = 1280, 720
            ioctl(h, "S_FMT", f)
        assert reqbufs(a, 32, type_=BT.VIDEO_OUTPUT).count == 4 * MiB // each == 3
        r = abi.v4l2_requestbuffers()
        r.count, r.type, r.memory = 2, BT.VIDEO_OUTPUT, abi.Memory.MMAP
        assert err(b, "REQBUFS", r) == errno.ENOMEM  # 40 KiB left: not one frame
        reqbufs(a, 0, type_=BT.VIDEO_OUTPUT)
        assert reqbufs(b, 2, type_=BT.VIDEO_OUTPUT).count == 2
    finally:
        a.release()
        b.release()
        node.close()
    assert node.budget.held() == 0
