"""IMP struct layouts (host and MIPS o32) and per-architecture ioctl numbers."""

import ctypes
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
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
