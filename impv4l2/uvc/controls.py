"""UVC camera-terminal and processing-unit controls answered from the node's V4L2 controls.

One table row per UVC control: its unit, selector, bit in the unit's bmControls, wire size and
signedness, the V4L2 control it maps to, and value conversions where the encodings differ (the
auto-exposure mode is a bitmap in UVC and a menu in V4L2).  The host only asks for controls
whose bmControls bit the descriptors set; 6.1's configfs fixes those bitmaps (read-only
attributes), so :func:`advertised` reads them back and the rest of the table stays dormant.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

from linuxpy.video import raw

from . import abi
from .source import Control, SourceNode

log = logging.getLogger("impv4l2.uvc")
CID = raw.ControlID

# UVC AE mode bitmap (CT_AE_MODE_CONTROL) <-> V4L2_CID_EXPOSURE_AUTO menu, as uvcvideo maps it
_AE_TO_V4L2 = {1: 1, 2: 0, 4: 2, 8: 3}
_AE_FROM_V4L2 = {v: k for k, v in _AE_TO_V4L2.items()}


@dataclasses.dataclass(frozen=True)
class UvcControl:
    """One UVC control and the V4L2 control behind it."""

    unit: str            # "ct" (camera terminal) or "pu" (processing unit)
    selector: int
    bit: int             # in the unit's bmControls
    size: int
    signed: bool
    cid: int
    to_v4l2: Callable[[int], int] = lambda v: v
    to_uvc: Callable[[int], int] = lambda v: v
    res: Callable[[Control], int] | None = None  # GET_RES when it is not the V4L2 step


CONTROLS: tuple[UvcControl, ...] = (
    UvcControl("pu", abi.PU_BRIGHTNESS, 0, 2, True, CID.BRIGHTNESS),
    UvcControl("pu", abi.PU_CONTRAST, 1, 2, False, CID.CONTRAST),
    UvcControl("pu", abi.PU_HUE, 2, 2, True, CID.HUE),
    UvcControl("pu", abi.PU_SATURATION, 3, 2, False, CID.SATURATION),
    UvcControl("pu", abi.PU_SHARPNESS, 4, 2, False, CID.SHARPNESS),
    UvcControl("pu", abi.PU_GAIN, 9, 2, False, CID.GAIN),
    UvcControl("pu", abi.PU_POWER_LINE, 10, 1, False, CID.POWER_LINE_FREQUENCY),
    UvcControl("ct", abi.CT_AE_MODE_CONTROL, 1, 1, False, CID.EXPOSURE_AUTO,
               to_v4l2=lambda v: _AE_TO_V4L2.get(v, 0), to_uvc=lambda v: _AE_FROM_V4L2.get(v, 2),
               res=lambda c: sum(_AE_FROM_V4L2[v] for v in range(c.minimum, c.maximum + 1) if v in _AE_FROM_V4L2)),
)


def read_bitmap(p: Path) -> int:
    """A configfs bmControls attribute (one byte per line, first byte lowest) as an int."""
    try:
        return sum(int(b, 0) << (8 * i) for i, b in enumerate(p.read_text().split()))
    except (OSError, ValueError):
        return 0


def advertised(func: Path) -> tuple[dict[str, int], int, int]:
    """({unit: bmControls}, camera terminal id, processing unit id) from the UVC function's configfs."""
    ct, pu = func / "control/terminal/camera/default", func / "control/processing/default"

    def ident(p: Path, default: int) -> int:
        try:
            return int(p.read_text())
        except (OSError, ValueError):
            return default

    return ({"ct": read_bitmap(ct / "bmControls"), "pu": read_bitmap(pu / "bmControls")},
            ident(ct / "bTerminalID", 1), ident(pu / "bUnitID", 2))


class ControlMap:
    """The controls the host may ask for, bound to the node; values in UVC units."""

    def __init__(self, node: SourceNode, func: Path) -> None:
        self.node = node
        bitmaps, self.ct_id, self.pu_id = advertised(func)
        self.entries: dict[tuple[str, int], tuple[UvcControl, Control | None]] = {}
        for c in CONTROLS:
            if bitmaps[c.unit] >> c.bit & 1:
                self.entries[(c.unit, c.selector)] = (c, node.control(c.cid))
        names = [f"{u}:{ctl.name if ctl else hex(c.cid) + '(absent)'}" for (u, _), (c, ctl) in self.entries.items()]
        unmapped = [hex(c.cid) for c in CONTROLS if not bitmaps[c.unit] >> c.bit & 1 and node.control(c.cid)]
        log.info("controls the host sees: %s; node controls the descriptors cannot announce: %s",
                 ", ".join(names) or "none", ", ".join(unmapped) or "none")

    def unit_of(self, entity: int) -> str | None:
        return {self.ct_id: "ct", self.pu_id: "pu"}.get(entity)

    def lookup(self, unit: str, selector: int) -> tuple[UvcControl, Control | None] | None:
        return self.entries.get((unit, selector))

    @staticmethod
    def encode(c: UvcControl, value: int) -> bytes:
        return int(value).to_bytes(c.size, "little", signed=c.signed)

    @staticmethod
    def decode(c: UvcControl, data: bytes) -> int:
        return int.from_bytes(bytes(data[:c.size]), "little", signed=c.signed)

    def value(self, c: UvcControl, ctl: Control, request: int) -> int:
        """The answer to a GET_* request in UVC units (GET_CUR asks the node)."""
        if request == abi.GET_CUR:
            return c.to_uvc(self.node.get_control(c.cid))
        if request == abi.GET_RES:
            return c.res(ctl) if c.res else max(ctl.step, 1)
        if c.res:  # bitmap encodings: min/max/def in UVC terms
            return {abi.GET_MIN: 1, abi.GET_MAX: 0xFF, abi.GET_DEF: c.to_uvc(ctl.default)}[request]
        return {abi.GET_MIN: ctl.minimum, abi.GET_MAX: ctl.maximum, abi.GET_DEF: ctl.default}[request]

    def set(self, c: UvcControl, ctl: Control, value: int) -> bool:
        v = c.to_v4l2(value)
        if not c.res and not ctl.minimum <= v <= ctl.maximum:
            return False
        self.node.set_control(c.cid, v)
        return True
