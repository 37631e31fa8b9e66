"""impv4l2.uvc.protocol in-process: probe/commit negotiation and control requests as uvcvideo
sends them (SETUP, then the data stage of a SET_CUR), against a fake node's controls."""

from __future__ import annotations

import ctypes

from linuxpy.video import raw

from impv4l2.uvc import abi
from impv4l2.uvc.controls import ControlMap
from impv4l2.uvc.gadget import GADGET_FORMATS, StreamFormat
from impv4l2.uvc.protocol import Protocol
from impv4l2.uvc.source import Control, FrameSize


class FakeNode:
    def __init__(self):
        self.values = {raw.ControlID.BRIGHTNESS: 128, raw.ControlID.EXPOSURE_AUTO: 0}

    def control(self, cid):
        if cid == raw.ControlID.BRIGHTNESS:
            return Control(cid, "Brightness", 0, 255, 1, 128)
        if cid == raw.ControlID.EXPOSURE_AUTO:
            return Control(cid, "Auto Exposure", 0, 1, 1, 0)
        return None

    def get_control(self, cid):
        return self.values[cid]

    def set_control(self, cid, v):
        self.values[cid] = v


def _proto(tmp_path):
    pu = tmp_path / "control/processing/default"
    ct = tmp_path / "control/terminal/camera/default"
    pu.mkdir(parents=True)
    ct.mkdir(parents=True)
    (pu / "bmControls").write_text("1\n0\n")  # 6.1's fixed default: brightness only
    (pu / "bUnitID").write_text("2\n")
    (ct / "bmControls").write_text("2\n0\n0\n")  # auto-exposure mode
    (ct / "bTerminalID").write_text("1\n")
    sizes = [FrameSize(1280, 720, (400000, 1000000)), FrameSize(640, 360, (400000,))]
    fmts = [StreamFormat("MJPG", GADGET_FORMATS["MJPG"], sizes, 1),
            StreamFormat("YUYV", GADGET_FORMATS["YUYV"], sizes, 2)]
    node = FakeNode()
    commits = []
    return Protocol(fmts, ControlMap(node, tmp_path), 3072, commits.append), node, commits


def req(request, selector, intf, entity=0, length=2):
    return abi.UsbCtrlRequest(bRequestType=0xA1 if request & 0x80 else 0x21, bRequest=request,
                              wValue=selector << 8, wIndex=entity << 8 | intf, wLength=length)


def test_probe_commit(tmp_path):
    p, _, commits = _proto(tmp_path)
    n = ctypes.sizeof(abi.StreamingControl)
    default = abi.StreamingControl.from_buffer_copy(p.setup(req(abi.GET_DEF, abi.VS_PROBE_CONTROL, 1, length=n)))
    assert (default.bFormatIndex, default.bFrameIndex, default.dwFrameInterval) == (1, 1, 400000)
    assert default.dwMaxPayloadTransferSize == 3072 and default.dwMaxVideoFrameSize == 1280 * 720 * 2
    want = abi.StreamingControl(bFormatIndex=2, bFrameIndex=9, dwFrameInterval=900000)
    assert p.setup(req(abi.SET_CUR, abi.VS_PROBE_CONTROL, 1, length=n)) == n
    assert p.data(bytes(want)) == 0
    got = abi.StreamingControl.from_buffer_copy(p.setup(req(abi.GET_CUR, abi.VS_PROBE_CONTROL, 1, length=n)))
    assert (got.bFormatIndex, got.bFrameIndex, got.dwFrameInterval) == (2, 2, 400000)  # clamped, snapped
    assert got.dwMaxVideoFrameSize == 640 * 360 * 2
    assert not commits
    assert p.setup(req(abi.SET_CUR, abi.VS_COMMIT_CONTROL, 1, length=26)) == 26  # a UVC 1.0 host
    p.data(bytes(abi.StreamingControl(bFormatIndex=1, bFrameIndex=1, dwFrameInterval=1000000))[:26])
    c = commits[-1]
    assert (c.fmt.fourcc, c.size.width, c.interval) == ("MJPG", 1280, 1000000)


def test_controls(tmp_path):
    p, node, _ = _proto(tmp_path)
    assert p.setup(req(abi.GET_INFO, abi.PU_BRIGHTNESS, 0, 2, 1)) == bytes([3])
    assert p.setup(req(abi.GET_MAX, abi.PU_BRIGHTNESS, 0, 2)) == (255).to_bytes(2, "little")
    assert p.setup(req(abi.GET_CUR, abi.PU_BRIGHTNESS, 0, 2)) == (128).to_bytes(2, "little")
    assert p.setup(req(abi.SET_CUR, abi.PU_BRIGHTNESS, 0, 2)) == 2
    assert p.data((200).to_bytes(2, "little")) == 0 and node.values[raw.ControlID.BRIGHTNESS] == 200
    p.setup(req(abi.SET_CUR, abi.PU_BRIGHTNESS, 0, 2))
    assert p.data((999).to_bytes(2, "little")) == abi.STALL  # out of range
    assert p.setup(req(abi.GET_CUR, abi.VC_REQUEST_ERROR_CODE_CONTROL, 0, 0, 1)) == bytes([abi.ERR_OUT_OF_RANGE])
    # contrast is not in 6.1's fixed bmControls: stalled, error code "invalid control"
    assert p.setup(req(abi.GET_INFO, abi.PU_CONTRAST, 0, 2, 1)) == abi.STALL
    assert p.setup(req(abi.GET_CUR, abi.VC_REQUEST_ERROR_CODE_CONTROL, 0, 0, 1)) == bytes([abi.ERR_INVALID_CONTROL])
    # camera terminal auto-exposure mode: UVC bitmap <-> V4L2 menu
    assert p.setup(req(abi.GET_RES, abi.CT_AE_MODE_CONTROL, 0, 1, 1)) == bytes([3])
    assert p.setup(req(abi.GET_CUR, abi.CT_AE_MODE_CONTROL, 0, 1, 1)) == bytes([2])  # auto
    p.setup(req(abi.SET_CUR, abi.CT_AE_MODE_CONTROL, 0, 1, 1))
    assert p.data(bytes([1])) == 0 and node.values[raw.ControlID.EXPOSURE_AUTO] == 1  # manual
    assert p.setup(req(abi.GET_CUR, 0x7F, 0, 9)) == abi.STALL  # no such unit
