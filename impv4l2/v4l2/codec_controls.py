"""H.264 and HEVC encoder controls (MPEG/Codec class) as data, and their mapping to EncoderParams.

Two tables (:data:`H264_CONTROLS`, :data:`HEVC_CONTROLS`) describe every control the
encoders offer: V4L2 id, the kernel's name, type, range, default, the *setting*
it writes and the codecs it applies to (rate control, GOP and FORCE_KEY_FRAME are
shared; profile, level, tier and QPs are per codec, in settings of their own).
:data:`CODEC_FIELDS` says which settings give each codec's EncoderParams fields.  :class:`CodecSettings` holds the values of one encoding session
(one M2M file handle, or later one compressed capture stream) and turns them
into :class:`~impv4l2.driver.base.EncoderParams` (:meth:`CodecSettings.params`).

Rate control mapping (V4L2 -> IMP's RcMode):

===================  =============  ==========================================
FRAME_RC_ENABLE      BITRATE_MODE   RcMode
===================  =============  ==========================================
0                    any            FIXQP (H264_I_FRAME_QP / H264_P_FRAME_QP)
1                    VBR            VBR, capped at max(BITRATE_PEAK, BITRATE)
1                    CBR            CBR at BITRATE
1                    CQ             CAPPED_QUALITY (quality = H264_P_FRAME_QP),
                                    capped at max(BITRATE_PEAK, BITRATE)
===================  =============  ==========================================

``GOP_SIZE`` (what ffmpeg sets) and ``H264_I_PERIOD`` (what GStreamer and
bcm2835 clients set) are one setting: the distance between IDRs, and so is
``HEVC_REFRESH_PERIOD`` (with ``HEVC_REFRESH_TYPE`` fixed at IDR, as the T31 codes).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

from ..driver.base import Codec, EncoderParams, Profile, RcMode
from . import abi
from .controls import Control

CID = abi.CID
T = abi.CtrlType
F = abi.CtrlFlag

# V4L2 menu values (videodev2.h / v4l2-controls.h).
BITRATE_MODE_VBR, BITRATE_MODE_CBR, BITRATE_MODE_CQ = 0, 1, 2
HEADER_MODE_SEPARATE, HEADER_MODE_JOINED = 0, 1

BITRATE_MODE_MENU = ("Variable Bitrate", "Constant Bitrate", "Constant Quality")
HEADER_MODE_MENU = ("Separate Buffer", "Joined With 1st Frame")
# H264_PROFILE menu by V4L2 value; None = not offered (skipped menu item).
PROFILE_MENU: tuple[str | None, ...] = (
    "Baseline", "Constrained Baseline", "Main", None, "High")
PROFILE_MAP = {0: Profile.BASELINE, 1: Profile.BASELINE, 2: Profile.MAIN, 4: Profile.HIGH}
PROFILE_DEFAULT = {"baseline": 1, "main": 2, "high": 4}
# H264_LEVEL menu names are also the level strings the backend takes.
LEVEL_MENU = ("1", "1b", "1.1", "1.2", "1.3", "2", "2.1", "2.2", "3", "3.1", "3.2",
              "4", "4.1", "4.2", "5", "5.1", "5.2")
LEVEL_DEFAULT = LEVEL_MENU.index("5.1")  # the T31's usual level
# HEVC menus (v4l2-ctrls-defs.c); the AVPU codes Main profile only (IMP_ENC_PROFILE_HEVC_MAIN).
HEVC_PROFILE_MENU = ("Main", None, None)  # Main Still Picture, Main 10: not offered
HEVC_LEVEL_MENU = ("1", "2", "2.1", "3", "3.1", "4", "4.1", "5", "5.1", "5.2", "6", "6.1", "6.2")
HEVC_TIER_MENU = ("Main", "High")
HEVC_REFRESH_MENU = ("None", "CRA", "IDR")
HEVC_REFRESH_IDR = 2

# config rc_mode -> (FRAME_RC_ENABLE, BITRATE_MODE).  capped_quality (the T31
# stock camera mode) becomes capped VBR: V4L2 encoder clients set BITRATE and
# expect it to be honoured (ffmpeg -b:v), which a quality mode would ignore.
RC_DEFAULTS = {
    "fixqp": (0, BITRATE_MODE_VBR),
    "cbr": (1, BITRATE_MODE_CBR),
    "vbr": (1, BITRATE_MODE_VBR),
    "capped_vbr": (1, BITRATE_MODE_VBR),
    "capped_quality": (1, BITRATE_MODE_VBR),
}


@dataclasses.dataclass(frozen=True)
class CodecControl:
    """One encoder control: V4L2 description + the setting it reads/writes.

    ``key`` None: a constant (value = default).  ``default`` may name a
    field of the configured defaults (``"cfg:<field>"``) resolved per session.
    """

    cid: int
    name: str  # the kernel's v4l2_ctrl_get_name() wording
    type: int
    minimum: int
    maximum: int
    step: int
    default: int | str
    key: str | None
    menu: tuple[str | None, ...] = ()
    flags: int = 0
    codecs: frozenset[Codec] = frozenset({Codec.H264, Codec.HEVC})  # the streams it applies to


_AVC, _HEVC = frozenset({Codec.H264}), frozenset({Codec.HEVC})


def _menu(cid, name, items, default, key, codecs=_AVC) -> CodecControl:
    return CodecControl(cid, name, T.MENU, 0, len(items) - 1, 1, default, key, tuple(items),
                        codecs=codecs)


def _qp(cid, name, default, key, codecs) -> CodecControl:
    return CodecControl(cid, name, T.INTEGER, 0, 51, 1, default, key, codecs=codecs)


H264_CONTROLS: tuple[CodecControl, ...] = (
    _menu(CID.MPEG_VIDEO_BITRATE_MODE, "Video Bitrate Mode", BITRATE_MODE_MENU,
          "cfg:bitrate_mode", "bitrate_mode"),
    CodecControl(CID.MPEG_VIDEO_BITRATE, "Video Bitrate", T.INTEGER, 8_000, 100_000_000, 1,
                 "cfg:bitrate", "bitrate"),
    CodecControl(CID.MPEG_VIDEO_BITRATE_PEAK, "Video Peak Bitrate", T.INTEGER, 8_000, 100_000_000, 1,
                 "cfg:peak", "peak"),
    CodecControl(CID.MPEG_VIDEO_FRAME_RC_ENABLE, "Frame Level Rate Control Enable", T.BOOLEAN,
                 0, 1, 1, "cfg:rc_enable", "rc_enable"),
    CodecControl(CID.MPEG_VIDEO_GOP_SIZE, "Video GOP Size", T.INTEGER, 1, 65535, 1,
                 "cfg:gop", "gop"),
    CodecControl(CID.MPEG_VIDEO_H264_I_PERIOD, "H264 I-Frame Period", T.INTEGER, 1, 65535, 1,
                 "cfg:gop", "gop", codecs=_AVC),
    CodecControl(CID.MPEG_VIDEO_B_FRAMES, "Video B Frames", T.INTEGER, 0, 0, 1, 0, None),
    CodecControl(CID.MPEG_VIDEO_H264_PROFILE, "H264 Profile", T.MENU, 0, len(PROFILE_MENU) - 1, 1,
                 "cfg:profile", "profile", PROFILE_MENU, codecs=_AVC),
    _menu(CID.MPEG_VIDEO_H264_LEVEL, "H264 Level", LEVEL_MENU, LEVEL_DEFAULT, "level"),
    _qp(CID.MPEG_VIDEO_H264_MIN_QP, "H264 Minimum QP Value", 15, "min_qp", _AVC),
    _qp(CID.MPEG_VIDEO_H264_MAX_QP, "H264 Maximum QP Value", 48, "max_qp", _AVC),
    _qp(CID.MPEG_VIDEO_H264_I_FRAME_QP, "H264 I-Frame QP Value", 30, "i_qp", _AVC),
    _qp(CID.MPEG_VIDEO_H264_P_FRAME_QP, "H264 P-Frame QP Value", 30, "p_qp", _AVC),
    _menu(CID.MPEG_VIDEO_HEADER_MODE, "Sequence Header Mode", HEADER_MODE_MENU,
          HEADER_MODE_JOINED, "header_mode"),
    CodecControl(CID.MPEG_VIDEO_REPEAT_SEQ_HEADER, "Repeat Sequence Header", T.BOOLEAN, 0, 1, 1, 1,
                 "repeat_seq_header"),
    CodecControl(CID.MPEG_VIDEO_FORCE_KEY_FRAME, "Force Key Frame", T.BUTTON, 0, 0, 0, 0,
                 "force_key_frame", flags=F.WRITE_ONLY | F.EXECUTE_ON_WRITE),
    CodecControl(CID.MIN_BUFFERS_FOR_OUTPUT, "Min Number of Output Buffers", T.INTEGER, 1, 32, 1, 1,
                 None, flags=F.READ_ONLY | F.VOLATILE),
)


# The HEVC-only controls (the shared ones are in H264_CONTROLS): kernel names and menus
# of v4l2-ctrls-defs.c, values in their own settings so an inactive codec's control
# changes nothing of the other's stream.
HEVC_CONTROLS: tuple[CodecControl, ...] = (
    CodecControl(CID.MPEG_VIDEO_HEVC_PROFILE, "HEVC Profile", T.MENU, 0, 0, 1, 0, "hevc_profile",
                 HEVC_PROFILE_MENU, codecs=_HEVC),
    _menu(CID.MPEG_VIDEO_HEVC_LEVEL, "HEVC Level", HEVC_LEVEL_MENU, HEVC_LEVEL_MENU.index("5.1"),
          "hevc_level", _HEVC),
    _menu(CID.MPEG_VIDEO_HEVC_TIER, "HEVC Tier", HEVC_TIER_MENU, 0, "hevc_tier", _HEVC),
    _qp(CID.MPEG_VIDEO_HEVC_MIN_QP, "HEVC Minimum QP Value", 15, "hevc_min_qp", _HEVC),
    _qp(CID.MPEG_VIDEO_HEVC_MAX_QP, "HEVC Maximum QP Value", 48, "hevc_max_qp", _HEVC),
    _qp(CID.MPEG_VIDEO_HEVC_I_FRAME_QP, "HEVC I-Frame QP Value", 30, "hevc_i_qp", _HEVC),
    _qp(CID.MPEG_VIDEO_HEVC_P_FRAME_QP, "HEVC P-Frame QP Value", 30, "hevc_p_qp", _HEVC),
    CodecControl(CID.MPEG_VIDEO_HEVC_REFRESH_TYPE, "HEVC Refresh Type", T.MENU, HEVC_REFRESH_IDR,
                 HEVC_REFRESH_IDR, 1, HEVC_REFRESH_IDR, None, HEVC_REFRESH_MENU, codecs=_HEVC),
    CodecControl(CID.MPEG_VIDEO_HEVC_REFRESH_PERIOD, "HEVC Refresh Period", T.INTEGER, 1, 65535, 1,
                 "cfg:gop", "gop", codecs=_HEVC),
)


@dataclasses.dataclass(frozen=True)
class CodecFields:
    """Which settings give one codec's EncoderParams fields (QPs, profile, level, tier)."""

    qp: tuple[str, str, str, str]  # settings of min_qp, max_qp, i_qp, p_qp
    stream: Callable[[dict[str, int]], dict]  # values -> profile/level(/tier) fields


CODEC_FIELDS: dict[Codec, CodecFields] = {
    Codec.H264: CodecFields(("min_qp", "max_qp", "i_qp", "p_qp"), lambda v: dict(
        profile=PROFILE_MAP[v["profile"]], level=LEVEL_MENU[v["level"]])),
    Codec.HEVC: CodecFields(("hevc_min_qp", "hevc_max_qp", "hevc_i_qp", "hevc_p_qp"), lambda v: dict(
        profile=Profile.MAIN, level=HEVC_LEVEL_MENU[v["hevc_level"]], high_tier=bool(v["hevc_tier"]))),
}


def _fields(codec: Codec) -> CodecFields:
    # JPEG has none of these fields: a JPEG channel takes (and ignores) the H.264 ones
    return CODEC_FIELDS.get(codec, CODEC_FIELDS[Codec.H264])


def codec_table(table: Iterable[CodecControl], codecs) -> tuple[CodecControl, ...]:
    """The rows of ``table`` that apply to at least one of ``codecs`` (what a backend encodes)."""
    return tuple(c for c in table if not c.codecs.isdisjoint(codecs))


def config_defaults(defaults) -> dict[str, int]:
    """Resolve ``cfg:`` defaults from an impv4l2.config.EncoderDefaults (or None)."""
    bitrate = getattr(defaults, "bitrate", 2_000_000)
    rc_enable, mode = RC_DEFAULTS.get(getattr(defaults, "rc_mode", "vbr"), (1, BITRATE_MODE_VBR))
    return {
        "bitrate": bitrate,
        "peak": min(2 * bitrate, 100_000_000),
        "gop": getattr(defaults, "gop", 50),
        "profile": PROFILE_DEFAULT.get(getattr(defaults, "profile", "high"), 4),
        "rc_enable": rc_enable,
        "bitrate_mode": mode,
    }


class CodecSettings:
    """The control values of one encoding session.

    ``on_change(key, value)`` is called after a setting changed (the session
    forwards it to a running encoder channel); the FORCE_KEY_FRAME button calls
    it with ``("force_key_frame", 0)`` on every press.
    """

    def __init__(self, defaults=None, table: Iterable[CodecControl] = H264_CONTROLS,
                 on_change: Callable[[str, int], None] = lambda k, v: None):
        cfg = config_defaults(defaults)
        self.table = tuple(table)
        self.values: dict[str, int] = {}
        self.on_change = on_change
        for c in self.table:
            if c.key is not None and c.key not in self.values:
                self.values[c.key] = self._default(c, cfg)
        self._cfg = cfg

    @staticmethod
    def _default(c: CodecControl, cfg: dict[str, int]) -> int:
        d = c.default
        return cfg[d[4:]] if isinstance(d, str) else d

    def controls(self, menu_allow: dict[int, frozenset[int]] | None = None) -> list[Control]:
        """V4L2 Control objects backed by these settings (for a ControlSet).

        ``menu_allow``: per menu control id, the values offered (others are
        skipped items: EINVAL, as with the kernel's menu skip masks)."""
        out = []
        for c in self.table:
            default = self._default(c, self._cfg)
            allow = (menu_allow or {}).get(c.cid)
            if allow is not None:
                menu = tuple(m if i in allow else None for i, m in enumerate(c.menu))
                if default not in allow:
                    default = min(allow)
                    if c.key is not None:
                        self.values[c.key] = default
                c = dataclasses.replace(c, menu=menu, maximum=max(allow))
            if c.key is None:
                get, set_ = (lambda d=default: d), (lambda v: None)
            else:
                get = lambda k=c.key: self.values.get(k, 0)
                set_ = lambda v, k=c.key: self.set(k, v)
            out.append(Control(c.cid, c.type, c.name, c.minimum, c.maximum, c.step, default,
                               c.flags, c.menu, get=get, set=set_))
        return out

    def set(self, key: str, value: int) -> None:
        if key != "force_key_frame":
            if self.values.get(key) == value:
                return
            self.values[key] = value
        self.on_change(key, value)

    # ------------------------------------------------------------ mapping

    def rc_fields(self, codec: Codec = Codec.H264) -> dict:
        """EncoderParams fields of the rate control (what update() takes)."""
        v = self.values
        min_qp, max_qp, i_qp, p_qp = (v[k] for k in _fields(codec).qp)
        bitrate = v["bitrate"]
        peak = max(v["peak"], bitrate)
        if not v["rc_enable"]:
            mode = RcMode.FIXQP
        else:
            mode = {BITRATE_MODE_VBR: RcMode.VBR, BITRATE_MODE_CBR: RcMode.CBR,
                    BITRATE_MODE_CQ: RcMode.CAPPED_QUALITY}[v["bitrate_mode"]]
        lo, hi = sorted((min_qp, max_qp))
        return dict(rc_mode=mode, bitrate=bitrate, max_bitrate=peak, min_qp=lo, max_qp=hi,
                    i_qp=i_qp, p_qp=p_qp)

    def stream_fields(self, codec: Codec = Codec.H264) -> dict:
        """EncoderParams fields other than rate control and picture format."""
        return dict(gop=self.values["gop"], **_fields(codec).stream(self.values))

    def params(self, width: int, height: int, fps_num: int, fps_den: int,
               pixel_format: str, codec: Codec = Codec.H264) -> EncoderParams:
        return EncoderParams(codec=codec, width=width, height=height, fps_num=fps_num, fps_den=fps_den,
                             pixel_format=pixel_format, **self.rc_fields(codec), **self.stream_fields(codec))

    def codecs_of(self, cid: int) -> frozenset[Codec]:
        """The codecs the control ``cid`` of this table applies to (none if not in it)."""
        return next((c.codecs for c in self.table if c.cid == cid), frozenset())

    def update_fields(self, key: str, codec: Codec) -> dict | None:
        """The EncoderChannel.update() fields a change of setting ``key`` sends to a
        running ``codec`` channel; None if it does not apply to that codec."""
        fields = _SETTING_FIELDS.get(key)
        applies = any(c.key == key and codec in c.codecs for c in self.table)
        return fields(self, codec) if fields is not None and applies else None

    @property
    def header_separate(self) -> bool:
        return self.values["header_mode"] == HEADER_MODE_SEPARATE

    @property
    def repeat_headers(self) -> bool:
        return bool(self.values["repeat_seq_header"])


# settings whose change is forwarded to a running channel, and how
RC_KEYS = frozenset({"bitrate_mode", "bitrate", "peak", "rc_enable", "min_qp", "max_qp", "i_qp", "p_qp",
                     "hevc_min_qp", "hevc_max_qp", "hevc_i_qp", "hevc_p_qp"})
STREAM_KEYS = frozenset({"gop", "profile", "level", "hevc_level", "hevc_tier"})
_SETTING_FIELDS: dict[str, Callable[[CodecSettings, Codec], dict]] = {
    **{k: CodecSettings.rc_fields for k in RC_KEYS},
    **{k: CodecSettings.stream_fields for k in STREAM_KEYS},
    "jpeg_quality": lambda s, codec: {"jpeg_quality": s.values["jpeg_quality"]},
}
