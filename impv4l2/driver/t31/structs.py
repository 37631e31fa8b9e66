"""IMP SDK 1.1.x structures as ctypes, for the host ABI and for MIPS o32.

Source of truth: the T31 SDK 1.1.1 headers (include/imp/imp_common.h,
imp_isp.h, imp_framesource.h, imp_encoder.h of
cgrrty/Ingenic-SDK-T31-1.1.1-20200508); tests/fakes/imp_abi.h carries the
same definitions in C and the tests compare both with gcc (host) and
mipsel-linux-gnu-gcc (o32).

Every layout is built by :func:`build` from one field table, parameterized by
the pointer type: real ctypes pointers for the running process, ``c_uint32``
for MIPS o32 (pointers 4 bytes; int64 aligned to 8 as on x86-64, so ctypes on
a 64-bit host computes the o32 layout exactly).

Later releases (gtxaspec/ingenic-headers T31/1.1.2 … 1.1.6, compiled the same
way) differ from 1.1.1 in a few structs only; :data:`SDK_STRUCTS` names them per
release and the backend picks its layouts from it by the detected version.
Structs the *caller* allocates and the library fills (IMPEncoderStream,
IMPEncoderChnAttr) get :data:`ABI_TAIL` spare bytes from :func:`alloc`, so an
unknown newer release can never write past our allocation.
"""

from __future__ import annotations

import ctypes
import re
import types
from ctypes import (c_bool, c_char, c_int, c_int16, c_int32, c_int64, c_uint8, c_uint16,
                    c_uint32)

ABI_TAIL = 64  # spare bytes after library-filled structs (1.1.6 grows them)

# enums are int-sized on both ABIs
c_enum = c_int

IMP_ENC_TYPE_AVC, IMP_ENC_TYPE_HEVC, IMP_ENC_TYPE_JPEG = 0, 1, 4
IMP_ENC_PROFILE_AVC_BASELINE = (IMP_ENC_TYPE_AVC << 24) | 66
IMP_ENC_PROFILE_AVC_MAIN = (IMP_ENC_TYPE_AVC << 24) | 77
IMP_ENC_PROFILE_AVC_HIGH = (IMP_ENC_TYPE_AVC << 24) | 100
IMP_ENC_PROFILE_HEVC_MAIN = (IMP_ENC_TYPE_HEVC << 24) | 1  # IMP_ENC_HEVC_PROFILE_IDC_MAIN (1.1.1 .. 1.1.6)
IMP_ENC_PROFILE_JPEG = IMP_ENC_TYPE_JPEG << 24
PIX_FMT_NV12 = 10
FS_PHY_CHANNEL = 0
DEV_ID_FS, DEV_ID_ENC = 0, 1
TX_SENSOR_CONTROL_INTERFACE_I2C = 1
H264_NAL_IDR = 5
# IMPEncoderH265NaluType (1.1.1 .. 1.1.6 imp_encoder.h: the H.265 nal_unit_type numbers)
H265_NAL_IDR_W_RADL, H265_NAL_IDR_N_LP, H265_NAL_CRA = 19, 20, 21
IMP_ENC_SLICE_P, IMP_ENC_SLICE_I = 1, 2  # IMPEncoderSliceType (every T31 release)


def _struct(name: str, fields: list, anonymous: tuple[str, ...] = (), union: bool = False) -> type:
    base = ctypes.Union if union else ctypes.Structure
    ns = {"_fields_": fields}
    if anonymous:
        ns["_anonymous_"] = anonymous
    return type(name, (base,), ns)


def build(ptr: type | None = None) -> types.SimpleNamespace:
    """Build all IMP structs.  ``ptr``: None = native pointers of this
    process; ``c_uint32`` = MIPS o32 layout (for size/offset checks only)."""
    s = types.SimpleNamespace()

    def P(target):  # pointer field of the chosen ABI
        return ctypes.POINTER(target) if ptr is None else ptr

    s.IMPCell = _struct("IMPCell", [("deviceID", c_enum), ("groupID", c_int), ("outputID", c_int)])
    s.IMPFrameInfo = _struct("IMPFrameInfo", [
        ("index", c_int), ("pool_idx", c_int), ("width", c_uint32), ("height", c_uint32),
        ("pixfmt", c_uint32), ("size", c_uint32), ("phyAddr", c_uint32), ("virAddr", c_uint32),
        ("timeStamp", c_int64)])
    # T31 1.1.6 (gtxaspec/ingenic-headers T31/1.1.6/en imp_common.h): timeStamp stays at 0x20,
    # rotate_osdflag follows, priv[0]; 48 bytes.  (direct_phyAddr/timeStamp_ivdc are T23's.)
    s.IMPFrameInfo_116 = _struct("IMPFrameInfo_116", [
        ("index", c_int), ("pool_idx", c_int), ("width", c_uint32), ("height", c_uint32),
        ("pixfmt", c_uint32), ("size", c_uint32), ("phyAddr", c_uint32), ("virAddr", c_uint32),
        ("timeStamp", c_int64), ("rotate_osdflag", c_int)])

    s.IMPI2CInfo = _struct("IMPI2CInfo", [("type", c_char * 20), ("addr", c_int),
                                          ("i2c_adapter_id", c_int)])
    s.IMPSPIInfo = _struct("IMPSPIInfo", [("modalias", c_char * 32), ("bus_num", c_int)])
    s._IMPSensorBus = _struct("_IMPSensorBus", [("i2c", s.IMPI2CInfo), ("spi", s.IMPSPIInfo)],
                              union=True)
    s.IMPSensorInfo = _struct("IMPSensorInfo", [
        ("name", c_char * 32), ("cbus_type", c_enum), ("_bus", s._IMPSensorBus),
        ("rst_gpio", c_uint16), ("pwdn_gpio", c_uint16), ("power_gpio", c_uint16)],
        anonymous=("_bus",))

    s.IMPFSChnCrop = _struct("IMPFSChnCrop", [("enable", c_int), ("left", c_int), ("top", c_int),
                                              ("width", c_int), ("height", c_int)])
    s.IMPFSChnScaler = _struct("IMPFSChnScaler", [("enable", c_int), ("outwidth", c_int),
                                                  ("outheight", c_int)])
    s.IMPFSChnAttr = _struct("IMPFSChnAttr", [
        ("picWidth", c_int), ("picHeight", c_int), ("pixFmt", c_enum), ("crop", s.IMPFSChnCrop),
        ("scaler", s.IMPFSChnScaler), ("outFrmRateNum", c_int), ("outFrmRateDen", c_int),
        ("nrVBs", c_int), ("type", c_enum), ("fcrop", s.IMPFSChnCrop)])
    # 1.1.5 and 1.1.5.2 (T31/1.1.5*/en imp_framesource.h) have no fcrop: 60 bytes.  The library
    # only reads this struct, so the backend passes the 80-byte one (fcrop zeroed) everywhere.
    s.IMPFSChnAttr_115 = _struct("IMPFSChnAttr_115", s.IMPFSChnAttr._fields_[:-1])
    s.IMPVersion = _struct("IMPVersion", [("aVersion", c_char * 64)])  # imp_system.h, every T31 SDK

    s.IMPEncoderNalType = _struct("IMPEncoderNalType", [("h264NalType", c_enum),
                                                        ("h265NalType", c_enum)], union=True)
    s.IMPEncoderPack = _struct("IMPEncoderPack", [
        ("offset", c_uint32), ("length", c_uint32), ("timestamp", c_int64), ("frameEnd", c_bool),
        ("nalType", s.IMPEncoderNalType), ("sliceType", c_enum)])
    stream_head = [("phyAddr", c_uint32), ("virAddr", c_uint32), ("streamSize", c_uint32),
                   ("pack", P(s.IMPEncoderPack)), ("packCount", c_uint32), ("seq", c_uint32)]
    s.IMPEncoderStream = _struct("IMPEncoderStream", list(stream_head))
    s.IMPEncoderJpegInfo = _struct("IMPEncoderJpegInfo", [("iNumBytes", c_int32),
                                                          ("iQPfactor", c_int16)])
    s.IMPEncoderStreamInfo = _struct("IMPEncoderStreamInfo", [
        ("iNumBytes", c_int32), ("uNumIntra", c_uint32), ("uNumSkip", c_uint32),
        ("uNumCU8x8", c_uint32), ("uNumCU16x16", c_uint32), ("uNumCU32x32", c_uint32),
        ("uNumCU64x64", c_uint32), ("iSliceQP", c_int16), ("iMinQP", c_int16), ("iMaxQP", c_int16)])
    s._IMPEncoderStreamInfoU = _struct("_IMPEncoderStreamInfoU", [
        ("streamInfo", s.IMPEncoderStreamInfo), ("jpegInfo", s.IMPEncoderJpegInfo)], union=True)
    # The stream tail per SDK (gtxaspec/ingenic-headers T31/<v>/imp/imp_encoder.h): 1.1.1, 1.1.2
    # and 1.1.5.2 have none; 1.1.4 appends the info union (60 bytes on o32); 1.1.5 too, with
    # streamInfo.isVI (uint8_t) after iMaxQP (60 bytes); 1.1.6 puts isVI before the union (64).
    s.IMPEncoderStream_114 = _struct("IMPEncoderStream_114", stream_head + [
        ("_info", s._IMPEncoderStreamInfoU)], anonymous=("_info",))
    s.IMPEncoderStreamInfo_115 = _struct("IMPEncoderStreamInfo_115", list(s.IMPEncoderStreamInfo._fields_)
                                         + [("isVI", c_uint8)])
    s._IMPEncoderStreamInfoU_115 = _struct("_IMPEncoderStreamInfoU_115", [
        ("streamInfo", s.IMPEncoderStreamInfo_115), ("jpegInfo", s.IMPEncoderJpegInfo)], union=True)
    s.IMPEncoderStream_115 = _struct("IMPEncoderStream_115", stream_head + [
        ("_info", s._IMPEncoderStreamInfoU_115)], anonymous=("_info",))
    s.IMPEncoderStream_116 = _struct("IMPEncoderStream_116", stream_head + [
        ("isVI", c_bool), ("_info", s._IMPEncoderStreamInfoU)], anonymous=("_info",))

    s.IMPEncoderCropCfg = _struct("IMPEncoderCropCfg", [
        ("enable", c_bool), ("x", c_uint32), ("y", c_uint32), ("w", c_uint32), ("h", c_uint32)])
    s.IMPEncoderEncAttr = _struct("IMPEncoderEncAttr", [
        ("eProfile", c_enum), ("uLevel", c_uint8), ("uTier", c_uint8), ("uWidth", c_uint16),
        ("uHeight", c_uint16), ("ePicFormat", c_enum), ("eEncOptions", c_uint32),
        ("eEncTools", c_uint32), ("crop", s.IMPEncoderCropCfg)])
    s.IMPEncoderGopAttr = _struct("IMPEncoderGopAttr", [
        ("uGopCtrlMode", c_enum), ("uGopLength", c_uint16), ("uNumB", c_uint8),
        ("uMaxSameSenceCnt", c_uint32), ("bEnableLT", c_bool), ("uFreqLT", c_uint32),
        ("bLTRC", c_bool)])
    s.IMPEncoderAttrFixQP = _struct("IMPEncoderAttrFixQP", [("iInitialQP", c_int16)])
    rc_common = [("iInitialQP", c_int16), ("iMinQP", c_int16), ("iMaxQP", c_int16),
                 ("iIPDelta", c_int16), ("iPBDelta", c_int16), ("eRcOptions", c_uint32),
                 ("uMaxPictureSize", c_uint32)]
    s.IMPEncoderAttrCbr = _struct("IMPEncoderAttrCbr", [("uTargetBitRate", c_uint32)] + rc_common)
    s.IMPEncoderAttrVbr = _struct("IMPEncoderAttrVbr", [("uTargetBitRate", c_uint32),
                                                        ("uMaxBitRate", c_uint32)] + rc_common)
    s.IMPEncoderAttrCappedVbr = _struct("IMPEncoderAttrCappedVbr", [
        ("uTargetBitRate", c_uint32), ("uMaxBitRate", c_uint32)] + rc_common
        + [("uMaxPSNR", c_uint16)])
    s.IMPEncoderAttrCappedQuality = s.IMPEncoderAttrCappedVbr
    s._IMPEncoderRcU = _struct("_IMPEncoderRcU", [
        ("attrFixQp", s.IMPEncoderAttrFixQP), ("attrCbr", s.IMPEncoderAttrCbr),
        ("attrVbr", s.IMPEncoderAttrVbr), ("attrCappedVbr", s.IMPEncoderAttrCappedVbr),
        ("attrCappedQuality", s.IMPEncoderAttrCappedQuality)], union=True)
    s.IMPEncoderAttrRcMode = _struct("IMPEncoderAttrRcMode", [
        ("rcMode", c_enum), ("_u", s._IMPEncoderRcU)], anonymous=("_u",))
    s.IMPEncoderFrmRate = _struct("IMPEncoderFrmRate", [("frmRateNum", c_uint32),
                                                        ("frmRateDen", c_uint32)])
    s.IMPEncoderRcAttr = _struct("IMPEncoderRcAttr", [("attrRcMode", s.IMPEncoderAttrRcMode),
                                                      ("outFrmRate", s.IMPEncoderFrmRate)])
    s.IMPEncoderChnAttr = _struct("IMPEncoderChnAttr", [
        ("encAttr", s.IMPEncoderEncAttr), ("rcAttr", s.IMPEncoderRcAttr),
        ("gopAttr", s.IMPEncoderGopAttr)])
    s.IMPEncoderChnStat = _struct("IMPEncoderChnStat", [
        ("registered", c_bool), ("leftPics", c_uint32), ("leftStreamBytes", c_uint32),
        ("leftStreamFrames", c_uint32), ("curPacks", c_uint32), ("work_done", c_uint32)])
    s.IMPEncoderCHNStat = s.IMPEncoderChnStat  # older SDKs' spelling
    return s


# Names checked against the C compiler (tests/fakes/imp_abi.h).
STRUCT_NAMES = (
    "IMPCell", "IMPFrameInfo", "IMPFrameInfo_116", "IMPI2CInfo", "IMPSPIInfo", "IMPSensorInfo",
    "IMPFSChnCrop", "IMPFSChnScaler", "IMPFSChnAttr", "IMPFSChnAttr_115", "IMPVersion",
    "IMPEncoderPack", "IMPEncoderStream", "IMPEncoderStream_114", "IMPEncoderStream_115",
    "IMPEncoderStream_116", "IMPEncoderCropCfg", "IMPEncoderEncAttr", "IMPEncoderGopAttr",
    "IMPEncoderAttrCbr", "IMPEncoderAttrVbr", "IMPEncoderAttrCappedVbr", "IMPEncoderAttrRcMode",
    "IMPEncoderRcAttr", "IMPEncoderChnAttr", "IMPEncoderChnStat",
)

# The vendor's structs per T31 SDK release, as data: the vendor name -> our class where that
# release differs from 1.1.1 (every other struct of STRUCT_NAMES is 1.1.1's, offsets and size;
# tests/driver/t31/test_t31_structs.py holds the values compiled from each release's headers).
SDK_STRUCTS: dict[str, dict[str, str]] = {
    "1.1.1": {},
    "1.1.2": {},
    "1.1.4": {"IMPEncoderStream": "IMPEncoderStream_114"},
    "1.1.5": {"IMPEncoderStream": "IMPEncoderStream_115", "IMPFSChnAttr": "IMPFSChnAttr_115"},
    "1.1.5.2": {"IMPFSChnAttr": "IMPFSChnAttr_115"},
    "1.1.6": {"IMPFrameInfo": "IMPFrameInfo_116", "IMPEncoderStream": "IMPEncoderStream_116"},
}
SDK_RELEASES = tuple(SDK_STRUCTS)  # oldest first


def sdk_struct(ns: types.SimpleNamespace, sdk: str, name: str) -> type:
    """The class laid out as ``name`` is in SDK release ``sdk`` (a key of SDK_STRUCTS)."""
    return getattr(ns, SDK_STRUCTS[sdk].get(name, name))


def sdk_release(version: str) -> tuple[str | None, bool]:
    """The SDK_STRUCTS release for a version text ("IMP-1.1.6", "1.1.5.2", "IMP-1.1.6-20210701"):
    (release, exact).  An unknown release maps to the newest known one not above it; text without
    a version gives (None, False)."""
    m = re.search(r"(\d+)\.(\d+)\.(\d+)(?:\.(\d+))?", version or "")
    if not m:
        return None, False
    want = tuple(int(x) for x in m.groups() if x is not None)
    known = sorted((tuple(int(x) for x in r.split(".")), r) for r in SDK_RELEASES)
    below = [r for k, r in known if k <= want]
    if not below:
        return known[0][1], False
    return below[-1], below[-1] == ".".join(map(str, want))

native = build()  # the process's own ABI
mips_o32 = build(c_uint32)


def layout(cls: type, prefix: str = "", base: int = 0, top: bool = True) -> dict[str, int]:
    """Flattened field offsets of ``cls`` (nested structs dotted, anonymous
    unions/structs expanded like C does) plus ``sizeof``."""
    out: dict[str, int] = {"sizeof": ctypes.sizeof(cls)} if top else {}
    anon = set(getattr(cls, "_anonymous_", ()))
    for name, ftype, *_ in cls._fields_:
        off = base + getattr(cls, name).offset
        if name in anon:
            out.update(layout(ftype, prefix, off, False))
            continue
        out[prefix + name] = off
        if isinstance(ftype, type) and issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            out.update(layout(ftype, prefix + name + ".", off, False))
    return out


def alloc(cls: type):
    """A zeroed instance of ``cls`` followed by ABI_TAIL spare bytes."""
    raw = (c_uint8 * (ctypes.sizeof(cls) + ABI_TAIL))()
    obj = cls.from_buffer(raw)
    obj._raw = raw  # keep the backing storage alive
    return obj
