"""IMP struct layouts (host and MIPS o32) and per-architecture ioctl numbers."""

import ctypes
import os
import shutil
from pathlib import Path

import pytest

from fakes.build import c_layout  # noqa: E402

from impv4l2 import ioc as ioctl  # noqa: E402
from impv4l2.driver.t31 import structs  # noqa: E402

MIPS_CC = shutil.which("mipsel-linux-gnu-gcc")


def _fields():
    return {n: [k for k in structs.layout(getattr(structs.native, n)) if k != "sizeof"]
            for n in structs.STRUCT_NAMES}


def _compare(py_ns, c):
    diffs = {}
    for n in structs.STRUCT_NAMES:
        pl = structs.layout(getattr(py_ns, n))
        bad = {k: (pl.get(k), c[n].get(k)) for k in set(pl) | set(c[n]) if pl.get(k) != c[n].get(k)}
        if bad:
            diffs[n] = bad
    return diffs


def test_host_layout_matches_gcc():
    c = c_layout(_fields(), ["gcc"])
    assert set(c) == set(structs.STRUCT_NAMES)
    assert _compare(structs.native, c) == {}


@pytest.mark.skipif(not MIPS_CC, reason="mipsel-linux-gnu-gcc not installed (scripts/apt-test.txt)")
def test_mips_o32_layout_matches_cross_gcc():
    c = c_layout(_fields(), [MIPS_CC, "-mabi=32", "-march=mips32r2"])
    assert _compare(structs.mips_o32, c) == {}


# Known values independent of any compiler: the SDK's fixed-width fields and
# OpenIMP's _Static_asserts for the T31 vendor ABI.
@pytest.mark.parametrize("ns", [structs.native, structs.mips_o32], ids=["host", "mips_o32"])
def test_known_abi_values(ns):
    L = structs.layout
    assert L(ns.IMPEncoderAttrRcMode)["sizeof"] == 0x24
    assert L(ns.IMPEncoderGopAttr)["sizeof"] == 0x18
    assert L(ns.IMPEncoderEncAttr)["sizeof"] == 0x2C
    chn = L(ns.IMPEncoderChnAttr)
    assert (chn["rcAttr"], chn["gopAttr"], chn["sizeof"]) == (0x2C, 0x58, 0x70)
    assert L(ns.IMPEncoderPack) == {**L(ns.IMPEncoderPack), "timestamp": 8, "frameEnd": 16,
                                   "nalType": 20, "sliceType": 24, "sizeof": 32}
    fi = L(ns.IMPFrameInfo)
    assert (fi["virAddr"], fi["timeStamp"], fi["sizeof"]) == (28, 32, 40)
    # recorded from the vendor's T31 1.1.6 header (mipsel-linux-gnu-gcc -mabi=32, pahole and a
    # static qemu-mipsel run agree): timeStamp @0x20 as in 1.1.1, rotate_osdflag @0x28, 48 bytes
    f116 = L(structs.mips_o32.IMPFrameInfo_116)
    assert (f116["timeStamp"], f116["rotate_osdflag"], f116["sizeof"]) == (0x20, 0x28, 0x30)
    fs = L(ns.IMPFSChnAttr)
    assert (fs["crop"], fs["scaler"], fs["outFrmRateNum"], fs["nrVBs"], fs["fcrop"], fs["sizeof"]) == \
        (12, 32, 44, 52, 60, 80)
    si = L(ns.IMPSensorInfo)
    assert (si["i2c"], si["i2c.addr"], si["rst_gpio"], si["sizeof"]) == (36, 56, 72, 80)


def test_pointer_size_differs_only_where_expected():
    assert structs.layout(structs.mips_o32.IMPEncoderStream) == {
        "sizeof": 24, "phyAddr": 0, "virAddr": 4, "streamSize": 8, "pack": 12, "packCount": 16, "seq": 20}
    if ctypes.sizeof(ctypes.c_void_p) == 8:  # 64-bit host: the pointer is padded to 8
        host = structs.layout(structs.native.IMPEncoderStream)
        assert (host["pack"], host["packCount"], host["sizeof"]) == (16, 24, 32)


def test_alloc_reserves_abi_tail():
    s = structs.alloc(structs.native.IMPEncoderStream)
    assert len(s._raw) == ctypes.sizeof(structs.native.IMPEncoderStream) + structs.ABI_TAIL
    assert ctypes.sizeof(structs.native.IMPEncoderStream_116) <= len(s._raw)


@pytest.mark.parametrize("machine,enc", [("x86_64", ioctl.GENERIC), ("aarch64", ioctl.GENERIC),
                                         ("mips", ioctl.MIPS), ("mipsel", ioctl.MIPS)])
def test_ioctl_encoding_by_machine(machine, enc):
    assert ioctl.encoding(machine) is enc


def test_ioctl_numbers_x86_and_mips():
    g, m = ioctl.GENERIC, ioctl.MIPS
    # VIDIOC_QUERYCAP = _IOR('V', 0, struct v4l2_capability[104])
    assert g.IOR("V", 0, 104) == 0x80685600
    assert m.IOR("V", 0, 104) == 0x40685600
    # VIDIOC_S_FMT = _IOWR('V', 5, struct v4l2_format): 208 bytes x86-64, 204 on 32-bit MIPS
    assert g.IOWR("V", 5, 208) == 0xC0D05605
    assert m.IOWR("V", 5, 204) == 0xC0CC5605
    # VIDIOC_STREAMON = _IOW('V', 18, int)
    assert g.IOW("V", 18, 4) == 0x40045612
    assert m.IOW("V", 18, 4) == 0x80045612
    assert g.IO("V", 1) == 0x5601 and m.IO("V", 1) == 0x20005601
    with pytest.raises(ValueError):
        m.IOR("V", 0, 1 << 13)  # 13-bit size on MIPS
    assert g.IOR("V", 0, 1 << 13) == 0x80000000 | (1 << 13) << 16 | 0x5600


def test_symbol_table_against_fake():
    """The fake exports the whole table; only feature-gated symbols may be optional."""
    from fakes.build import build_fake
    from impv4l2.driver.t31.libimp import REQUIRED, SYMBOLS
    assert {f for _, _, _, f in SYMBOLS if f is not REQUIRED}, "optional features exist"
    fake = ctypes.CDLL(str(build_fake()))
    assert [s for s, *_ in SYMBOLS if not hasattr(fake, s)] == []


# ---------------------------------------------------------------- the vendor's releases

# What each T31 SDK release's own headers give where it differs from 1.1.1 (gtxaspec/ingenic-headers
# T31/<release>/<lang>/imp/*.h, compiled with mipsel-linux-gnu-gcc -mabi=32 and the host gcc by
# test_every_struct_against_the_vendor_headers below); every other struct of every release is
# 1.1.1's, offsets and sizes (the same compile).
VENDOR_DIFFS: dict[tuple[str, str, str], str] = {
    ("1.1.4", "o32", "IMPEncoderStream"):
        "sizeof=60 phyAddr=0 virAddr=4 streamSize=8 pack=12 packCount=16 seq=20 streamInfo=24 "
        "streamInfo.iNumBytes=24 streamInfo.uNumIntra=28 streamInfo.uNumSkip=32 "
        "streamInfo.uNumCU8x8=36 streamInfo.uNumCU16x16=40 streamInfo.uNumCU32x32=44 "
        "streamInfo.uNumCU64x64=48 streamInfo.iSliceQP=52 streamInfo.iMinQP=54 "
        "streamInfo.iMaxQP=56 jpegInfo=24 jpegInfo.iNumBytes=24 jpegInfo.iQPfactor=28",
    ("1.1.4", "host", "IMPEncoderStream"):
        "sizeof=72 phyAddr=0 virAddr=4 streamSize=8 pack=16 packCount=24 seq=28 streamInfo=32 "
        "streamInfo.iNumBytes=32 streamInfo.uNumIntra=36 streamInfo.uNumSkip=40 "
        "streamInfo.uNumCU8x8=44 streamInfo.uNumCU16x16=48 streamInfo.uNumCU32x32=52 "
        "streamInfo.uNumCU64x64=56 streamInfo.iSliceQP=60 streamInfo.iMinQP=62 "
        "streamInfo.iMaxQP=64 jpegInfo=32 jpegInfo.iNumBytes=32 jpegInfo.iQPfactor=36",
    ("1.1.5", "o32", "IMPEncoderStream"):
        "sizeof=60 phyAddr=0 virAddr=4 streamSize=8 pack=12 packCount=16 seq=20 streamInfo=24 "
        "streamInfo.iNumBytes=24 streamInfo.uNumIntra=28 streamInfo.uNumSkip=32 "
        "streamInfo.uNumCU8x8=36 streamInfo.uNumCU16x16=40 streamInfo.uNumCU32x32=44 "
        "streamInfo.uNumCU64x64=48 streamInfo.iSliceQP=52 streamInfo.iMinQP=54 "
        "streamInfo.iMaxQP=56 streamInfo.isVI=58 jpegInfo=24 jpegInfo.iNumBytes=24 "
        "jpegInfo.iQPfactor=28",
    ("1.1.5", "o32", "IMPFSChnAttr"):
        "sizeof=60 picWidth=0 picHeight=4 pixFmt=8 crop=12 crop.enable=12 crop.left=16 "
        "crop.top=20 crop.width=24 crop.height=28 scaler=32 scaler.enable=32 scaler.outwidth=36 "
        "scaler.outheight=40 outFrmRateNum=44 outFrmRateDen=48 nrVBs=52 type=56",
    ("1.1.5", "host", "IMPEncoderStream"):
        "sizeof=72 phyAddr=0 virAddr=4 streamSize=8 pack=16 packCount=24 seq=28 streamInfo=32 "
        "streamInfo.iNumBytes=32 streamInfo.uNumIntra=36 streamInfo.uNumSkip=40 "
        "streamInfo.uNumCU8x8=44 streamInfo.uNumCU16x16=48 streamInfo.uNumCU32x32=52 "
        "streamInfo.uNumCU64x64=56 streamInfo.iSliceQP=60 streamInfo.iMinQP=62 "
        "streamInfo.iMaxQP=64 streamInfo.isVI=66 jpegInfo=32 jpegInfo.iNumBytes=32 "
        "jpegInfo.iQPfactor=36",
    ("1.1.5", "host", "IMPFSChnAttr"):
        "sizeof=60 picWidth=0 picHeight=4 pixFmt=8 crop=12 crop.enable=12 crop.left=16 "
        "crop.top=20 crop.width=24 crop.height=28 scaler=32 scaler.enable=32 scaler.outwidth=36 "
        "scaler.outheight=40 outFrmRateNum=44 outFrmRateDen=48 nrVBs=52 type=56",
    ("1.1.5.2", "o32", "IMPFSChnAttr"):
        "sizeof=60 picWidth=0 picHeight=4 pixFmt=8 crop=12 crop.enable=12 crop.left=16 "
        "crop.top=20 crop.width=24 crop.height=28 scaler=32 scaler.enable=32 scaler.outwidth=36 "
        "scaler.outheight=40 outFrmRateNum=44 outFrmRateDen=48 nrVBs=52 type=56",
    ("1.1.5.2", "host", "IMPFSChnAttr"):
        "sizeof=60 picWidth=0 picHeight=4 pixFmt=8 crop=12 crop.enable=12 crop.left=16 "
        "crop.top=20 crop.width=24 crop.height=28 scaler=32 scaler.enable=32 scaler.outwidth=36 "
        "scaler.outheight=40 outFrmRateNum=44 outFrmRateDen=48 nrVBs=52 type=56",
    ("1.1.6", "o32", "IMPFrameInfo"):
        "sizeof=48 index=0 pool_idx=4 width=8 height=12 pixfmt=16 size=20 phyAddr=24 virAddr=28 "
        "timeStamp=32 rotate_osdflag=40",
    ("1.1.6", "o32", "IMPEncoderStream"):
        "sizeof=64 phyAddr=0 virAddr=4 streamSize=8 pack=12 packCount=16 seq=20 isVI=24 "
        "streamInfo=28 streamInfo.iNumBytes=28 streamInfo.uNumIntra=32 streamInfo.uNumSkip=36 "
        "streamInfo.uNumCU8x8=40 streamInfo.uNumCU16x16=44 streamInfo.uNumCU32x32=48 "
        "streamInfo.uNumCU64x64=52 streamInfo.iSliceQP=56 streamInfo.iMinQP=58 "
        "streamInfo.iMaxQP=60 jpegInfo=28 jpegInfo.iNumBytes=28 jpegInfo.iQPfactor=32",
    ("1.1.6", "host", "IMPFrameInfo"):
        "sizeof=48 index=0 pool_idx=4 width=8 height=12 pixfmt=16 size=20 phyAddr=24 virAddr=28 "
        "timeStamp=32 rotate_osdflag=40",
    ("1.1.6", "host", "IMPEncoderStream"):
        "sizeof=72 phyAddr=0 virAddr=4 streamSize=8 pack=16 packCount=24 seq=28 isVI=32 "
        "streamInfo=36 streamInfo.iNumBytes=36 streamInfo.uNumIntra=40 streamInfo.uNumSkip=44 "
        "streamInfo.uNumCU8x8=48 streamInfo.uNumCU16x16=52 streamInfo.uNumCU32x32=56 "
        "streamInfo.uNumCU64x64=60 streamInfo.iSliceQP=64 streamInfo.iMinQP=66 "
        "streamInfo.iMaxQP=68 jpegInfo=36 jpegInfo.iNumBytes=36 jpegInfo.iQPfactor=40",
}


def _parsed(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in text.split())}


def test_sdk_structs_table_names_exactly_the_recorded_differences():
    recorded = {(rel, name) for rel, _, name in VENDOR_DIFFS}
    assert recorded == {(rel, n) for rel, names in structs.SDK_STRUCTS.items() for n in names}
    assert structs.SDK_RELEASES == ("1.1.1", "1.1.2", "1.1.4", "1.1.5", "1.1.5.2", "1.1.6")


@pytest.mark.parametrize("rel,abi,name", sorted(VENDOR_DIFFS))
def test_release_layouts_match_the_vendor_headers(rel, abi, name):
    ns = structs.mips_o32 if abi == "o32" else structs.native
    if abi == "host" and ctypes.sizeof(ctypes.c_void_p) != 8:
        pytest.skip("recorded on a 64-bit host")
    assert structs.layout(structs.sdk_struct(ns, rel, name)) == _parsed(VENDOR_DIFFS[rel, abi, name])


def test_1_1_4_and_1_1_5_streams_are_60_bytes_each_differently():
    o32 = structs.mips_o32
    s114, s115 = (structs.layout(structs.sdk_struct(o32, r, "IMPEncoderStream")) for r in ("1.1.4", "1.1.5"))
    assert s114["sizeof"] == s115["sizeof"] == 60
    assert "streamInfo.isVI" not in s114 and s115["streamInfo.isVI"] == 58


@pytest.mark.parametrize("text,release,exact", [
    ("IMP-1.1.6", "1.1.6", True), ("IMP-1.1.5.2", "1.1.5.2", True), ("IMP-1.1.5", "1.1.5", True),
    ("IMP-1.1.6-20210701", "1.1.6", True), ("IMP-1.1.3", "1.1.2", False), ("IMP-1.1.7", "1.1.6", False),
    ("IMP-1.1.5.1", "1.1.5", False), ("garbage", None, False)])
def test_sdk_release_from_version_text(text, release, exact):
    assert structs.sdk_release(text) == (release, exact)


# Names the vendor changed without moving anything (1.1.4+: uNumB became uNotifyUserLTInter).
VENDOR_RENAMED = {"uNumB": ("1.1.4", "uNotifyUserLTInter")}
VENDOR_HEADERS = os.environ.get("IMPV4L2_VENDOR_HEADERS")  # a checkout of gtxaspec/ingenic-headers


@pytest.mark.skipif(not VENDOR_HEADERS, reason="set IMPV4L2_VENDOR_HEADERS to a gtxaspec/ingenic-headers checkout")
@pytest.mark.parametrize("abi", ["o32", "host"])
@pytest.mark.parametrize("rel", structs.SDK_RELEASES)
def test_every_struct_against_the_vendor_headers(rel, abi, tmp_path):
    """Every struct of STRUCT_NAMES as release ``rel`` lays it out, against that release's
    own headers compiled for o32 and the host (how VENDOR_DIFFS was recorded)."""
    if abi == "o32" and not MIPS_CC:
        pytest.skip("mipsel-linux-gnu-gcc not installed")
    ns, cc = (structs.mips_o32, [MIPS_CC, "-mabi=32"]) if abi == "o32" else (structs.native, ["gcc"])
    top = Path(VENDOR_HEADERS) / "T31" / rel
    inc = next(top.iterdir())  # the one language directory (zh or en)
    helper = tmp_path / "vendor.h"
    helper.write_text("".join(f"#include <imp/imp_{h}.h>\n" for h in ("common", "system", "isp", "framesource",
                                                                    "encoder"))
                      + "#define IMP_ABI_H\n")  # c_layout's own include of imp_abi.h becomes empty

    def vendor_key(key: str) -> str:
        *head, last = key.split(".")
        since, new = VENDOR_RENAMED.get(last, (None, None))
        if since and structs.SDK_RELEASES.index(rel) >= structs.SDK_RELEASES.index(since):
            last = new
        return ".".join([*head, last])

    base = [n for n in structs.STRUCT_NAMES if "_1" not in n]
    ours = {n: structs.layout(structs.sdk_struct(ns, rel, n)) for n in base}
    c = c_layout({n: [vendor_key(k) for k in lay if k != "sizeof"] for n, lay in ours.items()},
                 [*cc, "-I", str(inc), "-include", str(helper)])
    diffs = {n: {k: (v, c[n].get(vendor_key(k))) for k, v in lay.items() if c[n].get(vendor_key(k)) != v}
             for n, lay in ours.items()}
    assert {n: d for n, d in diffs.items() if d} == {}
