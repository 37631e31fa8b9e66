"""The V4L2 ABI as the device model uses it: linuxpy's structs and enums,
ioctl numbers masked to unsigned 32 bits (linuxpy's are signed), their names
for logs, and the few constants linuxpy lacks.

Nothing here redefines a struct linuxpy has; ``raw`` is the source of truth.
"""

from __future__ import annotations

import ctypes

from linuxpy.video import raw

from ..ioc import GENERIC, NATIVE

# ioctl numbers as the transport hands them to us: unsigned, with this process's struct sizes
# (ctypes), in the running machine's _IOC encoding — linuxpy builds asm-generic numbers only.
VIDIOC: dict[str, int] = {name: NATIVE.recode(int(v), GENERIC) for name, v in raw.IOC.__members__.items()
                          if not name.startswith("SUBDEV_")}
IOCTL_NAMES: dict[int, str] = {v: "VIDIOC_" + k for k, v in VIDIOC.items()}
ioc_size = NATIVE.size  # _IOC_SIZE in the running machine's encoding


def ioctl_name(cmd: int) -> str:
    return IOCTL_NAMES.get(cmd, f"ioctl 0x{cmd:08x}")


BufType = raw.BufType
Memory = raw.Memory
Field = raw.Field
Cap = raw.Capability
BufFlag = raw.BufferFlag
CtrlType = raw.CtrlType
CtrlFlag = raw.ControlFlag
CtrlClass = raw.ControlClass
CID = raw.ControlID
EventType = raw.EventType
Priority = raw.Priority
Colorspace = raw.Colorspace
Quantization = raw.Quantization
XferFunc = raw.XferFunc
YcbcrEnc = raw.YcbcrEncoding
PixelFormat = raw.PixelFormat
FmtFlag = raw.ImageFormatFlag

# Constants not in linuxpy.
BUF_CAP_SUPPORTS_MMAP = 1 << 0
BUF_CAP_SUPPORTS_USERPTR = 1 << 1
BUF_CAP_SUPPORTS_DMABUF = 1 << 2
BUF_CAP_SUPPORTS_REQUESTS = 1 << 3
BUF_CAP_SUPPORTS_ORPHANED_BUFS = 1 << 4
BUF_CAP_SUPPORTS_M2M_HOLD_CAPTURE_BUF = 1 << 5
BUF_CAP_SUPPORTS_MMAP_CACHE_HINTS = 1 << 6
BUF_CAP_SUPPORTS_MAX_NUM_BUFFERS = 1 << 7
EVENT_SUB_FL_SEND_INITIAL = 1
EVENT_SUB_FL_ALLOW_FEEDBACK = 2
EVENT_CTRL_CH_VALUE = 1
EVENT_CTRL_CH_FLAGS = 2
EVENT_CTRL_CH_RANGE = 4
EVENT_SRC_CH_RESOLUTION = 1
CID_PRIVATE_BASE = 0x08000000
CTRL_ID_MASK = 0x0FFFFFFF
CTRL_WHICH_CUR_VAL = 0
CTRL_WHICH_DEF_VAL = 0x0F000000
CTRL_WHICH_REQUEST_VAL = 0x0F010000
IN_ST_HFLIP = 0x10
IN_ST_VFLIP = 0x20
KERNEL_VERSION = (6, 1, 0)  # what QUERYCAP reports as the driver version

VIDEO_MAX_PLANES = 8

# Struct classes used by handlers (all from linuxpy).
v4l2_capability = raw.v4l2_capability
v4l2_fmtdesc = raw.v4l2_fmtdesc
v4l2_format = raw.v4l2_format
v4l2_pix_format = raw.v4l2_pix_format
v4l2_pix_format_mplane = raw.v4l2_pix_format_mplane
v4l2_requestbuffers = raw.v4l2_requestbuffers
v4l2_create_buffers = raw.v4l2_create_buffers
v4l2_buffer = raw.v4l2_buffer
v4l2_plane = raw.v4l2_plane
v4l2_streamparm = raw.v4l2_streamparm
v4l2_input = raw.v4l2_input
v4l2_control = raw.v4l2_control
v4l2_ext_control = raw.v4l2_ext_control
v4l2_ext_controls = raw.v4l2_ext_controls
v4l2_queryctrl = raw.v4l2_queryctrl
v4l2_query_ext_ctrl = raw.v4l2_query_ext_ctrl
v4l2_querymenu = raw.v4l2_querymenu
v4l2_frmsizeenum = raw.v4l2_frmsizeenum
v4l2_frmivalenum = raw.v4l2_frmivalenum
v4l2_event = raw.v4l2_event
v4l2_event_subscription = raw.v4l2_event_subscription
c_int = ctypes.c_int
c_uint = ctypes.c_uint32


def zero(s: ctypes.Structure) -> None:
    """Clear a struct in place (reserved fields must read back as zeros)."""
    ctypes.memset(ctypes.addressof(s), 0, ctypes.sizeof(s))


def set_str(s: ctypes.Structure, field: str, text: str) -> None:
    setattr(s, field, text.encode()[: getattr(type(s), field).size - 1])


def kernel_version() -> int:
    a, b, c = KERNEL_VERSION
    return (a << 16) | (b << 8) | c
