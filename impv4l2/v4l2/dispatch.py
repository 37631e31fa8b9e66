"""The V4L2 core: the generic treatment of an ioctl before a node's operation sees it.

Modelled on the kernel's ``v4l2-ioctl.c``: :mod:`impv4l2.v4l2.ioctls` holds the one table
(``v4l2_ioctls[]``), whose :class:`Row` names the struct, the flags and the operation;
:func:`call` does what ``video_usercopy``/``__video_do_ioctl`` do for every command:

* ENOTTY unless the handle's class has the row's operation (``determine_valid_ioctls``);
* EIO once the handle is dead (an encoder session that failed);
* a read-only command's struct zeroed; INFO_FL_CLEAR: the input cleared after the named field;
* INFO_FL_PRIO: EBUSY when another handle holds a higher priority;
* the buffer type validated against the node's queues (``check_fmt``);
* INFO_FL_ALWAYS_COPY: the struct goes back to the caller even when the call fails;
* errors logged with the node and pid, unexpected exceptions turned into EIO.

Operations are handle methods named ``vidioc_<name>`` taking ``(struct, mem)``; they do
no generic checks.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
from typing import Callable

from ..fileops import NeedMemory, WouldBlock
from ..ioc import NATIVE, WRITE
from . import abi

log = logging.getLogger("impv4l2.v4l2")

# Row flags (the kernel's INFO_FL_*).
PRIO = 1 << 0  # refused while another handle holds a higher priority
ALWAYS_COPY = 1 << 1  # the struct is copied back on failure too (error_idx)
SEL = 1 << 2  # the selection API's buffer type: the single-planar name stands for the MPLANE queue

_MPLANE = {abi.BufType.VIDEO_OUTPUT: abi.BufType.VIDEO_OUTPUT_MPLANE,
           abi.BufType.VIDEO_CAPTURE: abi.BufType.VIDEO_CAPTURE_MPLANE}


@dataclasses.dataclass(frozen=True)
class Row:
    """One ioctl: its number, struct, flags and the handle operation it calls."""

    cmd: int
    name: str  # "VIDIOC_S_FMT"
    struct: type | None  # ctypes type laid over the argument bytes (zero copy)
    flags: int = 0
    clear_at: int = 0  # INFO_FL_CLEAR: the input bytes from here on are zeroed (0: none)
    buf_type: tuple[str, ...] = ()  # attribute path of the buffer type to validate
    read_only: bool = False  # _IOR: nothing comes in, the struct starts zeroed

    @property
    def op(self) -> str:
        return "vidioc_" + self.name[len("VIDIOC_"):].lower()

    def buffer_type(self, s) -> int:
        for attr in self.buf_type:
            s = getattr(s, attr)
        return s if isinstance(s, int) else s.value


def row(name: str, struct: type | None = None, flags: int = 0, *, clear: str | None = None,
        buf_type: str | None = None, cmd: int | None = None) -> Row:
    """A table row for VIDIOC_<name> (``cmd`` gives a driver-private ioctl's number).

    ``clear`` names the last input field (INFO_FL_CLEAR(struct, field)); ``buf_type`` the
    field holding the buffer type, dotted ("format.type"), or "value" for a bare int.
    Every row's struct must be as large as its number says."""
    cmd = abi.VIDIOC[name] if cmd is None else cmd
    clear_at = 0
    if struct is not None:
        assert ctypes.sizeof(struct) == abi.ioc_size(cmd), (name, ctypes.sizeof(struct))
        if clear is not None:
            f = getattr(struct, clear)
            clear_at = f.offset + f.size
    read_only = struct is not None and not NATIVE.dir_flags(cmd) & WRITE
    return Row(cmd, "VIDIOC_" + name, struct, flags, clear_at,
               tuple(buf_type.split(".")) if buf_type else (), read_only)


def operations(table: dict[int, Row], cls: type) -> dict[int, tuple[Row, Callable]]:
    """cmd -> (row, operation) for the rows a handle class implements (cached on the class)."""
    ops = cls.__dict__.get("_v4l2_ops")
    if ops is None:
        ops = {cmd: (r, fn) for cmd, r in table.items() if (fn := getattr(cls, r.op, None)) is not None}
        cls._v4l2_ops = ops
    return ops


def _type_ok(r: Row, t: int, types: frozenset[int]) -> bool:
    return t in types or (bool(r.flags & SEL) and _MPLANE.get(t) in types)


def call(table: dict[int, Row], h, cmd: int, arg: bytearray, mem) -> int:
    """Run ioctl ``cmd`` on handle ``h`` (a :class:`~impv4l2.v4l2.node.NodeHandle`):
    the result (0, or a negative errno for an ALWAYS_COPY failure) or OSError."""
    node = h.node
    entry = operations(table, type(h)).get(cmd)
    if entry is None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s pid %d: %s: ENOTTY", node.name, h.caller.pid, abi.ioctl_name(cmd))
        raise OSError(errno.ENOTTY, f"{abi.ioctl_name(cmd)} not supported")
    r, fn = entry
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s pid %d: %s", node.name, h.caller.pid, r.name)
    try:
        if h.fatal:
            raise OSError(errno.EIO, f"{node.name} failed: {h.fatal}")
        s = None
        if r.struct is not None:
            s = r.struct.from_buffer(arg)
            if r.read_only:
                ctypes.memset(ctypes.addressof(s), 0, len(arg))
            elif r.clear_at:
                ctypes.memset(ctypes.addressof(s) + r.clear_at, 0, len(arg) - r.clear_at)
        if r.flags & PRIO and h.prio < node.max_prio():
            raise OSError(errno.EBUSY, "another handle has a higher priority")
        if r.buf_type:
            t = r.buffer_type(s)
            if not _type_ok(r, t, node.buf_types):
                raise OSError(errno.EINVAL, f"buffer type {t} not supported")
        return fn(h, s, mem) or 0
    except (WouldBlock, NeedMemory):
        raise
    except OSError as ex:
        level = logging.DEBUG if ex.errno in (errno.EINVAL, errno.ENOTTY, errno.EAGAIN) else logging.INFO
        log.log(level, "%s pid %d: %s: %s (%s)", node.name, h.caller.pid, r.name,
                errno.errorcode.get(ex.errno or 0, ex.errno), ex.strerror)
        if r.flags & ALWAYS_COPY and ex.errno:
            # A negative result (not an error reply) makes the transport copy the struct
            # back: the caller needs error_idx (the kernel's INFO_FL_ALWAYS_COPY).
            return -ex.errno
        raise
    except Exception:
        log.exception("%s pid %d: %s failed", node.name, h.caller.pid, r.name)
        raise OSError(errno.EIO, f"{r.name}: internal error") from None
