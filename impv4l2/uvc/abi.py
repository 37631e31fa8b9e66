"""The UVC gadget ABI: include/uapi/linux/usb/g_uvc.h (events and UVCIOC_SEND_RESPONSE on the
gadget's V4L2 output node), the USB control request, and the UVC 1.1 class-request codes,
selectors and the probe/commit block (UVC 1.1 spec §4.2, §4.3.1.1).
"""

from __future__ import annotations

import ctypes

from ..ioc import NATIVE

# g_uvc.h: V4L2_EVENT_PRIVATE_START + n
EVENT_PRIVATE_START = 0x08000000
EVENT_CONNECT = EVENT_PRIVATE_START + 0
EVENT_DISCONNECT = EVENT_PRIVATE_START + 1
EVENT_STREAMON = EVENT_PRIVATE_START + 2
EVENT_STREAMOFF = EVENT_PRIVATE_START + 3
EVENT_SETUP = EVENT_PRIVATE_START + 4
EVENT_DATA = EVENT_PRIVATE_START + 5
EVENTS = (EVENT_CONNECT, EVENT_DISCONNECT, EVENT_STREAMON, EVENT_STREAMOFF, EVENT_SETUP, EVENT_DATA)
EVENT_NAMES = {EVENT_CONNECT: "CONNECT", EVENT_DISCONNECT: "DISCONNECT", EVENT_STREAMON: "STREAMON",
               EVENT_STREAMOFF: "STREAMOFF", EVENT_SETUP: "SETUP", EVENT_DATA: "DATA"}

# f_uvc stalls ep0 when the response length is negative (uvc_send_response); uvc-gadget uses this.
STALL = -51  # -EL2HLT


class UsbCtrlRequest(ctypes.LittleEndianStructure):
    """struct usb_ctrlrequest (ch9.h): the SETUP packet in a UVC_EVENT_SETUP."""

    _pack_ = 1
    _fields_ = [("bRequestType", ctypes.c_uint8), ("bRequest", ctypes.c_uint8),
                ("wValue", ctypes.c_uint16), ("wIndex", ctypes.c_uint16), ("wLength", ctypes.c_uint16)]


class UvcRequestData(ctypes.Structure):
    """struct uvc_request_data: a response (SEND_RESPONSE) or the data stage (UVC_EVENT_DATA)."""

    _fields_ = [("length", ctypes.c_int32), ("data", ctypes.c_uint8 * 60)]


UVCIOC_SEND_RESPONSE = NATIVE.IOW("U", 1, ctypes.sizeof(UvcRequestData))

USB_TYPE_MASK = 0x60
USB_TYPE_CLASS = 0x20
USB_RECIP_MASK = 0x1F
USB_RECIP_INTERFACE = 0x01

# UVC class-specific request codes (A.8)
SET_CUR, GET_CUR, GET_MIN, GET_MAX, GET_RES, GET_LEN, GET_INFO, GET_DEF = (
    0x01, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87)
REQUEST_NAMES = {SET_CUR: "SET_CUR", GET_CUR: "GET_CUR", GET_MIN: "GET_MIN", GET_MAX: "GET_MAX",
                 GET_RES: "GET_RES", GET_LEN: "GET_LEN", GET_INFO: "GET_INFO", GET_DEF: "GET_DEF"}
INFO_GET, INFO_SET = 0x01, 0x02

# selectors (A.9)
VC_REQUEST_ERROR_CODE_CONTROL = 0x02
VS_PROBE_CONTROL, VS_COMMIT_CONTROL = 0x01, 0x02
CT_AE_MODE_CONTROL = 0x02
PU_BACKLIGHT, PU_BRIGHTNESS, PU_CONTRAST, PU_GAIN, PU_POWER_LINE, PU_HUE, PU_SATURATION, PU_SHARPNESS = range(1, 9)

# bRequestErrorCode (4.2.1.2)
ERR_NONE, ERR_NOT_READY, ERR_WRONG_STATE, ERR_POWER, ERR_OUT_OF_RANGE, ERR_INVALID_UNIT, \
    ERR_INVALID_CONTROL, ERR_INVALID_REQUEST, ERR_INVALID_VALUE = range(9)


class StreamingControl(ctypes.LittleEndianStructure):
    """The UVC 1.1 video probe and commit control block (34 bytes; UVC 1.0 hosts use the first 26)."""

    _pack_ = 1
    _fields_ = [("bmHint", ctypes.c_uint16), ("bFormatIndex", ctypes.c_uint8), ("bFrameIndex", ctypes.c_uint8),
                ("dwFrameInterval", ctypes.c_uint32), ("wKeyFrameRate", ctypes.c_uint16),
                ("wPFrameRate", ctypes.c_uint16), ("wCompQuality", ctypes.c_uint16),
                ("wCompWindowSize", ctypes.c_uint16), ("wDelay", ctypes.c_uint16),
                ("dwMaxVideoFrameSize", ctypes.c_uint32), ("dwMaxPayloadTransferSize", ctypes.c_uint32),
                ("dwClockFrequency", ctypes.c_uint32), ("bmFramingInfo", ctypes.c_uint8),
                ("bPreferedVersion", ctypes.c_uint8), ("bMinVersion", ctypes.c_uint8),
                ("bMaxVersion", ctypes.c_uint8)]


assert ctypes.sizeof(StreamingControl) == 34
