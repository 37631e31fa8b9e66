"""Motion detection (Detect class controls, V4L2_EVENT_MOTION_DET) on the sim backend.

The client side runs raw ioctls on a real FUSE mount of the capture nodes (the kernel
carries them, pointers of the array controls included); the frame-sequence test drives
a node in-process, where it can stream and dequeue buffers.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import time

import numpy as np
import pytest

from impv4l2.driver import load_backend
from impv4l2.driver.base import MOTION_ACTIVITY_MAX
from impv4l2.v4l2 import abi
from impv4l2.v4l2.capture import CaptureNode
from impv4l2.v4l2.detect import MD_DISABLED, MD_GLOBAL, MD_REGION_GRID, MD_THRESHOLD_GRID

from support.v4l2_helpers import dqbuf, ioctl as hioctl, open_node, reqbufs, buf, streamon
from support.mounted import capture_nodes, served_on_mount

CID = abi.CID
ROWS, COLS = 9, 16  # the sim's grid (impv4l2.driver.sim.motion.GRID)
FPS = 30
BOX_ROWS = range(4, 7)  # grid rows the sliding box crosses (y = 0.55 h, h/6 high)

fuse_only = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                               reason="needs root and /dev/fuse")


@pytest.fixture(scope="module")
def backend():
    b = load_backend("sim", fps=FPS, moving=False)
    yield b
    b.close()


@pytest.fixture(scope="module")
def served(backend):
    nodes = capture_nodes(backend, base=30)
    with served_on_mount(nodes, "impv4l2-motion-test-") as paths:
        yield nodes, paths


class Client:
    """A V4L2 client of one node file: raw ioctls through the kernel."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def close(self) -> None:
        os.close(self.fd)

    def ioctl(self, name: str, s):
        fcntl.ioctl(self.fd, abi.VIDIOC[name], s)
        return s

    def err(self, name: str, s) -> int:
        try:
            self.ioctl(name, s)
        except OSError as e:
            return e.errno
        return 0

    def ext(self, kind: str, *items):
        """G/S/TRY_EXT_CTRLS of (cid, value) items; value: int, or a numpy array for
        array controls (G: the array is filled).  Returns (errno, controls struct)."""
        arr = (abi.v4l2_ext_control * len(items))()
        keep = []
        for e, (cid, value) in zip(arr, items):
            e.id = cid
            if isinstance(value, np.ndarray):
                keep.append(value)
                e.size = value.nbytes
                e.ptr = value.ctypes.data_as(ctypes.c_void_p)
            else:
                e.value = value
        cs = abi.v4l2_ext_controls()
        cs.count = len(items)
        cs.controls = ctypes.cast(arr, ctypes.POINTER(abi.v4l2_ext_control))
        return self.err(f"{kind}_EXT_CTRLS", cs), cs, arr

    def subscribe(self, type_: int, id_: int = 0) -> None:
        sub = abi.v4l2_event_subscription()
        sub.type, sub.id = type_, id_
        self.ioctl("SUBSCRIBE_EVENT", sub)

    def events(self, seconds: float) -> list[tuple[float, int, int, int]]:
        """(posted at, flags, frame_sequence, region_mask) of the motion events within ``seconds``."""
        out = []
        p = select.poll()
        p.register(self.fd, select.POLLPRI)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if not p.poll(left * 1000):
                continue
            while True:
                ev = abi.v4l2_event()
                if self.err("DQEVENT", ev):
                    break
                assert ev.type == abi.EventType.MOTION_DET
                m = ev.u.motion_det
                out.append((ev.timestamp.secs + ev.timestamp.nsecs / 1e9, m.flags,
                            m.frame_sequence, m.region_mask))
        return out

    def drain(self) -> None:
        self.events(0.05)


def grid(value, dtype=np.uint16) -> np.ndarray:
    return np.full((ROWS, COLS), value, dtype)


@pytest.fixture
def client(served, backend):
    c = Client(served[1][1])
    yield c
    c.ext("S", (CID.DETECT_MD_MODE, MD_DISABLED), (CID.DETECT_MD_GLOBAL_THRESHOLD, 50),
          (CID.DETECT_MD_THRESHOLD_GRID, grid(50)), (CID.DETECT_MD_REGION_GRID, grid(0, np.uint8)))
    backend.set_scene(moving=False)
    c.close()


@fuse_only
def test_query_ext_ctrl_reports_array_dims(client):
    for cid, name, type_, size, hi, default in (
            (CID.DETECT_MD_THRESHOLD_GRID, b"MD Threshold Grid", abi.CtrlType.U16, 2, MOTION_ACTIVITY_MAX, 50),
            (CID.DETECT_MD_REGION_GRID, b"MD Region Grid", abi.CtrlType.U8, 1, 3, 0)):
        q = abi.v4l2_query_ext_ctrl()
        q.id = cid
        client.ioctl("QUERY_EXT_CTRL", q)
        assert (q.name, q.type, q.elem_size, q.elems) == (name, type_, size, ROWS * COLS)
        assert (q.nr_of_dims, list(q.dims)) == (2, [ROWS, COLS, 0, 0])
        assert (q.minimum, q.maximum, q.step, q.default_value) == (0, hi, 1, default)
        assert q.flags & abi.CtrlFlag.HAS_PAYLOAD
        # arrays are not reachable through the old single-control ioctls
        assert client.err("G_CTRL", abi.v4l2_control(cid, 0)) == errno.EINVAL
        assert client.err("S_CTRL", abi.v4l2_control(cid, 0)) == errno.EINVAL
    q = abi.v4l2_query_ext_ctrl()
    q.id = CID.DETECT_MD_MODE
    client.ioctl("QUERY_EXT_CTRL", q)
    assert (q.type, q.maximum, q.elems, q.nr_of_dims) == (abi.CtrlType.MENU, 3, 1, 0)
    names = []
    for i in range(4):
        m = abi.v4l2_querymenu()
        m.id, m.index = CID.DETECT_MD_MODE, i
        client.ioctl("QUERYMENU", m)
        names.append(m.name)
    assert names == [b"Disabled", b"Global", b"Threshold Grid", b"Region Grid"]
    q.id = CID.DETECT_CLASS
    client.ioctl("QUERY_EXT_CTRL", q)
    assert (q.name, q.type) == (b"Detection Controls", abi.CtrlType.CTRL_CLASS)


@fuse_only
def test_array_payload_get_set_and_bad_values(client):
    # A short buffer: ENOSPC with the size needed.
    e, cs, arr = client.ext("G", (CID.DETECT_MD_THRESHOLD_GRID, np.zeros(3, np.uint16)))
    assert e == errno.ENOSPC and arr[0].size == ROWS * COLS * 2
    got = grid(0)
    e, cs, arr = client.ext("G", (CID.DETECT_MD_THRESHOLD_GRID, got))
    assert e == 0 and (got == 50).all() and arr[0].size == ROWS * COLS * 2
    # Set a pattern; it reads back; defaults stay defaults.
    want = np.arange(ROWS * COLS, dtype=np.uint16).reshape(ROWS, COLS)
    regions = (np.arange(ROWS * COLS) % 4).astype(np.uint8).reshape(ROWS, COLS)
    assert client.ext("S", (CID.DETECT_MD_THRESHOLD_GRID, want), (CID.DETECT_MD_REGION_GRID, regions))[0] == 0
    got, got_r = grid(0), grid(0, np.uint8)
    assert client.ext("G", (CID.DETECT_MD_THRESHOLD_GRID, got), (CID.DETECT_MD_REGION_GRID, got_r))[0] == 0
    assert (got == want).all() and (got_r == regions).all()
    # Bad values: an element out of range (ERANGE), nothing applied.
    bad = want.copy()
    bad[3, 5] = MOTION_ACTIVITY_MAX + 1
    e, cs, _ = client.ext("S", (CID.DETECT_MD_GLOBAL_THRESHOLD, 7), (CID.DETECT_MD_THRESHOLD_GRID, bad))
    assert e == errno.ERANGE
    e, cs, _ = client.ext("TRY", (CID.DETECT_MD_REGION_GRID, grid(4, np.uint8)))
    assert e == errno.ERANGE and cs.error_idx == 0
    assert client.ext("G", (CID.DETECT_MD_THRESHOLD_GRID, got))[0] == 0 and (got == want).all()
    v = abi.v4l2_control(CID.DETECT_MD_GLOBAL_THRESHOLD, 0)
    client.ioctl("G_CTRL", v)
    assert v.value == 50  # the failed S_EXT_CTRLS changed nothing
    assert client.err("S_CTRL", abi.v4l2_control(CID.DETECT_MD_MODE, 4)) == errno.ERANGE
    assert client.err("S_CTRL", abi.v4l2_control(CID.DETECT_MD_GLOBAL_THRESHOLD, 1001)) == errno.ERANGE
    # A short buffer on S is refused too (the kernel says EFAULT for S; the spec's ENOSPC here).
    assert client.ext("S", (CID.DETECT_MD_REGION_GRID, np.zeros(5, np.uint8)))[0] == errno.ENOSPC
    # The motion event needs no id; an unknown event type is still refused.
    sub = abi.v4l2_event_subscription()
    sub.type = abi.EventType.FRAME_SYNC
    assert client.err("SUBSCRIBE_EVENT", sub) == errno.EINVAL


@fuse_only
def test_events_only_while_the_scene_moves(client, backend):
    client.subscribe(abi.EventType.MOTION_DET)
    assert client.ext("S", (CID.DETECT_MD_GLOBAL_THRESHOLD, 20), (CID.DETECT_MD_MODE, MD_GLOBAL))[0] == 0
    assert client.events(0.5) == []  # a still scene: nothing
    backend.set_scene(moving=True)
    moving = client.events(1.0)
    assert len(moving) >= FPS * 0.6, moving  # about one per frame
    assert {m for _, _, _, m in moving} == {1}  # Global: region 0
    assert all(not f & abi.EventType.MD_FL_HAVE_FRAME_SEQ for _, f, _, _ in moving)  # nobody streams
    backend.set_scene(moving=False)
    client.events(0.2)  # the frame in flight when it stopped
    assert client.events(0.5) == []
    # Disabled: no analysis, no events, even while moving.
    backend.set_scene(moving=True)
    client.ext("S", (CID.DETECT_MD_MODE, MD_DISABLED))
    client.drain()
    assert client.events(0.4) == []


@fuse_only
def test_region_bits(client, backend):
    # The box slides along rows 4..6: left half there is region 1, right half region 2, the
    # rest of the picture region 3 (never moves).
    regions = grid(3, np.uint8)
    regions[BOX_ROWS.start:BOX_ROWS.stop, : COLS // 2] = 1
    regions[BOX_ROWS.start:BOX_ROWS.stop, COLS // 2:] = 2
    assert client.ext("S", (CID.DETECT_MD_REGION_GRID, regions), (CID.DETECT_MD_GLOBAL_THRESHOLD, 20),
                      (CID.DETECT_MD_MODE, MD_REGION_GRID))[0] == 0
    client.subscribe(abi.EventType.MOTION_DET)
    backend.set_scene(moving=True)
    masks = [m for _, _, _, m in client.events(4.5)]  # one pass of the box: 4 s
    assert masks and set(masks) <= {0b010, 0b100, 0b110}, set(masks)
    assert masks.count(0b010) > 10 and masks.count(0b100) > 10
    # Threshold grid: per-cell thresholds, everything region 0; only the cells that are
    # sensitive (rows 4..6, right half) report.
    thresholds = grid(MOTION_ACTIVITY_MAX)
    thresholds[BOX_ROWS.start:BOX_ROWS.stop, COLS // 2:] = 20
    client.ext("S", (CID.DETECT_MD_THRESHOLD_GRID, thresholds), (CID.DETECT_MD_MODE, MD_THRESHOLD_GRID))
    client.drain()
    events = client.events(4.2)
    assert events and {m for *_, m in events} == {1}
    assert FPS * 1.0 < len(events) < FPS * 3.0  # about half a pass


@fuse_only
def test_threshold_change_applies_at_the_next_frame(client, backend):
    client.subscribe(abi.EventType.MOTION_DET)
    client.ext("S", (CID.DETECT_MD_GLOBAL_THRESHOLD, 20), (CID.DETECT_MD_MODE, MD_GLOBAL))
    backend.set_scene(moving=True)
    assert client.events(0.3)
    period = 1 / FPS
    for _ in range(3):
        client.ext("S", (CID.DETECT_MD_GLOBAL_THRESHOLD, MOTION_ACTIVITY_MAX))  # never exceeded
        done = time.clock_gettime(time.CLOCK_MONOTONIC)
        late = [t for t, *_ in client.events(0.3) if t > done + period]
        assert late == [], f"{len(late)} events more than a frame after the threshold rose"
        client.ext("S", (CID.DETECT_MD_GLOBAL_THRESHOLD, 20))
        done = time.clock_gettime(time.CLOCK_MONOTONIC)
        ev = client.events(0.3)
        assert ev, "no event after the threshold came down"
        assert ev[0][0] - done < 3 * period + 0.05  # the next analysed frame reports


def test_event_names_the_frame_of_the_streaming_node(backend):
    node = CaptureNode("video39", backend, backend.channels[1])
    h = open_node(node)
    try:
        sub = abi.v4l2_event_subscription()
        sub.type = abi.EventType.MOTION_DET
        hioctl(h, "SUBSCRIBE_EVENT", sub)
        c = abi.v4l2_control(CID.DETECT_MD_MODE, MD_GLOBAL)
        hioctl(h, "S_CTRL", c)
        hioctl(h, "S_CTRL", abi.v4l2_control(CID.DETECT_MD_GLOBAL_THRESHOLD, 20))
        backend.set_scene(moving=True)
        reqbufs(h, 4)
        for i in range(4):
            hioctl(h, "QBUF", buf(i))
        streamon(h)
        seqs, flagged = set(), []
        for i in range(25):
            b = dqbuf(h)
            seqs.add(b.sequence)
            hioctl(h, "QBUF", buf(b.index))
            ev = abi.v4l2_event()
            while i < 20 and not hioctl_err(h, ev):  # the last 5 buffers: frames already reported
                m = ev.u.motion_det
                if m.flags & abi.EventType.MD_FL_HAVE_FRAME_SEQ:
                    flagged.append(m.frame_sequence)
        assert len(flagged) >= 10
        assert set(flagged) <= seqs, (flagged, seqs)  # each names a buffer the client got
    finally:
        hioctl(h, "S_CTRL", abi.v4l2_control(CID.DETECT_MD_MODE, MD_DISABLED))
        backend.set_scene(moving=False)
        h.release()
        node.close()


def hioctl_err(h, ev) -> int:
    try:
        hioctl(h, "DQEVENT", ev)
    except OSError as e:
        return e.errno
    return 0
