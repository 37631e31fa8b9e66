"""The camera side of the gadget: a plain V4L2 client of one of the daemon's capture nodes.

``impv4l2 uvc`` is a separate process that talks to the running daemon only through its node
(the FUSE file /run/impv4l2/videoN, or any path of it), with the ioctls every other client uses:
formats, controls and MMAP streaming.  It never imports the device model or a backend.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import logging
import mmap
import os

from linuxpy.video import raw

from ..v4l2 import abi

log = logging.getLogger("impv4l2.uvc")

CAPTURE = raw.BufType.VIDEO_CAPTURE
MMAP = raw.Memory.MMAP


def fourcc(code: int) -> str:
    return code.to_bytes(4, "little").decode(errors="replace")


def fourcc_code(name: str) -> int:
    return int.from_bytes(name.encode(), "little")


@dataclasses.dataclass(frozen=True)
class FrameSize:
    """One discrete size of a format and its intervals in 100 ns units (UVC's), shortest first."""

    width: int
    height: int
    intervals: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Format:
    """One pixel format of the node with its discrete sizes."""

    fourcc: str
    sizes: tuple[FrameSize, ...]


@dataclasses.dataclass(frozen=True)
class Control:
    """A V4L2 integer/menu/boolean control of the node (QUERYCTRL)."""

    cid: int
    name: str
    minimum: int
    maximum: int
    step: int
    default: int


class NodeError(OSError):
    """The node cannot be opened or does not behave like an impv4l2 capture node."""


class SourceNode:
    """An open capture node: what it offers, its controls, and a stream of frames."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        except OSError as e:
            raise NodeError(e.errno, f"cannot open {path}: {e.strerror} (is `impv4l2 serve` running?)") from None
        cap = raw.v4l2_capability()
        self._ioctl("QUERYCAP", cap)
        if not cap.device_caps & raw.Capability.VIDEO_CAPTURE:
            raise NodeError(0, f"{path} is not a capture node ({cap.card.decode()})")
        self.card = cap.card.decode()
        self.buffers: list[mmap.mmap] = []
        self.streaming = False

    def _ioctl(self, name: str, st: ctypes.Structure) -> None:
        fcntl.ioctl(self.fd, abi.VIDIOC[name], st)

    def close(self) -> None:
        self.stop()
        os.close(self.fd)

    # ------------------------------------------------------------ what it offers

    def formats(self) -> list[Format]:
        out = []
        for i in range(64):
            fd = raw.v4l2_fmtdesc(index=i, type=CAPTURE)
            try:
                self._ioctl("ENUM_FMT", fd)
            except OSError:
                break
            sizes = []
            for j in range(64):
                fs = raw.v4l2_frmsizeenum(index=j, pixel_format=fd.pixelformat)
                try:
                    self._ioctl("ENUM_FRAMESIZES", fs)
                except OSError:
                    break
                if fs.type != raw.Frmsizetypes.DISCRETE:
                    log.warning("%s: %s has non-discrete sizes; skipped", self.path, fourcc(fd.pixelformat))
                    break
                w, h = fs.discrete.width, fs.discrete.height
                sizes.append(FrameSize(w, h, tuple(sorted(self._intervals(fd.pixelformat, w, h)))))
            out.append(Format(fourcc(fd.pixelformat), tuple(sizes)))
        return out

    def _intervals(self, pixfmt: int, w: int, h: int) -> list[int]:
        ivs = []
        for k in range(32):
            fi = raw.v4l2_frmivalenum(index=k, pixel_format=pixfmt, width=w, height=h)
            try:
                self._ioctl("ENUM_FRAMEINTERVALS", fi)
            except OSError:
                break
            if fi.type == raw.Frmivaltypes.DISCRETE and fi.discrete.denominator:
                ivs.append(round(fi.discrete.numerator * 10_000_000 / fi.discrete.denominator))
        return ivs or [333333]

    def control(self, cid: int) -> Control | None:
        q = raw.v4l2_queryctrl(id=cid)
        try:
            self._ioctl("QUERYCTRL", q)
        except OSError:
            return None
        if q.flags & raw.ControlFlag.DISABLED:
            return None
        return Control(cid, q.name.decode(), q.minimum, q.maximum, q.step, q.default_value)

    def get_control(self, cid: int) -> int:
        c = raw.v4l2_control(id=cid)
        self._ioctl("G_CTRL", c)
        return c.value

    def set_control(self, cid: int, value: int) -> None:
        self._ioctl("S_CTRL", raw.v4l2_control(id=cid, value=value))

    # ------------------------------------------------------------ streaming

    def start(self, fmt: str, width: int, height: int, interval_100ns: int, count: int = 4) -> int:
        """S_FMT, S_PARM, MMAP buffers, STREAMON; returns the node's sizeimage."""
        self.stop()
        f = raw.v4l2_format(type=CAPTURE)
        f.fmt.pix.width, f.fmt.pix.height = width, height
        f.fmt.pix.pixelformat = fourcc_code(fmt)
        f.fmt.pix.field = raw.Field.NONE
        self._ioctl("S_FMT", f)
        if (f.fmt.pix.width, f.fmt.pix.height, fourcc(f.fmt.pix.pixelformat)) != (width, height, fmt):
            raise NodeError(0, f"{self.path} gave {fourcc(f.fmt.pix.pixelformat)} "
                            f"{f.fmt.pix.width}x{f.fmt.pix.height} for {fmt} {width}x{height}")
        p = raw.v4l2_streamparm(type=CAPTURE)
        p.parm.capture.timeperframe.numerator = interval_100ns
        p.parm.capture.timeperframe.denominator = 10_000_000
        try:
            self._ioctl("S_PARM", p)
        except OSError as e:
            log.warning("%s: S_PARM: %s", self.path, e)
        rb = raw.v4l2_requestbuffers(count=count, type=CAPTURE, memory=MMAP)
        self._ioctl("REQBUFS", rb)
        for i in range(rb.count):
            b = raw.v4l2_buffer(index=i, type=CAPTURE, memory=MMAP)
            self._ioctl("QUERYBUF", b)
            self.buffers.append(mmap.mmap(self.fd, b.length, mmap.MAP_SHARED, mmap.PROT_READ, offset=b.m.offset))
            self._ioctl("QBUF", b)
        self._ioctl("STREAMON", ctypes.c_int(CAPTURE))
        self.streaming = True
        return f.fmt.pix.sizeimage

    def dequeue(self) -> raw.v4l2_buffer | None:
        """A filled buffer (index, bytesused, timestamp, sequence) or None if none is ready."""
        b = raw.v4l2_buffer(type=CAPTURE, memory=MMAP)
        try:
            self._ioctl("DQBUF", b)
        except BlockingIOError:
            return None
        return b

    def requeue(self, b: raw.v4l2_buffer) -> None:
        self._ioctl("QBUF", b)

    def stop(self) -> None:
        if self.streaming:
            try:
                self._ioctl("STREAMOFF", ctypes.c_int(CAPTURE))
            except OSError as e:
                log.warning("%s: STREAMOFF: %s", self.path, e)
            self.streaming = False
        for m in self.buffers:
            m.close()
        if self.buffers:
            self.buffers.clear()
            try:
                self._ioctl("REQBUFS", raw.v4l2_requestbuffers(count=0, type=CAPTURE, memory=MMAP))
            except OSError as e:
                log.warning("%s: REQBUFS 0: %s", self.path, e)
