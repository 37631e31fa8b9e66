"""The V4L2 core (impv4l2.v4l2.dispatch over the table in impv4l2.v4l2.ioctls): the generic
work v4l2-ioctl.c does before a driver's op runs, checked on a probe handle whose ops record
what they were given."""

from __future__ import annotations

import ctypes
import errno
import types

import pytest

from impv4l2.v4l2 import abi, dispatch
from impv4l2.v4l2.capture import CaptureHandle
from impv4l2.v4l2.encoder import EncoderHandle
from impv4l2.v4l2.ioctls import IOCTLS
from impv4l2.v4l2.node import NodeHandle

CAP, OUT = abi.BufType.VIDEO_CAPTURE, abi.BufType.VIDEO_OUTPUT
CAP_MP, OUT_MP = abi.BufType.VIDEO_CAPTURE_MPLANE, abi.BufType.VIDEO_OUTPUT_MPLANE


class Probe:
    """A handle implementing a few ops; each records the struct bytes it was handed."""

    fatal = None

    def __init__(self, buf_types=frozenset({CAP}), prio=abi.Priority.DEFAULT, max_prio=abi.Priority.DEFAULT):
        self.node = types.SimpleNamespace(name="probe0", buf_types=buf_types, max_prio=lambda: max_prio)
        self.caller = types.SimpleNamespace(pid=1)
        self.prio = prio
        self.seen: dict[str, bytes] = {}

    def _record(self, name, s):
        self.seen[name] = bytes(memoryview(s).cast("B")) if s is not None else b""

    def vidioc_querycap(self, s, mem):
        self._record("querycap", s)

    def vidioc_enum_fmt(self, s, mem):
        self._record("enum_fmt", s)

    def vidioc_s_fmt(self, s, mem):
        self._record("s_fmt", s)

    def vidioc_g_selection(self, s, mem):
        self._record("g_selection", s)

    def vidioc_s_ext_ctrls(self, s, mem):
        raise OSError(errno.EINVAL, "bad control")

    def vidioc_streamon(self, s, mem):
        self._record("streamon", s)

    def vidioc_g_ctrl(self, s, mem):
        raise RuntimeError("a bug in the op")


def call(h, name, struct, fill=0xAB, **fields):
    arg = bytearray([fill]) * ctypes.sizeof(struct)
    s = struct.from_buffer(arg)
    for k, v in fields.items():
        obj, attr = s, k
        while "__" in attr:
            head, attr = attr.split("__", 1)
            obj = getattr(obj, head)
        setattr(obj, attr, v)
    del s
    return dispatch.call(IOCTLS, h, abi.VIDIOC[name], arg, None), arg


def test_every_row_is_one_command_and_every_op_is_a_row():
    assert len({r.cmd for r in IOCTLS.values()}) == len(IOCTLS)
    ops = {r.op for r in IOCTLS.values()}
    for cls in (NodeHandle, CaptureHandle, EncoderHandle):
        named = {n for n in dir(cls) if n.startswith("vidioc_")}
        assert named <= ops, named - ops  # an op no row calls would be dead code
    # the table says each ioctl's flags once, as v4l2-ioctl.c does
    assert IOCTLS[abi.VIDIOC["S_FMT"]].flags & dispatch.PRIO
    assert IOCTLS[abi.VIDIOC["S_EXT_CTRLS"]].flags & dispatch.ALWAYS_COPY
    assert not IOCTLS[abi.VIDIOC["G_FMT"]].flags & dispatch.PRIO


def test_missing_op_is_enotty():
    with pytest.raises(OSError) as e:
        call(Probe(), "G_FMT", abi.v4l2_format, type=CAP)
    assert e.value.errno == errno.ENOTTY
    with pytest.raises(OSError) as e:
        dispatch.call(IOCTLS, Probe(), 0xC0DE5601, bytearray(4), None)
    assert e.value.errno == errno.ENOTTY


def test_read_only_command_starts_zeroed():
    h = Probe()
    call(h, "QUERYCAP", abi.v4l2_capability)
    assert h.seen["querycap"] == bytes(ctypes.sizeof(abi.v4l2_capability))


def test_clear_zeroes_the_input_after_the_named_field_only():
    h = Probe()
    call(h, "ENUM_FMT", abi.v4l2_fmtdesc, index=3, type=CAP)
    s = abi.v4l2_fmtdesc.from_buffer_copy(h.seen["enum_fmt"])
    keep = abi.v4l2_fmtdesc.type.offset + abi.v4l2_fmtdesc.type.size
    assert (s.index, s.type) == (3, CAP)
    assert h.seen["enum_fmt"][keep:] == bytes(len(h.seen["enum_fmt"]) - keep)
    # S_FMT has no CLEAR: the whole input reaches the op
    call(h, "S_FMT", abi.v4l2_format, type=CAP)
    assert h.seen["s_fmt"][8:16] == b"\xab" * 8


def test_buffer_type_is_checked_against_the_node():
    h = Probe(buf_types=frozenset({CAP}))
    with pytest.raises(OSError) as e:
        call(h, "ENUM_FMT", abi.v4l2_fmtdesc, type=OUT)
    assert e.value.errno == errno.EINVAL and "enum_fmt" not in h.seen
    with pytest.raises(OSError) as e:
        call(h, "STREAMON", ctypes.c_int, value=OUT)
    assert e.value.errno == errno.EINVAL and "streamon" not in h.seen
    call(h, "STREAMON", ctypes.c_int, value=CAP)
    assert "streamon" in h.seen


def test_selection_names_the_single_planar_type_for_an_mplane_queue():
    h = Probe(buf_types=frozenset({CAP_MP, OUT_MP}))
    call(h, "G_SELECTION", abi.raw.v4l2_selection, type=OUT)
    assert "g_selection" in h.seen
    with pytest.raises(OSError) as e:  # ENUM_FMT has no such rule
        call(h, "ENUM_FMT", abi.v4l2_fmtdesc, type=OUT)
    assert e.value.errno == errno.EINVAL


def test_priority_and_dead_handles():
    h = Probe(prio=abi.Priority.INTERACTIVE, max_prio=abi.Priority.RECORD)
    with pytest.raises(OSError) as e:
        call(h, "S_FMT", abi.v4l2_format, type=CAP)
    assert e.value.errno == errno.EBUSY and "s_fmt" not in h.seen
    call(h, "ENUM_FMT", abi.v4l2_fmtdesc, type=CAP)  # not a PRIO row
    h = Probe()
    h.fatal = "the AVPU failed"
    with pytest.raises(OSError) as e:
        call(h, "QUERYCAP", abi.v4l2_capability)
    assert e.value.errno == errno.EIO


def test_always_copy_failure_returns_the_negative_errno_and_bugs_become_eio():
    rc, _ = call(Probe(), "S_EXT_CTRLS", abi.v4l2_ext_controls)
    assert rc == -errno.EINVAL  # the transport copies error_idx back
    with pytest.raises(OSError) as e:
        call(Probe(), "G_CTRL", abi.v4l2_control)
    assert e.value.errno == errno.EIO
