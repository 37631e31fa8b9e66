"""The driver's one ioctl table (the kernel's ``v4l2_ioctls[]``).

Each row: the command, its struct, the core's flags (:data:`~impv4l2.v4l2.dispatch.PRIO`,
ALWAYS_COPY, SEL), INFO_FL_CLEAR's last input field and where the buffer type sits; the
operation is the handle's ``vidioc_<name>`` method.  The clear fields and priorities follow
v4l2-ioctl.c; commands a node's handle class does not implement answer ENOTTY.
"""

from __future__ import annotations

from ..shim import protocol as shim_protocol
from ..shim import server as shim
from . import abi
from .dispatch import ALWAYS_COPY, PRIO, SEL, Row, row

IOCTLS: dict[int, Row] = {r.cmd: r for r in (
    row("QUERYCAP", abi.v4l2_capability),
    row("G_PRIORITY", abi.c_uint),
    row("S_PRIORITY", abi.c_uint, PRIO),
    row("LOG_STATUS"),
    # inputs
    row("ENUMINPUT", abi.v4l2_input, clear="index"),
    row("G_INPUT", abi.c_int),
    row("S_INPUT", abi.c_int, PRIO),
    # formats
    row("ENUM_FMT", abi.v4l2_fmtdesc, clear="type", buf_type="type"),
    row("G_FMT", abi.v4l2_format, clear="type", buf_type="type"),
    row("S_FMT", abi.v4l2_format, PRIO, buf_type="type"),
    row("TRY_FMT", abi.v4l2_format, buf_type="type"),
    row("ENUM_FRAMESIZES", abi.v4l2_frmsizeenum, clear="pixel_format"),
    row("ENUM_FRAMEINTERVALS", abi.v4l2_frmivalenum, clear="height"),
    row("G_PARM", abi.v4l2_streamparm, clear="type", buf_type="type"),
    row("S_PARM", abi.v4l2_streamparm, PRIO, buf_type="type"),
    row("G_SELECTION", abi.raw.v4l2_selection, SEL, clear="r", buf_type="type"),
    row("S_SELECTION", abi.raw.v4l2_selection, PRIO | SEL, clear="r", buf_type="type"),
    # controls
    row("QUERYCTRL", abi.v4l2_queryctrl, clear="id"),
    row("QUERY_EXT_CTRL", abi.v4l2_query_ext_ctrl, clear="id"),
    row("QUERYMENU", abi.v4l2_querymenu, clear="index"),
    row("G_CTRL", abi.v4l2_control),
    row("S_CTRL", abi.v4l2_control, PRIO),
    row("G_EXT_CTRLS", abi.v4l2_ext_controls, ALWAYS_COPY),
    row("S_EXT_CTRLS", abi.v4l2_ext_controls, PRIO | ALWAYS_COPY),
    row("TRY_EXT_CTRLS", abi.v4l2_ext_controls, ALWAYS_COPY),
    # events
    row("SUBSCRIBE_EVENT", abi.v4l2_event_subscription),
    row("UNSUBSCRIBE_EVENT", abi.v4l2_event_subscription),
    row("DQEVENT", abi.v4l2_event),
    # buffer queues
    row("REQBUFS", abi.v4l2_requestbuffers, PRIO, buf_type="type"),
    row("CREATE_BUFS", abi.v4l2_create_buffers, PRIO, buf_type="format.type"),
    row("QUERYBUF", abi.v4l2_buffer, clear="length", buf_type="type"),
    row("PREPARE_BUF", abi.v4l2_buffer, buf_type="type"),
    row("QBUF", abi.v4l2_buffer, buf_type="type"),
    row("DQBUF", abi.v4l2_buffer, buf_type="type"),
    row("STREAMON", abi.c_int, PRIO, buf_type="value"),
    row("STREAMOFF", abi.c_int, PRIO, buf_type="value"),
    # M2M encoder commands
    row("TRY_ENCODER_CMD", abi.raw.v4l2_encoder_cmd, clear="flags"),
    row("ENCODER_CMD", abi.raw.v4l2_encoder_cmd, PRIO, clear="flags"),
    # driver-private: the preload shim's (impv4l2/shim/protocol.py)
    row("IMPV4L2_SHIM_INFO", shim.SHIM_INFO_STRUCT, cmd=shim_protocol.VIDIOC_IMPV4L2_SHIM_INFO),
    row("IMPV4L2_SHIM_MMAP", shim.SHIM_MMAP_STRUCT, cmd=shim_protocol.VIDIOC_IMPV4L2_SHIM_MMAP),
)}
