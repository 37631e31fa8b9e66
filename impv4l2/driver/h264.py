"""Backend-neutral H.264/HEVC Annex-B helpers: NAL splitting, NAL types, SPS fields.

Used by the sim AVPU (to split libx264/libx265 output into T31-style packs),
by the t31 backend (to check/label packs), by the M2M encoder (header modes)
and by tests (to verify stream layout).  What differs between the codecs (where
the NAL header keeps the type, which types are parameter sets, IDRs, random
access points, what the T31 never emits) is one :class:`NalSyntax` row per
codec in :data:`NAL_SYNTAX`; every helper takes the row (H.264 by default).
All splitting works on any bytes-like object without copying it: start codes
are found with ``re`` (which scans buffers in C), results are offsets.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import NamedTuple

from .base import Codec

START_CODE = b"\x00\x00\x00\x01"

# Emulation prevention guarantees that 00 00 01 never occurs inside a NAL, so
# every match is a real boundary; a zero before it makes it a 4-byte code.
# (A literal pattern: re's fast literal search, ~10x faster than "\x00?...".)
_START_RE = re.compile(rb"\x00\x00\x01")


class NalType(enum.IntEnum):
    SLICE = 1
    DPA = 2
    DPB = 3
    DPC = 4
    IDR = 5
    SEI = 6
    SPS = 7
    PPS = 8
    AUD = 9
    END_SEQ = 10
    END_STREAM = 11
    FILLER = 12


class HevcNalType(enum.IntEnum):
    """H.265 nal_unit_type (ITU-T H.265 table 7-1; IMPEncoderH265NaluType uses the same numbers)."""

    TRAIL_N = 0
    TRAIL_R = 1
    BLA_W_LP = 16
    BLA_W_RADL = 17
    BLA_N_LP = 18
    IDR_W_RADL = 19
    IDR_N_LP = 20
    CRA = 21
    VPS = 32
    SPS = 33
    PPS = 34
    AUD = 35
    EOS = 36
    EOB = 37
    FILLER = 38
    PREFIX_SEI = 39
    SUFFIX_SEI = 40


@dataclasses.dataclass(frozen=True)
class NalSyntax:
    """One codec's NAL header layout and the NAL types a driver acts on."""

    codec: Codec
    shift: int  # nal_unit_type = (first header byte >> shift) & mask
    mask: int
    params: tuple[int, ...]  # parameter sets, in the order they precede an IDR
    idr: frozenset[int]  # IDR pictures (what the T31 and the sim code as key frames)
    key: frozenset[int]  # random access pictures a decoder can start at: V4L2_BUF_FLAG_KEYFRAME
    vcl: range  # coded slice types (one ends an access unit)
    drop: frozenset[int]  # what the T31 never emits: AUD, SEI, filler
    aud: int

    def type_of(self, header_byte: int) -> int:
        return (header_byte >> self.shift) & self.mask


_H264_IDR = frozenset({NalType.IDR})
H264 = NalSyntax(Codec.H264, 0, 0x1F, (NalType.SPS, NalType.PPS), _H264_IDR, _H264_IDR, range(1, 6),
                 frozenset({NalType.SEI, NalType.AUD, NalType.FILLER}), NalType.AUD)
_H = HevcNalType
# IRAP pictures (BLA, IDR, CRA: H.265 7.4.2.2) are the random access points
HEVC = NalSyntax(Codec.HEVC, 1, 0x3F, (_H.VPS, _H.SPS, _H.PPS), frozenset({_H.IDR_W_RADL, _H.IDR_N_LP}),
                 frozenset(range(_H.BLA_W_LP, _H.CRA + 1)), range(0, 32),
                 frozenset({_H.AUD, _H.PREFIX_SEI, _H.SUFFIX_SEI, _H.FILLER}), _H.AUD)
NAL_SYNTAX: dict[Codec, NalSyntax] = {s.codec: s for s in (H264, HEVC)}


class NalSpan(NamedTuple):
    """One NAL in a buffer: start code at ``start``, payload ``[payload:end]``."""

    start: int
    payload: int
    end: int
    nal_type: int

    @property
    def start_code_len(self) -> int:
        return self.payload - self.start


_match_start = re.Match.start


def nal_spans(buf, syntax: NalSyntax = H264) -> list[NalSpan]:
    """Offsets of every NAL in an Annex-B buffer (3- or 4-byte start codes).

    Bytes before the first start code are ignored (a valid stream has none).
    """
    n, shift, mask = len(buf), syntax.shift, syntax.mask
    marks = [(s - 1 if s and buf[s - 1] == 0 else s, s + 3)
             for s in map(_match_start, _START_RE.finditer(buf))]
    spans = []
    for i, (s, p) in enumerate(marks):
        e = marks[i + 1][0] if i + 1 < len(marks) else n
        if p < e:  # skip an empty NAL (start code with nothing after it)
            spans.append(NalSpan(s, p, e, (buf[p] >> shift) & mask))
    return spans


def split_annexb(buf, syntax: NalSyntax = H264) -> list[memoryview]:
    """NAL payloads (without start codes) as zero-copy views of ``buf``."""
    mv = memoryview(buf).cast("B")
    return [mv[s.payload:s.end] for s in nal_spans(mv, syntax)]


def _start_code_len(mv: memoryview) -> int:
    """4 or 3 if ``mv`` begins with a start code, else 0."""
    if mv[:4] == START_CODE:
        return 4
    return 3 if mv[:3] == START_CODE[1:] else 0


def nal_type(nal, syntax: NalSyntax = H264) -> int:
    """Type of one NAL given with or without its start code."""
    mv = memoryview(nal).cast("B")
    return syntax.type_of(mv[_start_code_len(mv)])


def nal_types(buf, syntax: NalSyntax = H264) -> list[int]:
    """NAL types in an Annex-B buffer, in order."""
    return [s.nal_type for s in nal_spans(buf, syntax)]


def is_keyframe(types, syntax: NalSyntax = H264) -> bool:
    """Whether an access unit with these NAL types is a random access point."""
    return not syntax.key.isdisjoint(types)


def header_end(spans: list[NalSpan], syntax: NalSyntax = H264) -> int:
    """End offset of the parameter sets (SPS/PPS, HEVC: VPS/SPS/PPS) that open an
    access unit, 0 if it does not start with one."""
    end = 0
    for s in spans:
        if s.nal_type not in syntax.params:
            break
        end = s.end
    return end


# ---------------------------------------------------------------- levels

def level_idc(level: str) -> int:
    """"4.0" -> 40, "5.1" -> 51, "1b" -> 9 (x264's convention for 1b)."""
    if level.lower() == "1b":
        return 9
    major, _, minor = level.partition(".")
    try:
        return int(major) * 10 + int(minor or 0)
    except ValueError:
        raise ValueError(f"bad H.264 level {level!r}") from None


def level_str(idc: int) -> str:
    """Inverse of :func:`level_idc` (40 -> "4.0")."""
    return "1b" if idc == 9 else f"{idc // 10}.{idc % 10}"


PROFILE_IDC = {"baseline": 66, "main": 77, "extended": 88, "high": 100,
               "high10": 110, "high422": 122, "high444": 244}


# ---------------------------------------------------------------- SPS

class _Bits:
    """MSB-first bit reader with Exp-Golomb codes over an RBSP."""

    def __init__(self, data: bytes):
        self.v = int.from_bytes(data, "big")
        self.n = len(data) * 8
        self.pos = 0

    def u(self, k: int) -> int:
        if self.pos + k > self.n:
            raise ValueError("SPS truncated")
        self.pos += k
        return (self.v >> (self.n - self.pos)) & ((1 << k) - 1)

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def unescape_rbsp(nal) -> bytes:
    """Remove emulation prevention bytes (00 00 03 -> 00 00)."""
    return re.sub(rb"\x00\x00\x03", b"\x00\x00", bytes(nal))


@dataclasses.dataclass(frozen=True)
class Sps:
    profile_idc: int
    constraint_flags: int  # constraint_set0..5 flags, MSB = set0
    level_idc: int
    sps_id: int
    chroma_format_idc: int
    width: int  # after cropping
    height: int
    frame_mbs_only: bool
    max_num_ref_frames: int

    @property
    def level(self) -> str:
        return level_str(self.level_idc)


_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def parse_sps(nal) -> Sps:
    """Parse the fields of an SPS NAL (with or without start code) that a
    driver cares about: profile, level, picture size."""
    mv = memoryview(nal).cast("B")
    body = mv[_start_code_len(mv):]
    if body[0] & 0x1F != NalType.SPS:
        raise ValueError(f"not an SPS (NAL type {body[0] & 0x1F})")
    b = _Bits(unescape_rbsp(body[1:]))
    profile = b.u(8)
    flags = b.u(8)
    level = b.u(8)
    sps_id = b.ue()
    chroma = 1
    if profile in _HIGH_PROFILES:
        chroma = b.ue()
        if chroma == 3:
            b.u(1)  # separate_colour_plane_flag
        b.ue()  # bit_depth_luma_minus8
        b.ue()  # bit_depth_chroma_minus8
        b.u(1)  # qpprime_y_zero_transform_bypass_flag
        if b.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma != 3 else 12):
                if b.u(1):
                    last = nxt = 8
                    for _ in range(16 if i < 6 else 64):
                        if nxt:
                            nxt = (last + b.se() + 256) % 256
                        last = nxt or last
    b.ue()  # log2_max_frame_num_minus4
    poc_type = b.ue()
    if poc_type == 0:
        b.ue()
    elif poc_type == 1:
        b.u(1)
        b.se()
        b.se()
        for _ in range(b.ue()):
            b.se()
    refs = b.ue()
    b.u(1)  # gaps_in_frame_num_value_allowed_flag
    w_mbs = b.ue() + 1
    h_map = b.ue() + 1
    frame_mbs_only = b.u(1)
    if not frame_mbs_only:
        b.u(1)  # mb_adaptive_frame_field_flag
    b.u(1)  # direct_8x8_inference_flag
    width = w_mbs * 16
    height = h_map * 16 * (2 - frame_mbs_only)
    if b.u(1):  # frame_cropping_flag
        l, r, t, btm = b.ue(), b.ue(), b.ue(), b.ue()
        cx = 2 if chroma in (1, 2) else 1
        cy = (2 if chroma == 1 else 1) * (2 - frame_mbs_only)
        width -= (l + r) * cx
        height -= (t + btm) * cy
    return Sps(profile, flags, level, sps_id, chroma, width, height,
               bool(frame_mbs_only), refs)
