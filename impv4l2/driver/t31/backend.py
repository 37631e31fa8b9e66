"""The ``t31`` backend: ISP, frame channels and AVPU through libimp.so.

The jobs live in modules of their own: :mod:`.sensor` (which sensor, from
/proc/jz/sensor), :mod:`.sequence` (system bring-up and teardown as tables,
as sample-common.c), :mod:`.isp` (tuning controls), :mod:`.channel` (the
FrameSource channel), :mod:`.stream` (encoded streams), :mod:`.raw` (raw
NV12), :mod:`.capture` (undo lists and capture threads).  This module picks
the SDK release and puts them together; :meth:`T31Backend.close` undoes
everything bring-up did.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from ctypes import byref
from typing import Sequence

from ..base import Backend, ChannelMode, Codec, Encoder, EncoderChannel, EncoderParams, SensorInfo
from . import structs as st
from .channel import FS_WIDTH_ALIGN, T31FrameChannel
from .isp import T31Isp
from .libimp import LibImp, T31Error
from .raw import NV12_UV_ALIGN
from .sensor import PROC_SENSOR, SensorSetup, read_proc_sensor, sensor_setup
from .sequence import INITIAL_RUNNING_MODE, OSD_POOL_SIZE, SystemSequence
from .stream import EncoderChannels, T31StreamChannel

log = logging.getLogger("impv4l2.t31")
S = st.native

__all__ = ["T31Backend", "T31Error", "T31Isp", "T31FrameChannel", "T31StreamChannel", "SensorSetup",
           "read_proc_sensor", "sensor_setup", "FS_WIDTH_ALIGN", "NV12_UV_ALIGN", "OSD_POOL_SIZE",
           "INITIAL_RUNNING_MODE"]

DEFAULT_FPS = 25  # neither configured nor in /proc


class T31Encoder(Encoder):
    """The AVPU as a memory-to-memory encoder.

    SDK 1.1.x has no public call to feed user frames to an encoder channel
    (only FrameSource bindings), so this backend does not offer M2M."""

    m2m = False
    # H.265 is in every T31 SDK 1.1.x (IMP_ENC_PROFILE_HEVC_MAIN, the pack's h265NalType)
    codecs = frozenset({Codec.H264, Codec.HEVC, Codec.JPEG})

    def create_channel(self, params: EncoderParams) -> EncoderChannel:
        raise T31Error("libimp 1.1.x cannot encode user frames (no M2M path); use the sim encoder")



def _align_down(v: int, a: int) -> int:
    return v - v % a


class T31Backend(Backend):
    """Ingenic T31 through libimp.so.

    Options: ``lib_path`` (else $IMPV4L2_LIBIMP, else the system's libimp.so);
    the sensor (``sensor``, ``i2c_addr``, ``i2c_adapter``, ``sensor_width``,
    ``sensor_height``, ``max_fps``) from ``proc_root`` (/proc/jz/sensor), each
    option overriding it; ``fps`` (the sensor's running rate, at most max_fps);
    ``channels`` (ChannelMode per frame channel, or ``(w, h, fps)``/dicts;
    default main = sensor size, sub = 640x360; widths rounded down to a multiple
    of 16); ``poll_timeout_ms`` (stream timeout -> error buffer), ``nr_vbs``,
    ``raw_depth``; ``sdk`` (a release of structs.SDK_STRUCTS, else what
    IMP_System_GetVersion reports)."""

    name = "t31"
    # A T31X: 128 MB, ~29 MB reserved for ISP/AVPU, ~99 MB for Linux, the
    # daemon ~20 MB beside; 12 MiB is four 1080p NV12 frames.  (A T31N/L has
    # 64 MB: set [nodes] buffer_mb / total_buffer_mb lower.)
    buffer_memory = 12 << 20
    total_buffer_memory = 24 << 20

    def __init__(self, lib_path: str | None = None, sensor: str | None = None, i2c_addr: int | str | None = None,
                 i2c_adapter: int | None = None, sensor_width: int | None = None,
                 sensor_height: int | None = None, max_fps: int | None = None, fps: int | None = None,
                 channels: Sequence | None = None, poll_timeout_ms: int = 1000, nr_vbs: int = 2,
                 raw_depth: int = 1, sdk: str | None = None, proc_root: str = PROC_SENSOR, **extra):
        if extra:  # a typo in the [t31] table should not pass silently
            log.warning("t31: unknown options ignored: %s", ", ".join(sorted(extra)))
        self.lib = LibImp(lib_path)
        self.poll_timeout_ms, self.nr_vbs, self.raw_depth = int(poll_timeout_ms), int(nr_vbs), int(raw_depth)
        self.libimp_version, self.sdk = self._sdk(sdk)
        self.frame_cls = st.sdk_struct(S, self.sdk, "IMPFrameInfo")
        self.stream_cls = st.sdk_struct(S, self.sdk, "IMPEncoderStream")
        sen = self.sensor_setup = sensor_setup(proc_root, dict(
            sensor=sensor, i2c_addr=i2c_addr, i2c_adapter=i2c_adapter, sensor_width=sensor_width,
            sensor_height=sensor_height, max_fps=max_fps))
        rate = int(fps) if fps else (sen.max_fps or DEFAULT_FPS)
        if sen.max_fps and rate > sen.max_fps:
            log.warning("t31: fps %d above the sensor's %d: running at %d", rate, sen.max_fps, sen.max_fps)
            rate = sen.max_fps
        log.info("t31: libimp %s (SDK %s structs), sensor %s at i2c 0x%x bus %d, %dx%d, max %s fps (%s),"
                 " running at %d fps", self.libimp_version or "of unknown version", self.sdk, sen.name,
                 sen.i2c_addr, sen.i2c_adapter, sen.width, sen.height, sen.max_fps or "?", sen.source, rate)
        self.sensor = SensorInfo(sen.name, sen.width, sen.height, rate)
        self.system: SystemSequence | None = None
        self._closed = False
        self._bring_up(sen, rate)
        try:
            self.isp = T31Isp(self.lib, self.sensor)
            # frame-source widths are multiples of FS_WIDTH_ALIGN: the largest such size fits the sensor
            max_w = _align_down(sen.width, FS_WIDTH_ALIGN)
            modes = [self._mode(m) for m in (channels or [(max_w, sen.height, rate), (640, 360, rate)])]
            # ch0 scales down from the sensor; ch1 too, and never above 1920x1080
            sub_max = (min(max_w, 1920), min(sen.height, 1080))
            self.enc_channels = EncoderChannels()
            self.channels = [T31FrameChannel(self, i, "main" if i == 0 else "sub",
                                             (max_w, sen.height) if i == 0 else sub_max, m)
                             for i, m in enumerate(modes)]
            self.encoder = T31Encoder()
        except Exception:
            self.close()
            raise

    @staticmethod
    def preflight(lib_path: str | None = None, **_options) -> None:
        """Load libimp.so and resolve its symbols, touching no hardware: one T31Error naming
        the library and where it was looked for (the daemon calls this before it waits for
        the hardware)."""
        LibImp(lib_path)

    def _sdk(self, option: str | None) -> tuple[str | None, str]:
        """(what IMP_System_GetVersion says, the SDK_STRUCTS release used)."""
        text = None
        if self.lib.has("version"):
            v = S.IMPVersion()
            if self.lib.IMP_System_GetVersion(byref(v)) == 0:
                text = v.aVersion.decode(errors="replace").strip() or None
        detected, exact = st.sdk_release(text or "")
        if option:
            release, ok = st.sdk_release(str(option))
            if release is None or not ok:
                raise T31Error(f"t31: sdk = {option!r}: not one of {', '.join(st.SDK_RELEASES)}")
            if detected and release != detected:
                log.warning("t31: sdk = %s overrides libimp's %s", release, text)
            return text, release
        if detected is None:
            log.warning("t31: libimp reports no version (%r): SDK %s structs assumed; set sdk = ...",
                        text, st.SDK_RELEASES[0])
            return text, st.SDK_RELEASES[0]
        if not exact:
            log.warning("t31: libimp %s is not a release known here: using SDK %s structs", text, detected)
        return text, detected

    @staticmethod
    def _mode(m) -> ChannelMode:
        if isinstance(m, ChannelMode):
            mode = m
        elif isinstance(m, dict):
            mode = ChannelMode(int(m["width"]), int(m["height"]), int(m["fps"]))
        else:
            mode = ChannelMode(*(int(v) for v in m))
        if mode.width % FS_WIDTH_ALIGN:  # adjusted as S_FMT adjusts, not refused
            w = max(FS_WIDTH_ALIGN, _align_down(mode.width, FS_WIDTH_ALIGN))
            log.warning("t31: channel width %d is not a multiple of %d: %d", mode.width, FS_WIDTH_ALIGN, w)
            mode = dataclasses.replace(mode, width=w)
        return mode

    def _bring_up(self, sen: SensorSetup, fps: int) -> None:
        self.system = SystemSequence(self.lib, sen.name, sen.i2c_addr, sen.i2c_adapter)
        self.system.up(fps)
        self._ts_offset_ns = None
        if self.lib.has("timestamps"):  # IMP clock (us since System_Init) -> CLOCK_MONOTONIC
            self._ts_offset_ns = time.monotonic_ns() - self.lib.IMP_System_GetTimeStamp() * 1000

    def to_monotonic_ns(self, imp_us: int) -> int:
        if self._ts_offset_ns is None or not imp_us:
            return time.monotonic_ns()
        return imp_us * 1000 + self._ts_offset_ns

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ch in getattr(self, "channels", ()):
            ch.stop()
        if self.system is not None:
            self.system.down()
