"""In-process tests of the capture node (impv4l2.v4l2) on the sim backend."""

from __future__ import annotations

import ctypes
import errno

import numpy as np
import pytest

from impv4l2.driver.sim.pattern import read_counter, y_plane
from impv4l2.fileops import POLLIN, POLLPRI, WouldBlock
from impv4l2.v4l2 import abi
from impv4l2.v4l2.capture import CaptureNode
from impv4l2.v4l2.controls import CID_DAY_NIGHT

from support.v4l2_helpers import MEM, buf, ctrl, dqbuf, err, fmt, ioctl, open_node, reqbufs, streamon

CAP = abi.BufType.VIDEO_CAPTURE
CID = abi.CID


@pytest.fixture
def nodes(backend):
    main = CaptureNode("video10", backend, backend.channels[0])
    sub = CaptureNode("video11", backend, backend.channels[1])
    wakes = []
    main.add_waker(lambda: wakes.append(1))
    sub.add_waker(lambda: None)
    yield main, sub, wakes
    main.close()
    sub.close()


def test_querycap(nodes):
    main, sub, _ = nodes
    for node, role in ((main, "main"), (sub, "sub")):
        h = open_node(node)
        c = abi.v4l2_capability()
        ioctl(h, "QUERYCAP", c)
        assert c.driver == b"impv4l2"
        assert c.card == f"impv4l2 {role} (sim)".encode()
        assert c.bus_info == f"platform:impv4l2-{role}".encode()
        want = abi.Cap.VIDEO_CAPTURE | abi.Cap.EXT_PIX_FORMAT | abi.Cap.READWRITE | abi.Cap.STREAMING
        assert c.device_caps == want
        assert c.capabilities == want | abi.Cap.DEVICE_CAPS
        assert list(c.reserved) == [0, 0, 0]
        h.release()


def test_unknown_ioctl_enotty(nodes):
    h = open_node(nodes[0])
    assert err(h, "G_STD") == errno.ENOTTY
    assert err(h, "ENCODER_CMD", abi.raw.v4l2_encoder_cmd()) == errno.ENOTTY
    with pytest.raises(OSError) as ex:
        h.ioctl(0xC0DE5699, bytearray(16), MEM)
    assert ex.value.errno == errno.ENOTTY


def test_priority(nodes):
    node = nodes[0]
    a, b = open_node(node), open_node(node, pid=2)
    p = abi.c_uint()
    ioctl(a, "G_PRIORITY", p)
    assert p.value == abi.Priority.INTERACTIVE
    ioctl(a, "S_PRIORITY", abi.c_uint(abi.Priority.RECORD))
    ioctl(b, "G_PRIORITY", p)
    assert p.value == abi.Priority.RECORD
    # b is now below the maximum: every prio-checked ioctl is refused.
    assert err(b, "S_PRIORITY", abi.c_uint(abi.Priority.RECORD)) == errno.EBUSY
    assert err(b, "S_FMT", fmt(640, 360)) == errno.EBUSY
    assert err(b, "S_CTRL", abi.v4l2_control(CID.BRIGHTNESS, 1)) == errno.EBUSY
    assert err(a, "S_PRIORITY", abi.c_uint(abi.Priority.UNSET)) == errno.EINVAL
    a.release()
    ioctl(b, "G_PRIORITY", p)
    assert p.value == abi.Priority.INTERACTIVE
    b.release()


def test_input(nodes):
    h = open_node(nodes[0])
    i = abi.v4l2_input()
    ioctl(h, "ENUMINPUT", i)
    assert i.name == b"Camera" and i.type == abi.raw.InputType.CAMERA
    i.index = 1
    assert err(h, "ENUMINPUT", i) == errno.EINVAL
    v = abi.c_int(5)
    ioctl(h, "G_INPUT", v)
    assert v.value == 0
    ioctl(h, "S_INPUT", abi.c_int(0))
    assert err(h, "S_INPUT", abi.c_int(1)) == errno.EINVAL


def test_formats(nodes, backend):
    main, sub, _ = nodes
    h = open_node(main)
    got = []
    for i in range(10):
        d = abi.v4l2_fmtdesc()
        d.index, d.type = i, CAP
        if err(h, "ENUM_FMT", d):
            break
        got.append(d.pixelformat)
    from impv4l2.driver.sim.avpu import HAVE_X265
    assert got == [abi.PixelFormat.NV12, abi.PixelFormat.YUYV, abi.PixelFormat.YUV420, abi.PixelFormat.H264,
                   *[abi.PixelFormat.HEVC] * HAVE_X265,  # HEVC: only with libx265 (test_v4l2_hevc.py)
                   abi.PixelFormat.MJPEG]  # compressed: test_v4l2_compressed.py
    d = abi.v4l2_fmtdesc()
    d.type = abi.BufType.VIDEO_OUTPUT
    assert err(h, "ENUM_FMT", d) == errno.EINVAL

    f = fmt()
    ioctl(h, "G_FMT", f)
    p = f.fmt.pix
    assert (p.width, p.height, p.pixelformat) == (1920, 1080, abi.PixelFormat.NV12)
    assert (p.bytesperline, p.sizeimage, p.field) == (1920, 1920 * 1080 * 3 // 2, abi.Field.NONE)
    assert (p.colorspace, p.quantization) == (abi.Colorspace.REC709, abi.Quantization.LIM_RANGE)
    # TRY picks the nearest size and fixes unknown formats; G_FMT unchanged.
    f = fmt(1000, 500, abi.PixelFormat.YUYV)
    ioctl(h, "TRY_FMT", f)
    p = f.fmt.pix
    assert (p.width, p.height, p.bytesperline, p.sizeimage) == (960, 540, 1920, 1920 * 540)
    f = fmt(640, 360, abi.PixelFormat.RGB24)
    ioctl(h, "TRY_FMT", f)
    assert f.fmt.pix.pixelformat == abi.PixelFormat.NV12
    f = fmt(640, 360, abi.PixelFormat.YUV420)
    ioctl(h, "S_FMT", f)
    assert (f.fmt.pix.bytesperline, f.fmt.pix.sizeimage) == (640, 640 * 360 * 3 // 2)
    g = fmt()
    ioctl(h, "G_FMT", g)
    assert bytes(g) == bytes(f)
    assert err(h, "G_FMT", fmt(type_=abi.BufType.VIDEO_OUTPUT)) == errno.EINVAL
    # Another handle sees the node's format.
    h2 = open_node(main, pid=2)
    g2 = fmt()
    ioctl(h2, "G_FMT", g2)
    assert g2.fmt.pix.pixelformat == abi.PixelFormat.YUV420


def test_framesizes_intervals_parm(nodes, backend):
    main, sub, _ = nodes
    h = open_node(sub)
    sizes = []
    for i in range(10):
        s = abi.v4l2_frmsizeenum()
        s.index, s.pixel_format = i, abi.PixelFormat.YUYV
        if err(h, "ENUM_FRAMESIZES", s):
            break
        assert s.type == abi.raw.Frmsizetypes.DISCRETE
        sizes.append((s.discrete.width, s.discrete.height))
    assert sizes == list(backend.channels[1].sizes())
    for w, hh in sizes:
        rates = []
        for i in range(20):
            iv = abi.v4l2_frmivalenum()
            iv.index, iv.pixel_format, iv.width, iv.height = i, abi.PixelFormat.NV12, w, hh
            if err(h, "ENUM_FRAMEINTERVALS", iv):
                break
            assert iv.discrete.numerator == 1
            rates.append(iv.discrete.denominator)
        assert rates == list(backend.channels[1].frame_rates())
    iv = abi.v4l2_frmivalenum()
    iv.pixel_format, iv.width, iv.height = abi.PixelFormat.NV12, 123, 45
    assert err(h, "ENUM_FRAMEINTERVALS", iv) == errno.EINVAL
    s = abi.v4l2_frmsizeenum()
    s.pixel_format = abi.PixelFormat.RGB24
    assert err(h, "ENUM_FRAMESIZES", s) == errno.EINVAL

    p = abi.v4l2_streamparm()
    p.type = CAP
    ioctl(h, "G_PARM", p)
    c = p.parm.capture
    assert c.capability == abi.Cap.TIMEPERFRAME and c.readbuffers > 0
    assert (c.timeperframe.numerator, c.timeperframe.denominator) == (1, 30)
    p.parm.capture.timeperframe.numerator, p.parm.capture.timeperframe.denominator = 1, 14
    ioctl(h, "S_PARM", p)
    assert p.parm.capture.timeperframe.denominator == 15


def test_controls_query_and_enumeration(nodes):
    h = open_node(nodes[0])
    ids, qid = [], 0
    while True:
        q = abi.v4l2_query_ext_ctrl()
        q.id = qid | abi.CtrlFlag.NEXT_CTRL | abi.CtrlFlag.NEXT_COMPOUND
        if err(h, "QUERY_EXT_CTRL", q):
            break
        assert q.id > qid
        qid = q.id
        ids.append(q.id)
    for cid in (CID.USER_CLASS, CID.BRIGHTNESS, CID.CONTRAST, CID.SATURATION, CID.HUE,
                CID.SHARPNESS, CID.HFLIP, CID.VFLIP, CID.AUTOGAIN, CID.GAIN,
                CID.POWER_LINE_FREQUENCY, CID_DAY_NIGHT, CID.CAMERA_CLASS,
                CID.EXPOSURE_AUTO, CID.EXPOSURE_ABSOLUTE):
        assert cid in ids
    # Only NEXT_COMPOUND: the compound (array) controls, the motion detection grids.
    q = abi.v4l2_queryctrl()
    q.id = abi.CtrlFlag.NEXT_COMPOUND
    ioctl(h, "QUERYCTRL", q)
    assert (q.id, q.type, q.flags) == (CID.DETECT_MD_THRESHOLD_GRID, abi.CtrlType.U16, abi.CtrlFlag.HAS_PAYLOAD)
    assert (q.minimum, q.maximum, q.step, q.default_value) == (0, 0, 0, 0)  # QUERYCTRL: none for arrays
    q.id = CID.DETECT_MD_THRESHOLD_GRID | abi.CtrlFlag.NEXT_COMPOUND
    ioctl(h, "QUERYCTRL", q)
    assert q.id == CID.DETECT_MD_REGION_GRID
    q.id = CID.DETECT_MD_REGION_GRID | abi.CtrlFlag.NEXT_COMPOUND
    assert err(h, "QUERYCTRL", q) == errno.EINVAL
    q = abi.v4l2_queryctrl()
    q.id = CID.BRIGHTNESS
    ioctl(h, "QUERYCTRL", q)
    assert (q.name, q.minimum, q.maximum, q.default_value, q.type) == (b"Brightness", 0, 255, 128, abi.CtrlType.INTEGER)
    q.id = CID.USER_CLASS
    ioctl(h, "QUERYCTRL", q)
    assert q.type == abi.CtrlType.CTRL_CLASS and q.flags == abi.CtrlFlag.READ_ONLY | abi.CtrlFlag.WRITE_ONLY
    # Legacy private base reaches the private user control.
    q.id = abi.CID_PRIVATE_BASE
    ioctl(h, "QUERYCTRL", q)
    assert q.id == abi.CID_PRIVATE_BASE and q.name == b"Day/Night"
    q.id = abi.CID_PRIVATE_BASE + 1
    ioctl(h, "QUERYCTRL", q)
    assert q.name == b"Day/Night State" and q.flags == abi.CtrlFlag.READ_ONLY
    q.id = abi.CID_PRIVATE_BASE + 2
    assert err(h, "QUERYCTRL", q) == errno.EINVAL
    # Menus.
    names = []
    for i in range(5):
        m = abi.v4l2_querymenu()
        m.id, m.index = CID.POWER_LINE_FREQUENCY, i
        if err(h, "QUERYMENU", m) == 0:
            names.append(m.name)
    assert names == [b"Disabled", b"50 Hz", b"60 Hz", b"Auto"]
    m = abi.v4l2_querymenu()
    m.id, m.index = CID.BRIGHTNESS, 0
    assert err(h, "QUERYMENU", m) == errno.EINVAL


def test_controls_get_set_shared_and_errors(nodes, backend):
    main, sub, _ = nodes
    hm, hs = open_node(main), open_node(sub, pid=2)
    try:
        assert ctrl(hm, CID.BRIGHTNESS, 200) == 200
        assert ctrl(hs, CID.BRIGHTNESS) == 200  # the ISP is shared
        assert backend.isp.get("brightness") == 200
        assert err(hm, "S_CTRL", abi.v4l2_control(CID.BRIGHTNESS, 256)) == errno.ERANGE
        assert err(hm, "S_CTRL", abi.v4l2_control(CID.BRIGHTNESS, -1)) == errno.ERANGE
        assert err(hm, "S_CTRL", abi.v4l2_control(0x00981234, 0)) == errno.EINVAL
        assert err(hm, "G_CTRL", abi.v4l2_control(0, 0)) == errno.EINVAL
        assert err(hm, "G_CTRL", abi.v4l2_control(CID.USER_CLASS, 0)) == errno.EACCES
        assert err(hm, "S_CTRL", abi.v4l2_control(CID.USER_CLASS, 0)) == errno.EACCES
        assert ctrl(hm, CID_DAY_NIGHT, 1) == 1
        assert err(hm, "S_CTRL", abi.v4l2_control(CID_DAY_NIGHT, 3)) == errno.ERANGE  # 2: Auto
    finally:
        ctrl(hm, CID.BRIGHTNESS, 128)
        ctrl(hm, CID_DAY_NIGHT, 0)


def _ext(count, which=0):
    arr = (abi.v4l2_ext_control * count)()
    cs = abi.v4l2_ext_controls()
    cs.which, cs.count = which, count
    cs.controls = ctypes.cast(arr, ctypes.POINTER(abi.v4l2_ext_control))
    return cs, arr


def test_ext_controls(nodes, backend):
    h = open_node(nodes[0])
    try:
        cs, arr = _ext(0)
        ioctl(h, "G_EXT_CTRLS", cs)
        cs, arr = _ext(2)
        arr[0].id, arr[1].id = CID.CONTRAST, CID.EXPOSURE_AUTO
        ioctl(h, "G_EXT_CTRLS", cs)
        assert arr[0].value == backend.isp.get("contrast")
        arr[0].value, arr[1].value = 100, 1
        ioctl(h, "S_EXT_CTRLS", cs)
        assert (backend.isp.get("contrast"), backend.isp.get("exposure_auto")) == (100, 1)
        # Out of range: nothing applied; TRY reports the index, S reports count.
        arr[0].value, arr[1].value = 90, 7
        assert err(h, "TRY_EXT_CTRLS", cs) == errno.ERANGE and cs.error_idx == 1
        assert err(h, "S_EXT_CTRLS", cs) == errno.ERANGE and cs.error_idx == 2
        assert backend.isp.get("contrast") == 100
        # Mixed classes under a class `which`: EINVAL.
        cs.which = abi.CtrlClass.USER
        arr[1].value = 0
        assert err(h, "G_EXT_CTRLS", cs) == errno.EINVAL and cs.error_idx == 2
        assert err(h, "TRY_EXT_CTRLS", cs) == errno.EINVAL and cs.error_idx == 1
        # Defaults.
        cs.which = abi.CTRL_WHICH_DEF_VAL
        ioctl(h, "G_EXT_CTRLS", cs)
        assert (arr[0].value, arr[1].value) == (128, 0)
        assert err(h, "S_EXT_CTRLS", cs) == errno.EINVAL
        cs, arr = _ext(1)
        arr[0].id = 0
        assert err(h, "S_EXT_CTRLS", cs) == errno.EINVAL and cs.error_idx == 1
        assert err(h, "TRY_EXT_CTRLS", cs) == errno.EINVAL and cs.error_idx == 0
    finally:
        backend.isp.set("contrast", 128)
        backend.isp.set("exposure_auto", 0)


def test_control_events(nodes):
    main, sub, wakes = nodes
    a, b, c = open_node(main), open_node(main, pid=2), open_node(sub, pid=3)
    sub_ = abi.v4l2_event_subscription()
    sub_.type, sub_.id, sub_.flags = abi.EventType.CTRL, CID.BRIGHTNESS, abi.EVENT_SUB_FL_SEND_INITIAL
    for h in (a, b, c):
        ioctl(h, "SUBSCRIBE_EVENT", sub_)
    for h in (a, b, c):  # the initial event
        assert h.poll() & POLLPRI
        ev = abi.v4l2_event()
        ioctl(h, "DQEVENT", ev)
        assert ev.type == abi.EventType.CTRL and ev.id == CID.BRIGHTNESS and ev.u.ctrl.value == 128
    assert err(a, "DQEVENT", abi.v4l2_event()) == errno.ENOENT
    ctrl(a, CID.BRIGHTNESS, 99)
    assert not a.poll() & POLLPRI  # no feedback to the setter
    for h in (b, c):  # both nodes, since the ISP is shared
        ev = abi.v4l2_event()
        ioctl(h, "DQEVENT", ev)
        assert ev.u.ctrl.changes == abi.EVENT_CTRL_CH_VALUE and ev.u.ctrl.value == 99
        assert list(ev.reserved) == [0] * 8
    ctrl(a, CID.BRIGHTNESS, 128)
    ioctl(b, "UNSUBSCRIBE_EVENT", sub_)
    bad = abi.v4l2_event_subscription()
    bad.type, bad.id = abi.EventType.CTRL, 0x00981234
    assert err(a, "SUBSCRIBE_EVENT", bad) == errno.EINVAL
    bad.type = abi.EventType.EOS
    assert err(a, "SUBSCRIBE_EVENT", bad) == errno.EINVAL
    sc = abi.v4l2_event_subscription()
    sc.type = abi.EventType.SOURCE_CHANGE
    ioctl(a, "SUBSCRIBE_EVENT", sc)
    # class controls never send an initial event
    cl = abi.v4l2_event_subscription()
    cl.type, cl.id, cl.flags = abi.EventType.CTRL, CID.USER_CLASS, abi.EVENT_SUB_FL_SEND_INITIAL
    ioctl(a, "SUBSCRIBE_EVENT", cl)
    assert err(a, "DQEVENT", abi.v4l2_event()) == errno.ENOENT


def test_reqbufs_ownership_and_errors(nodes):
    node = nodes[1]
    a, b = open_node(node), open_node(node, pid=2)
    for m in (abi.Memory.DMABUF, abi.Memory.OVERLAY, 0):
        r = abi.v4l2_requestbuffers()
        r.type, r.memory = CAP, m
        assert err(a, "REQBUFS", r) == errno.EINVAL
    r = abi.v4l2_requestbuffers()
    r.type, r.memory = abi.BufType.VIDEO_OUTPUT, abi.Memory.MMAP
    assert err(a, "REQBUFS", r) == errno.EINVAL
    r = reqbufs(a, 0)
    assert r.capabilities == (abi.BUF_CAP_SUPPORTS_MMAP | abi.BUF_CAP_SUPPORTS_USERPTR
                              | abi.BUF_CAP_SUPPORTS_ORPHANED_BUFS)
    r = reqbufs(a, 3)
    assert r.count == 3
    assert err(b, "REQBUFS", abi.v4l2_requestbuffers(1, CAP, abi.Memory.MMAP)) == errno.EBUSY
    assert err(b, "REQBUFS", abi.v4l2_requestbuffers(0, CAP, abi.Memory.MMAP)) == errno.EBUSY
    assert err(b, "QBUF", buf(0)) == errno.EBUSY
    assert err(a, "S_FMT", fmt(320, 180)) == errno.EBUSY
    assert err(b, "S_FMT", fmt(320, 180)) == errno.EBUSY
    with pytest.raises(OSError) as ex:
        b.read(1, 0)
    assert ex.value.errno == errno.EBUSY
    # QUERYBUF: offsets page aligned and distinct, anyone may query.
    offs = set()
    for i in range(3):
        q = buf(i)
        ioctl(b, "QUERYBUF", q)
        assert q.length == 640 * 360 * 3 // 2 and q.m.offset % 4096 == 0
        assert q.flags == abi.BufFlag.TIMESTAMP_MONOTONIC and q.sequence == 0
        offs.add(q.m.offset)
    assert len(offs) == 3
    assert err(a, "QUERYBUF", buf(3)) == errno.EINVAL
    assert err(a, "QUERYBUF", buf(0, type_=abi.BufType.VIDEO_OUTPUT)) == errno.EINVAL
    assert err(a, "QBUF", buf(0, memory=abi.Memory.USERPTR)) == errno.EINVAL
    assert err(a, "QBUF", buf(7)) == errno.EINVAL
    ioctl(a, "QBUF", buf(0))
    assert err(a, "QBUF", buf(0)) == errno.EINVAL
    p = buf(1)
    ioctl(a, "PREPARE_BUF", p)
    assert p.flags & abi.BufFlag.PREPARED
    assert err(a, "PREPARE_BUF", buf(1)) == errno.EINVAL
    assert err(a, "DQBUF", buf()) == errno.EINVAL  # not streaming
    # CREATE_BUFS: too small sizeimage refused; count 0 reports the index.
    c = abi.v4l2_create_buffers()
    c.memory, c.count = abi.Memory.MMAP, 1
    c.format.type = CAP
    ioctl(a, "G_FMT", c.format)  # the current format, sizeimage changed below
    c.format.fmt.pix.sizeimage = 1000
    assert err(a, "CREATE_BUFS", c) == errno.EINVAL
    c.format.fmt.pix.sizeimage = 640 * 360 * 2
    ioctl(a, "CREATE_BUFS", c)
    assert (c.index, c.count) == (3, 1)
    c.count = 0
    ioctl(a, "CREATE_BUFS", c)
    assert c.index == 4
    c.count = 1
    assert err(b, "CREATE_BUFS", c) == errno.EBUSY
    # Release by the owner frees the queue for the other handle at once.
    a.release()
    assert reqbufs(b, 2).count == 2
    reqbufs(b, 0)
    assert err(b, "STREAMON", abi.c_int(CAP)) == errno.EINVAL  # no buffers


def _start(h, n, memory=abi.Memory.MMAP, ptrs=None):
    reqbufs(h, n, memory)
    for i in range(n):
        b = buf(i, memory)
        if ptrs is not None:
            b.m.userptr = ctypes.addressof(ptrs[i])
            b.length = ctypes.sizeof(ptrs[i])
        ioctl(h, "QBUF", b)
    streamon(h)


def test_mmap_streaming_nv12_counter(nodes):
    node = nodes[1]
    h = open_node(node)
    _start(h, 4)
    last = None
    for _ in range(12):
        b = dqbuf(h)
        assert b.bytesused == 640 * 360 * 3 // 2
        assert b.flags & abi.BufFlag.TIMESTAMP_MONOTONIC and not b.flags & (abi.BufFlag.DONE | abi.BufFlag.QUEUED)
        assert b.timestamp.secs or b.timestamp.usecs
        assert b.field == abi.Field.NONE
        data = node.memory.view(b.m.offset, b.bytesused)
        assert read_counter(y_plane(data, 640, 360)) == b.sequence
        if last is not None:
            assert b.sequence > last
        last = b.sequence
        ioctl(h, "QBUF", b)
    ioctl(h, "STREAMOFF", abi.c_int(CAP))
    for i in range(4):  # STREAMOFF returns every buffer
        q = buf(i)
        ioctl(h, "QUERYBUF", q)
        assert not q.flags & (abi.BufFlag.QUEUED | abi.BufFlag.DONE)
    assert err(h, "DQBUF", buf()) == errno.EINVAL


def test_slow_client_drops_with_sequence_gaps(nodes, backend):
    node = nodes[1]
    h = open_node(node)
    _start(h, 2)
    seqs = []
    import time
    for _ in range(6):
        b = dqbuf(h)
        seqs.append(b.sequence)
        time.sleep(0.15)  # slower than 30 fps with only 2 buffers
        ioctl(h, "QBUF", b)
    gaps = [b - a for a, b in zip(seqs, seqs[1:])]
    assert all(g >= 1 for g in gaps) and max(gaps) > 1, seqs
    assert node.sink.dropped > 0


def test_yuyv_conversion_and_userptr(nodes):
    node = nodes[1]
    h = open_node(node)
    f = fmt(640, 360, abi.PixelFormat.YUYV)
    ioctl(h, "S_FMT", f)
    size = f.fmt.pix.sizeimage
    bufs = [(ctypes.c_uint8 * size)() for _ in range(3)]
    _start(h, 3, abi.Memory.USERPTR, bufs)
    for _ in range(4):
        b = dqbuf(h, abi.Memory.USERPTR)
        assert b.memory == abi.Memory.USERPTR and b.bytesused == size
        i = [ctypes.addressof(x) for x in bufs].index(b.m.userptr)
        yuyv = np.frombuffer(bufs[i], np.uint8).reshape(360, 640 * 2)
        # the luma of YUYV is every other byte: read the counter from it
        assert read_counter(np.ascontiguousarray(yuyv[:, 0::2])) == b.sequence
        ioctl(h, "QBUF", b)
    h.release()


def test_fresh_read_is_eagain_even_if_a_frame_races_in(nodes, monkeypatch):
    """v4l2-compliance reads twice from fresh opens and wants the same answer: the
    first read() only starts streaming, even when a frame is done before it returns."""
    import time
    node = nodes[1]
    start = node.channel.start

    def start_and_deliver(sink):
        start(sink)
        deadline = time.monotonic() + 5
        while not node.queue.has_done() and time.monotonic() < deadline:
            time.sleep(0.002)

    monkeypatch.setattr(node.channel, "start", start_and_deliver)
    h = open_node(node)
    with pytest.raises(WouldBlock):
        h.read(1, 0)
    assert node.queue.has_done()
    assert len(bytes(h.read(1, 0))) == 1  # the frame that raced in is served next


def test_read_across_chunks(nodes):
    node = nodes[1]
    h = open_node(node)
    frame = 640 * 360 * 3 // 2
    with pytest.raises(WouldBlock):
        h.read(frame, 0)  # starts streaming; nothing ready yet (no side effect besides that)
    import time
    frames = []
    for _ in range(3):
        deadline = time.monotonic() + 5
        parts, off = [], 0
        while True:  # one read(2) of a whole frame, split like CUSE does (128 KiB)
            try:
                chunk = bytes(h.read(128 * 1024, off))
            except WouldBlock:
                assert off == 0 and time.monotonic() < deadline
                time.sleep(0.005)
                continue
            parts.append(chunk)
            off += len(chunk)
            if len(chunk) < 128 * 1024:
                break
        data = b"".join(parts)
        assert len(data) == frame
        frames.append(read_counter(y_plane(data, 640, 360)))
    assert frames == sorted(frames) and len(set(frames)) == 3
    # a short read continues the same frame in the next call
    def read_retry(n):
        deadline = time.monotonic() + 5
        while True:
            try:
                return bytes(h.read(n, 0))
            except WouldBlock:
                assert time.monotonic() < deadline
                time.sleep(0.005)

    first = read_retry(1000)
    rest = bytes(h.read(frame, 0))
    assert len(first) + len(rest) == frame
    # another handle cannot stream while reading
    o = open_node(node, pid=2)
    assert err(o, "REQBUFS", abi.v4l2_requestbuffers(1, CAP, abi.Memory.MMAP)) == errno.EBUSY
    h.release()
    assert reqbufs(o, 1).count == 1


def test_poll_and_waker(nodes):
    main, _, wakes = nodes
    h = open_node(main)
    _start(h, 2)
    b = dqbuf(h)
    assert wakes  # the backend thread woke the transport
    ioctl(h, "QBUF", b)
    import time
    deadline = time.monotonic() + 5
    while not h.poll() & POLLIN:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    h.release()
    assert not main.queue.streaming and not main.queue.buffers


def test_brightness_and_hflip_change_frames(nodes, backend):
    node = nodes[1]
    h = open_node(node)

    def grab():
        _start(h, 2)
        b = dqbuf(h)
        y = y_plane(node.memory.view(b.m.offset, b.bytesused), 640, 360).copy()
        ioctl(h, "STREAMOFF", abi.c_int(CAP))
        reqbufs(h, 0)
        return y

    try:
        base = grab()
        ctrl(h, CID.BRIGHTNESS, 220)
        bright = grab()
        assert bright[40:].mean() > base[40:].mean() + 10
        ctrl(h, CID.BRIGHTNESS, 128)
        ctrl(h, CID.HFLIP, 1)
        flipped = grab()
        # the static pattern (below the OSD rows, away from the moving box) mirrors
        rows = slice(200, 240)
        assert np.abs(flipped[rows, ::-1].astype(int) - base[rows].astype(int)).mean() < \
            np.abs(flipped[rows].astype(int) - base[rows].astype(int)).mean()
    finally:
        ctrl(h, CID.BRIGHTNESS, 128)
        ctrl(h, CID.HFLIP, 0)


def test_unexpected_exception_is_eio(nodes, monkeypatch):
    h = open_node(nodes[0])
    monkeypatch.setattr(nodes[0].controls, "queryctrl", lambda q: 1 / 0)
    q = abi.v4l2_queryctrl()
    q.id = CID.BRIGHTNESS
    assert err(h, "QUERYCTRL", q) == errno.EIO
