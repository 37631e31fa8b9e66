"""The UVC class-request state machine: probe/commit negotiation and control requests.

Pure logic (no file descriptors): :meth:`Protocol.setup` takes a SETUP packet and returns the
response (bytes, or :data:`abi.STALL`); a SET_CUR's data stage arrives later through
:meth:`Protocol.data`.  Requests are dispatched through a table keyed by (target, selector), where
the target is the control interface itself ("vc"), one of its units ("ct", "pu") or the
streaming interface ("vs").  A stall records bRequestErrorCode, which the host then reads with
VC_REQUEST_ERROR_CODE_CONTROL (UVC 1.1 §4.2.1.2).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from typing import Callable

from . import abi
from .controls import ControlMap
from .gadget import StreamFormat

log = logging.getLogger("impv4l2.uvc")

CONTROL_INTERFACE, STREAMING_INTERFACE = 0, 1  # the gadget has this one function: interfaces 0 and 1
Response = "bytes | int"


@dataclasses.dataclass(frozen=True)
class Committed:
    """The stream the host committed: format, frame (1-based) and interval in 100 ns units."""

    fmt: StreamFormat
    frame: int
    interval: int
    max_frame_size: int

    @property
    def size(self):
        return self.fmt.frames[self.frame - 1]


class Protocol:
    """Answers the host's class requests for one gadget."""

    def __init__(self, formats: list[StreamFormat], controls: ControlMap, max_payload: int,
                 on_commit: Callable[[Committed], None] = lambda c: None) -> None:
        self.formats = formats
        self.controls = controls
        self.max_payload = max_payload
        self.on_commit = on_commit
        self.probe = self._fill(abi.StreamingControl(bFormatIndex=formats[0].index, bFrameIndex=1))
        self.commit = self._fill(abi.StreamingControl(bFormatIndex=formats[0].index, bFrameIndex=1))
        self.committed: Committed | None = None
        self.error = abi.ERR_NONE
        self.pending: Callable[[bytes], int] | None = None  # what the next DATA event completes
        self.handlers: dict[tuple[str, int], Callable[[int, int], "Response"]] = {
            ("vc", abi.VC_REQUEST_ERROR_CODE_CONTROL): self._error_code,
            ("vs", abi.VS_PROBE_CONTROL): lambda req, n: self._streaming(self.probe, req, n, commit=False),
            ("vs", abi.VS_COMMIT_CONTROL): lambda req, n: self._streaming(self.commit, req, n, commit=True),
        }

    # ------------------------------------------------------------ entry points

    def setup(self, req: abi.UsbCtrlRequest) -> "Response":
        """The response to one SETUP (bytes for a GET or the data-stage length ack for a SET)."""
        if req.bRequestType & abi.USB_TYPE_MASK != abi.USB_TYPE_CLASS or \
                req.bRequestType & abi.USB_RECIP_MASK != abi.USB_RECIP_INTERFACE:
            log.warning("unexpected request type 0x%02x", req.bRequestType)
            return abi.STALL
        intf, entity, selector = req.wIndex & 0xFF, req.wIndex >> 8, req.wValue >> 8
        if intf == STREAMING_INTERFACE:
            target = "vs"
        elif intf == CONTROL_INTERFACE:
            target = "vc" if entity == 0 else self.controls.unit_of(entity)
        else:
            target = None
        log.debug("%s %s selector 0x%02x len %d", abi.REQUEST_NAMES.get(req.bRequest, hex(req.bRequest)),
                  target, selector, req.wLength)
        handler = self.handlers.get((target, selector))
        if handler is None and target in ("ct", "pu"):
            handler = self._control_handler(target, selector)
        if handler is None:
            return self._stall(abi.ERR_INVALID_CONTROL if target else abi.ERR_INVALID_UNIT)
        resp = handler(req.bRequest, req.wLength)
        if isinstance(resp, bytes):
            self.error = abi.ERR_NONE
            return resp[:req.wLength]
        return resp

    def data(self, payload: bytes) -> int:
        """A SET_CUR's data stage; returns 0 or :data:`abi.STALL`."""
        pending, self.pending = self.pending, None
        if pending is None:
            log.warning("data stage with no SET_CUR pending")
            return abi.STALL
        return pending(payload)

    def _stall(self, code: int) -> int:
        self.error = code
        return abi.STALL

    # ------------------------------------------------------------ handlers

    def _error_code(self, req: int, n: int) -> "Response":
        if req == abi.GET_CUR:
            return bytes([self.error])
        if req == abi.GET_INFO:
            return bytes([abi.INFO_GET])
        return self._stall(abi.ERR_INVALID_REQUEST)

    def _set(self, n: int, apply: Callable[[bytes], int]) -> "Response":
        self.pending = apply
        return n  # ack: the gadget then receives n bytes and sends them as UVC_EVENT_DATA

    def _control_handler(self, unit: str, selector: int):
        entry = self.controls.lookup(unit, selector)
        if entry is None:
            return None
        c, ctl = entry
        cm = self.controls

        def handle(req: int, n: int) -> "Response":
            if ctl is None:  # advertised by the fixed descriptors but the node lacks it
                return self._stall(abi.ERR_INVALID_CONTROL)
            if req == abi.GET_INFO:
                return bytes([abi.INFO_GET | abi.INFO_SET])
            if req == abi.GET_LEN:
                return c.size.to_bytes(2, "little")
            if req == abi.SET_CUR:
                def apply(data: bytes) -> int:
                    try:
                        ok = cm.set(c, ctl, cm.decode(c, data))
                    except OSError as e:
                        log.warning("setting %s: %s", ctl.name, e)
                        ok = False
                    return 0 if ok else self._stall(abi.ERR_OUT_OF_RANGE)
                return self._set(n, apply)
            try:
                return cm.encode(c, cm.value(c, ctl, req))
            except KeyError:
                return self._stall(abi.ERR_INVALID_REQUEST)
            except OSError as e:
                log.warning("reading %s: %s", ctl.name, e)
                return self._stall(abi.ERR_NOT_READY)
        return handle

    def _streaming(self, block: abi.StreamingControl, req: int, n: int, commit: bool) -> "Response":
        if req == abi.SET_CUR:
            def apply(data: bytes) -> int:
                got = abi.StreamingControl()
                ctypes.memmove(ctypes.addressof(got), bytes(data), min(len(data), ctypes.sizeof(got)))
                self._negotiate(block, got)
                if commit:
                    self._commit(block)
                return 0
            return self._set(n, apply)
        if req == abi.GET_CUR:
            return bytes(block)
        if req in (abi.GET_MIN, abi.GET_DEF):
            return bytes(self._fill(abi.StreamingControl(bFormatIndex=self.formats[0].index, bFrameIndex=1)))
        if req == abi.GET_MAX:
            last = self.formats[-1]
            return bytes(self._fill(abi.StreamingControl(bFormatIndex=last.index, bFrameIndex=len(last.frames))))
        if req == abi.GET_INFO:
            return bytes([abi.INFO_GET | abi.INFO_SET])
        if req == abi.GET_LEN:
            return ctypes.sizeof(abi.StreamingControl).to_bytes(2, "little")
        return self._stall(abi.ERR_INVALID_REQUEST)

    # ------------------------------------------------------------ negotiation

    def _format(self, index: int) -> StreamFormat:
        return next((f for f in self.formats if f.index == index), self.formats[0])

    def _fill(self, b: abi.StreamingControl, interval: int = 0) -> abi.StreamingControl:
        """Clamp format/frame to what exists, snap the interval, fill the sizes the host reads."""
        f = self._format(b.bFormatIndex)
        fi = min(max(b.bFrameIndex, 1), len(f.frames))
        ivs = f.frames[fi - 1].intervals
        iv = min(ivs, key=lambda x: abs(x - interval)) if interval else ivs[0]
        b.bFormatIndex, b.bFrameIndex, b.dwFrameInterval = f.index, fi, iv
        b.dwMaxVideoFrameSize = f.frame_bytes(fi)
        b.dwMaxPayloadTransferSize = self.max_payload
        b.bmFramingInfo = 3  # FID and EOF in every payload header (f_uvc sets both)
        b.bPreferedVersion = b.bMinVersion = b.bMaxVersion = 1
        return b

    def _negotiate(self, block: abi.StreamingControl, got: abi.StreamingControl) -> None:
        ctypes.memmove(ctypes.addressof(block), ctypes.addressof(got), ctypes.sizeof(block))
        self._fill(block, got.dwFrameInterval)

    def commit_current(self) -> Committed:
        """Commit the current commit block as it stands (a host that streams without committing)."""
        self._commit(self.commit)
        return self.committed

    def _commit(self, block: abi.StreamingControl) -> None:
        f = self._format(block.bFormatIndex)
        self.committed = Committed(f, block.bFrameIndex, block.dwFrameInterval, block.dwMaxVideoFrameSize)
        s = self.committed.size
        log.info("host committed %s %dx%d at %.2f fps", f.fourcc, s.width, s.height,
                 10_000_000 / block.dwFrameInterval)
        self.on_commit(self.committed)
