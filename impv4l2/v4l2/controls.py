"""V4L2 controls as data, and the control ioctls.

The ISP's backend-neutral :class:`~impv4l2.driver.base.ControlSpec` names map
to V4L2 control ids through :data:`ISP_CONTROL_MAP`; ranges, steps and
defaults come from the backend.  One :class:`ControlSet` per ISP is shared by
every node of that ISP (brightness set on ``main`` changes ``sub``), and each
node sees the union of its sets through a :class:`ControlView`, which adds
the class controls and answers QUERYCTRL/QUERY_EXT_CTRL/QUERYMENU,
G/S_CTRL and G/S/TRY_EXT_CTRLS.

Driver-private controls (user class, ``V4L2_CID_USER_BASE + 0x1f00`` on):

- **Day/Night** (``V4L2_CID_IMPV4L2_DAY_NIGHT`` = 0x00982800), a menu 0 "Day" /
  1 "Night" (night: IR mode, colour off), plus 2 "Auto" where the backend has a
  light meter (see :mod:`impv4l2.v4l2.daynight`);
- **Day/Night State** (``V4L2_CID_IMPV4L2_DAY_NIGHT_STATE`` = 0x00982801), read-only
  menu Day/Night: what the picture is now (changes, with V4L2_EVENT_CTRL, when Auto
  switches).

Private user-class controls are also reachable the legacy way at
``V4L2_CID_PRIVATE_BASE + n`` (QUERYCTRL), as the kernel does.

Array controls (``dims``: U8/U16/U32 elements, e.g. the motion detection grids)
are served as the kernel serves them: QUERY_EXT_CTRL reports elem_size, elems,
nr_of_dims and dims with HAS_PAYLOAD; they are compound for NEXT_CTRL/NEXT_COMPOUND
enumeration; G/S_CTRL refuse them (EINVAL); G/S/TRY_EXT_CTRLS move the payload
through ``ptr``/``size`` (ENOSPC with the needed size when a G buffer is short).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import array
import math
import threading
from typing import Callable, Iterable, Sequence

from ..driver.base import ControlKind, ControlSpec, Isp
from . import abi

CID = abi.CID
CID_DAY_NIGHT = CID.USER_BASE + 0x1F00
CID_DAY_NIGHT_STATE = CID.USER_BASE + 0x1F01

# element size of array control types
ELEM_SIZE = {abi.CtrlType.U8: 1, abi.CtrlType.U16: 2, abi.CtrlType.U32: 4}
ELEM_CODE = {abi.CtrlType.U8: "B", abi.CtrlType.U16: "H", abi.CtrlType.U32: "I"}  # array module, native
# (no numpy here: the t31 camera runtime has none)


@dataclasses.dataclass(frozen=True)
class CidInfo:
    cid: int
    name: str
    menu: tuple[str, ...] = ()  # V4L2 menu item names by value (overrides backend names)


# ISP control name -> V4L2 control (standard names as the kernel's v4l2_ctrl_get_name).
ISP_CONTROL_MAP: dict[str, CidInfo] = {
    "brightness": CidInfo(CID.BRIGHTNESS, "Brightness"),
    "contrast": CidInfo(CID.CONTRAST, "Contrast"),
    "saturation": CidInfo(CID.SATURATION, "Saturation"),
    "hue": CidInfo(CID.HUE, "Hue"),
    "sharpness": CidInfo(CID.SHARPNESS, "Sharpness"),
    "hflip": CidInfo(CID.HFLIP, "Horizontal Flip"),
    "vflip": CidInfo(CID.VFLIP, "Vertical Flip"),
    "exposure_auto": CidInfo(CID.EXPOSURE_AUTO, "Auto Exposure",
                             ("Auto Mode", "Manual Mode", "Shutter Priority Mode", "Aperture Priority Mode")),
    "exposure": CidInfo(CID.EXPOSURE_ABSOLUTE, "Exposure Time, Absolute"),
    "gain_auto": CidInfo(CID.AUTOGAIN, "Gain, Automatic"),
    "gain": CidInfo(CID.GAIN, "Gain"),
    "power_line_frequency": CidInfo(CID.POWER_LINE_FREQUENCY, "Power Line Frequency",
                                    ("Disabled", "50 Hz", "60 Hz", "Auto")),
    "day_night": CidInfo(CID_DAY_NIGHT, "Day/Night", ("Day", "Night")),
}

CLASS_NAMES = {
    abi.CtrlClass.USER: "User Controls",
    abi.CtrlClass.CAMERA: "Camera Controls",
    abi.CtrlClass.CODEC: "Codec Controls",
    abi.CtrlClass.JPEG: "JPEG Compression Controls",
    abi.CtrlClass.DETECT: "Detection Controls",
}

KIND_TYPE = {
    ControlKind.INTEGER: abi.CtrlType.INTEGER,
    ControlKind.BOOLEAN: abi.CtrlType.BOOLEAN,
    ControlKind.MENU: abi.CtrlType.MENU,
    ControlKind.BUTTON: abi.CtrlType.BUTTON,
}

RW_MASK = abi.CtrlFlag.READ_ONLY | abi.CtrlFlag.WRITE_ONLY


def id2class(cid: int) -> int:
    return cid & 0x0FFF0000


def is_driver_priv(cid: int) -> bool:
    return (cid & 0xFFFF) >= 0x1000


@dataclasses.dataclass
class Control:
    """One V4L2 control: description plus accessors to its backing value."""

    id: int
    type: int
    name: str
    minimum: int
    maximum: int
    step: int
    default: int
    flags: int = 0
    menu: tuple[str | None, ...] = ()  # names by value; None = skipped item
    get: Callable[[], int] = lambda: 0  # arrays: bytes of all elements
    set: Callable[[int], None] = lambda v: None
    dims: tuple[int, ...] = ()  # array controls: up to 4 dimensions

    @property
    def is_array(self) -> bool:
        return bool(self.dims)

    @property
    def elems(self) -> int:
        return math.prod(self.dims) if self.dims else 1

    @property
    def elem_size(self) -> int:
        return ELEM_SIZE.get(self.type, 4)

    @property
    def payload_size(self) -> int:
        return self.elems * self.elem_size

    def default_payload(self) -> bytes:
        return array.array(ELEM_CODE[self.type], [self.default]).tobytes() * self.elems

    def menu_name(self, index: int) -> str | None:
        if self.type != abi.CtrlType.MENU or not (self.minimum <= index <= self.maximum):
            return None
        return self.menu[index] if index < len(self.menu) else None

    def check(self, value: int) -> int:
        """Validate a new value: ERANGE out of range, EINVAL skipped menu item;
        integers round to the nearest step."""
        if self.type in (abi.CtrlType.BUTTON,):
            return 0
        if self.is_array:
            a = array.array(ELEM_CODE[self.type])
            a.frombytes(bytes(value)[: self.payload_size])
            if a and (min(a) < self.minimum or max(a) > self.maximum):
                raise OSError(errno.ERANGE, f"{self.name}: element outside {self.minimum}..{self.maximum}")
            return bytes(value)
        if not self.minimum <= value <= self.maximum:
            raise OSError(errno.ERANGE, f"{self.name}: {value} outside {self.minimum}..{self.maximum}")
        if self.type == abi.CtrlType.MENU and self.menu_name(value) is None:
            raise OSError(errno.EINVAL, f"{self.name}: no menu item {value}")
        if self.type == abi.CtrlType.INTEGER and self.step > 1:
            value = self.minimum + (value - self.minimum + self.step // 2) // self.step * self.step
            value = min(value, self.maximum)
        return value


Listener = Callable[[Control, int, object], None]  # (control, new value, origin handle)


class ControlSet:
    """Controls of one owner (an ISP, an encoder) shared by every node using them.

    Setting a control notifies all listeners (nodes), which turn it into
    V4L2_EVENT_CTRL for their subscribed handles.
    """

    def __init__(self, controls: Iterable[Control] = ()):
        self.lock = threading.RLock()
        self.controls: dict[int, Control] = {c.id: c for c in controls}
        self._listeners: list[Listener] = []

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def apply(self, ctrl: Control, value: int, origin: object) -> None:
        """Set an already validated value; notify listeners if it changed."""
        with self.lock:
            old = ctrl.get()
            ctrl.set(value)
        if old != value:
            self.notify(ctrl, value, origin)

    def notify(self, ctrl: Control, value, origin: object = None) -> None:
        """Tell the listeners a control's value changed (also a read-only one the
        owner changed itself)."""
        for fn in list(self._listeners):
            fn(ctrl, value, origin)


def isp_control_set(isp: Isp, skip: Sequence[str] = ()) -> ControlSet:
    """V4L2 controls of an ISP: every spec with an entry in ISP_CONTROL_MAP (but ``skip``)."""
    ctrls = []
    for spec in isp.controls:
        info = ISP_CONTROL_MAP.get(spec.name)
        if info is None or spec.name in skip:
            continue
        ctrls.append(_from_spec(isp, spec, info))
    return ControlSet(ctrls)


def _from_spec(isp: Isp, spec: ControlSpec, info: CidInfo) -> Control:
    type_ = KIND_TYPE[spec.kind]
    flags = abi.CtrlFlag.SLIDER if type_ == abi.CtrlType.INTEGER else 0
    menu: tuple[str | None, ...] = ()
    step = spec.step
    if type_ == abi.CtrlType.MENU:
        names = info.menu or tuple(n.title() for n in spec.menu)
        # backend menu items are indexed minimum..maximum
        menu = tuple(names[i] if i < len(names) and i >= spec.minimum else None
                     for i in range(spec.maximum + 1))
        step = 1
    if type_ == abi.CtrlType.BUTTON:
        flags = abi.CtrlFlag.WRITE_ONLY | abi.CtrlFlag.EXECUTE_ON_WRITE
    name = spec.name
    return Control(info.cid, type_, info.name, spec.minimum, spec.maximum, max(step, 1)
                   if type_ != abi.CtrlType.BUTTON else 0, spec.default, flags, menu,
                   get=lambda: isp.get(name), set=lambda v: isp.set(name, v))


class ControlView:
    """The controls a node shows: the union of control sets plus class controls."""

    def __init__(self, sets: Sequence[ControlSet]):
        self.sets = list(sets)
        self.owner: dict[int, ControlSet] = {}
        by_id: dict[int, Control] = {}
        for cs in self.sets:
            for c in cs.controls.values():
                by_id[c.id] = c
                self.owner[c.id] = cs
        for cls in sorted({id2class(i) for i in by_id}):
            cc = Control(cls | 1, abi.CtrlType.CTRL_CLASS, CLASS_NAMES.get(cls, "Controls"),
                         0, 0, 0, 0, abi.CtrlFlag.READ_ONLY | abi.CtrlFlag.WRITE_ONLY)
            by_id[cc.id] = cc
        self.by_id = by_id
        self.ids = sorted(by_id)
        self.priv_user = [i for i in self.ids
                          if id2class(i) == abi.CtrlClass.USER and is_driver_priv(i)
                          and by_id[i].type != abi.CtrlType.CTRL_CLASS]
        self.classes = {id2class(i) for i in self.ids}

    def add_listener(self, fn: Listener) -> None:
        for cs in self.sets:
            cs.add_listener(fn)

    def remove_listener(self, fn: Listener) -> None:
        for cs in self.sets:
            cs.remove_listener(fn)

    # ------------------------------------------------------------ lookup

    def find(self, cid: int) -> Control:
        """The control of ``cid``; legacy ids from V4L2_CID_PRIVATE_BASE name the driver-private
        user controls in order (the kernel's find_private_ref)."""
        c = self.by_id.get(cid)
        if c is None:
            n = cid - abi.CID_PRIVATE_BASE
            if 0 <= n < len(self.priv_user):
                return self.by_id[self.priv_user[n]]
            raise OSError(errno.EINVAL, f"unknown control 0x{cid:08x}")
        return c

    def find_query(self, qid: int) -> tuple[Control, int]:
        """Resolve a QUERYCTRL id with NEXT_CTRL/NEXT_COMPOUND/PRIVATE_BASE;
        returns the control and the id to report."""
        flags = qid & (abi.CtrlFlag.NEXT_CTRL | abi.CtrlFlag.NEXT_COMPOUND)
        cid = qid & abi.CTRL_ID_MASK
        if flags:
            # NEXT_CTRL alone: regular controls; NEXT_COMPOUND alone: compound (array)
            # ones; both: all (the kernel's v4l2_query_ext_ctrl).
            both = abi.CtrlFlag.NEXT_CTRL | abi.CtrlFlag.NEXT_COMPOUND
            compound = None if flags == both else flags == abi.CtrlFlag.NEXT_COMPOUND
            for i in self.ids:
                if i > cid and (compound is None or self.by_id[i].is_array == compound):
                    return self.by_id[i], i
            raise OSError(errno.EINVAL, "no more controls")
        return self.find(cid), cid

    # ------------------------------------------------------------ ioctls

    def queryctrl(self, q: abi.v4l2_queryctrl | abi.v4l2_query_ext_ctrl) -> None:
        """QUERYCTRL; QUERY_EXT_CTRL shares the leading fields."""
        c, rid = self.find_query(q.id)
        abi.zero(q)
        q.id = rid
        q.type = c.type
        abi.set_str(q, "name", c.name)
        if not c.is_array or isinstance(q, abi.v4l2_query_ext_ctrl):  # QUERYCTRL: 0 for arrays
            q.minimum, q.maximum, q.step, q.default_value = c.minimum, c.maximum, c.step, c.default
        q.flags = c.flags | (abi.CtrlFlag.HAS_PAYLOAD if c.is_array else 0)

    def query_ext_ctrl(self, q: abi.v4l2_query_ext_ctrl) -> None:
        self.queryctrl(q)
        c = self.by_id[q.id] if q.id in self.by_id else self.find(q.id)
        q.elem_size = c.elem_size
        q.elems = c.elems
        q.nr_of_dims = len(c.dims)
        for i, d in enumerate(c.dims):
            q.dims[i] = d

    def querymenu(self, q: abi.v4l2_querymenu) -> None:
        c = self.find(q.id)
        name = c.menu_name(q.index)
        if name is None:
            raise OSError(errno.EINVAL, f"{c.name}: no menu item {q.index}")
        cid, index = q.id, q.index
        abi.zero(q)
        q.id, q.index = cid, index
        abi.set_str(q, "name", name)

    def g_ctrl(self, s: abi.v4l2_control) -> None:
        c = self.find(s.id)
        if c.is_array:
            raise OSError(errno.EINVAL, f"{c.name} is an array: use G_EXT_CTRLS")
        if c.flags & abi.CtrlFlag.WRITE_ONLY or c.type == abi.CtrlType.CTRL_CLASS:
            raise OSError(errno.EACCES, f"{c.name} is write-only")
        s.value = c.get()

    def s_ctrl(self, s: abi.v4l2_control, origin: object) -> None:
        c = self.find(s.id)
        if c.is_array:
            raise OSError(errno.EINVAL, f"{c.name} is an array: use S_EXT_CTRLS")
        if c.flags & abi.CtrlFlag.READ_ONLY:
            raise OSError(errno.EACCES, f"{c.name} is read-only")
        value = c.check(s.value)
        self.owner[c.id].apply(c, value, origin)
        s.value = value

    def ext_ctrls(self, kind: str, s: abi.v4l2_ext_controls, mem, origin: object) -> None:
        """G/S/TRY_EXT_CTRLS (``kind`` is "get", "set" or "try")."""
        which = s.which
        count = s.count
        s.error_idx = count
        s.reserved[0] = 0
        if which not in (abi.CTRL_WHICH_CUR_VAL, abi.CTRL_WHICH_DEF_VAL) and which not in self.classes:
            # also REQUEST_VAL: no request API
            raise OSError(errno.EINVAL, f"invalid which 0x{which:08x}")
        if which == abi.CTRL_WHICH_DEF_VAL and kind != "get":
            raise OSError(errno.EINVAL, "cannot set default values")
        if count == 0:
            return
        if count > 1024:
            raise OSError(errno.EINVAL, f"too many controls ({count})")
        size = count * ctypes.sizeof(abi.v4l2_ext_control)
        addr = ctypes.cast(s.controls, ctypes.c_void_p).value or 0
        mem.require(reads=[(addr, size)], writes=[(addr, size)])
        buf = bytearray(mem.read(addr, size))
        arr = (abi.v4l2_ext_control * count).from_buffer(buf)

        def fail(i: int, code: int, msg: str) -> OSError:
            s.error_idx = i if kind == "try" else count
            return OSError(code, msg)

        # Validation pass: nothing is applied unless every control is valid.
        new: list[tuple[Control, int | bytes]] = []
        found: list[Control] = []
        payloads: list[tuple[int, int]] = []  # (user address, bytes) of array controls
        for i, e in enumerate(arr):
            try:
                c = self.find(e.id)
            except OSError as ex:
                raise fail(i, ex.errno, ex.strerror) from None
            found.append(c)
            if which and which != abi.CTRL_WHICH_DEF_VAL and id2class(c.id) != which:
                raise fail(i, errno.EINVAL, f"{c.name} not in class 0x{which:08x}")
            if c.is_array:
                need = c.payload_size
                if e.size < need:
                    if kind == "get":  # the application asks the size this way
                        e.size = need
                        mem.write(addr, bytes(buf))
                    raise fail(i, errno.ENOSPC, f"{c.name}: size {e.size} < {need}")
                e.size = need
                payloads.append((ctypes.cast(e.ptr, ctypes.c_void_p).value or 0, need))
            if kind == "get":
                if c.flags & abi.CtrlFlag.WRITE_ONLY or c.type == abi.CtrlType.CTRL_CLASS:
                    raise fail(i, errno.EACCES, f"{c.name} is write-only")
                continue
            if c.flags & abi.CtrlFlag.READ_ONLY:
                raise fail(i, errno.EACCES, f"{c.name} is read-only")
        if payloads:
            mem.require(**({"writes": payloads} if kind == "get" else {"reads": payloads}))
        if kind != "get":
            for i, (e, c) in enumerate(zip(arr, found)):
                value = mem.read(*payloads.pop(0)) if c.is_array else e.value
                try:
                    new.append((c, c.check(value)))
                except OSError as ex:
                    raise fail(i, ex.errno, ex.strerror) from None
        if kind == "get":
            for e, c in zip(arr, found):
                if c.is_array:
                    data = c.default_payload() if which == abi.CTRL_WHICH_DEF_VAL else c.get()
                    mem.write(ctypes.cast(e.ptr, ctypes.c_void_p).value or 0, data)
                else:
                    e.value = c.default if which == abi.CTRL_WHICH_DEF_VAL else c.get()
        else:
            for e, (c, v) in zip(arr, new):
                if not c.is_array:
                    e.value = v
            if kind == "set":
                for i, (c, v) in enumerate(new):
                    try:
                        self.owner[c.id].apply(c, v, origin)
                    except OSError:
                        s.error_idx = i
                        raise
        mem.write(addr, bytes(buf))
