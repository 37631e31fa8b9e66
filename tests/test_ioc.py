"""impv4l2.ioc: the one _IOC implementation, decoding and re-encoding for the running machine."""

from __future__ import annotations

import pytest

from impv4l2 import ioc
from impv4l2.fuse import proto
from impv4l2.v4l2 import abi

G, M = ioc.GENERIC, ioc.MIPS


@pytest.mark.parametrize("enc", [G, M])
def test_decode_what_was_encoded(enc):
    for flags, make in ((0, lambda s: enc.IO("V", 3)), (ioc.READ, lambda s: enc.IOR("V", 3, s)),
                        (ioc.WRITE, lambda s: enc.IOW("V", 3, s)),
                        (ioc.READ | ioc.WRITE, lambda s: enc.IOWR("V", 3, s))):
        for size in ((0,) if flags == 0 else (1, 104, 204, 4096, (1 << enc.sizebits) - 1)):
            cmd = make(size)
            assert enc.dir_flags(cmd) == flags and enc.size(cmd) == size and cmd & 0xFFFF == 0x5603


def test_mips_numbers_from_the_t31_kernel():
    # 32-bit mipsel: VIDIOC_QUERYCAP answered by vivid in the MIPS guest (design.md §9)
    assert M.IOR("V", 0, 104) == 0x40685600
    assert M.recode(0x80685600, G) == 0x40685600 and G.recode(0x40685600, M) == 0x80685600
    # _IOW on MIPS sets bit 31; the generic decoder would call it READ
    assert M.dir_flags(0x80045612) == ioc.WRITE and G.dir_flags(0x80045612) == ioc.READ
    with pytest.raises(ValueError):
        M.IOR("V", 1, 8192)   # 13 bits on MIPS


def test_every_vidioc_round_trips_through_mips():
    for name, cmd in abi.VIDIOC.items():
        assert G.recode(M.recode(cmd, G), M) == cmd, name
        assert M.size(M.recode(cmd, G)) == G.size(cmd), name


def test_the_transport_and_the_abi_use_the_native_encoding():
    assert ioc.NATIVE is ioc.encoding()
    q = abi.VIDIOC["QUERYCAP"]
    assert proto.ioc_size(q) == 104 and proto.ioc_dir(q) == proto.IOC_READ
    assert proto.DEV_IOC_BACKING_OPEN == (0x4010E501 if ioc.NATIVE is G else 0x8010E501)
