"""The ``t31`` backend: ISP, frame channels and AVPU through libimp.so.

Bring-up and teardown follow the SDK samples (sample-common.c,
sample-Encoder-video.c) step by step; every step that succeeded pushes its
undo, so a failure anywhere unwinds exactly what was done, in reverse, and
:meth:`T31Backend.close` is the exact reverse of bring-up.

Per started stream one capture thread waits in IMP_Encoder_PollingStream
(or IMP_FrameSource_GetFrame for raw NV12) with a timeout; a timeout becomes
``FrameInfo(error=True)`` for the sink, never a hang.  Stream memory is
copied once into the sink's buffer (ctypes.memmove, wrap-around of the
stream ring handled) and released to the library right after the copy.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading
import time
from ctypes import byref
from pathlib import Path
from typing import Any, Callable, Sequence

from ..base import (Backend, ChannelMode, Codec, ControlKind, ControlSpec, EncodedFrame, Encoder,
                    EncoderChannel, EncoderParams, FrameChannel, FrameInfo, FrameSink, Isp, Profile,
                    RcMode, SensorInfo)
from . import structs as st
from .libimp import LibImp, T31Error

log = logging.getLogger("impv4l2.t31")
S = st.native

__all__ = ["T31Backend", "T31Error", "T31Isp", "T31FrameChannel", "T31StreamChannel"]

JPEG_CHN_BASE = 4  # SDK samples: JPEG encoder channel = 4 + frame channel
PROFILES = {Profile.BASELINE: st.IMP_ENC_PROFILE_AVC_BASELINE, Profile.MAIN: st.IMP_ENC_PROFILE_AVC_MAIN,
            Profile.HIGH: st.IMP_ENC_PROFILE_AVC_HIGH}
SCALED_SIZES = ((2560, 1440), (1920, 1080), (1280, 720), (960, 540), (640, 360), (320, 180))

# Vendor facts, one entry each:
# frame-source widths are multiples of FS_WIDTH_ALIGN (the vendor's IMP_FrameSource_CreateChn
# refuses others); an NV12 frame has its UV plane at width * ALIGN(height, NV12_UV_ALIGN), the
# rows between are padding (OpenIMP framesource_tseries.c: buffers ALIGN16(w) * ALIGN16(h) * 3/2;
# the SDK samples' nv12_copyto_yuyv422 reads UV at src + w * ((h + 15) & ~15)).
FS_WIDTH_ALIGN = 16
NV12_UV_ALIGN = 16
# Bring-up as sample-common.c sample_system_init (SDK 1.1.1) and prudynt IMPSystem::init:
# IMP_OSD_SetPoolSize before IMP_ISP_Open (512 KiB in the sample), the day running mode after
# IMP_ISP_EnableTuning (IMPISP_RUNNING_MODE_DAY = 0).
OSD_POOL_SIZE = 512 * 1024
INITIAL_RUNNING_MODE = 0

# The sensor as the kernel's sensor module reports it (thingino's sensor-info: one file per
# value under /proc/jz/sensor/, i2c_addr in hex as "0x37"; read as prudynt's ProcfsSensor):
# (file, backend option it fills, parser).  i2c_bus is optional (prudynt reads it if present).
PROC_SENSOR = "/proc/jz/sensor"
PROC_SENSOR_FILES: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("name", "sensor", str),
    ("i2c_addr", "i2c_addr", lambda v: int(v, 16)),
    ("width", "sensor_width", int),
    ("height", "sensor_height", int),
    ("max_fps", "max_fps", int),
    ("i2c_bus", "i2c_adapter", int),
)
# What AddSensor needs; without /proc/jz/sensor the configuration must give all of it.
SENSOR_REQUIRED = ("sensor", "i2c_addr", "sensor_width", "sensor_height")
DEFAULT_FPS = 25  # neither configured nor in /proc


# ---------------------------------------------------------------- ISP

# (control, setter, getter, spec).  A control exists only when its setter
# resolved in libimp; the getter (optional too) seeds the cached value.
_U8 = dict(kind=ControlKind.INTEGER, minimum=0, maximum=255, default=128)
ISP_CONTROLS: tuple[tuple[str, str, str, ControlSpec], ...] = (
    ("brightness", "IMP_ISP_Tuning_SetBrightness", "IMP_ISP_Tuning_GetBrightness",
     ControlSpec("brightness", **_U8)),
    ("contrast", "IMP_ISP_Tuning_SetContrast", "IMP_ISP_Tuning_GetContrast",
     ControlSpec("contrast", **_U8)),
    ("saturation", "IMP_ISP_Tuning_SetSaturation", "IMP_ISP_Tuning_GetSaturation",
     ControlSpec("saturation", **_U8)),
    ("sharpness", "IMP_ISP_Tuning_SetSharpness", "IMP_ISP_Tuning_GetSharpness",
     ControlSpec("sharpness", **_U8)),
    ("hue", "IMP_ISP_Tuning_SetBcshHue", "IMP_ISP_Tuning_GetBcshHue", ControlSpec("hue", **_U8)),
    ("hflip", "IMP_ISP_Tuning_SetISPHflip", "IMP_ISP_Tuning_GetISPHflip",
     ControlSpec("hflip", ControlKind.BOOLEAN)),
    ("vflip", "IMP_ISP_Tuning_SetISPVflip", "IMP_ISP_Tuning_GetISPVflip",
     ControlSpec("vflip", ControlKind.BOOLEAN)),
    # IMPISPAntiflickerAttr: DISABLE, 50HZ, 60HZ (= V4L2's menu order)
    ("power_line_frequency", "IMP_ISP_Tuning_SetAntiFlickerAttr", "IMP_ISP_Tuning_GetAntiFlickerAttr",
     ControlSpec("power_line_frequency", ControlKind.MENU, 0, 2, 1, 1, ("Disabled", "50 Hz", "60 Hz"))),
    # IMPISPRunningMode: DAY=0, NIGHT=1
    ("day_night", "IMP_ISP_Tuning_SetISPRunningMode", "IMP_ISP_Tuning_GetISPRunningMode",
     ControlSpec("day_night", ControlKind.MENU, 0, 1, 1, 0, ("Day", "Night"))),
    # AE compensation (128 = neutral) stands in for exposure; max analog gain for gain.
    ("exposure", "IMP_ISP_Tuning_SetAeComp", "IMP_ISP_Tuning_GetAeComp",
     ControlSpec("exposure", **_U8)),
    ("gain", "IMP_ISP_Tuning_SetMaxAgain", "IMP_ISP_Tuning_GetMaxAgain",
     ControlSpec("gain", ControlKind.INTEGER, 0, 160, 1, 160)),
)


# uMaxSameSenceCnt: the 1.1.5/1.1.6 SetDefaultParam doc says "GOPLength = uGopLength *
# uMaxSameSenceCnt" (the strongest source; the SDK 1.1.1 sample passes 2 without a word), so
# 1 makes the IDR interval the GOP the client asked for.  One entry to change if hardware
# shows otherwise.
GOP_SAME_SCENE_CNT = 1


class T31Isp(Isp):
    """ISP tuning through IMP_ISP_Tuning_* (only the setters the library has)."""

    def __init__(self, lib: LibImp, sensor: SensorInfo):
        self.lib = lib
        self.sensor = sensor
        self._setters: dict[str, Callable] = {}
        self._values: dict[str, int] = {}
        specs = []
        for name, setter, getter, spec in ISP_CONTROLS:
            fn = getattr(lib, setter)
            if fn is None:
                continue
            self._setters[name] = fn
            specs.append(spec)
            self._values[name] = self._read(getter, spec)
        self._specs = tuple(specs)

    def _read(self, getter: str, spec: ControlSpec) -> int:
        fn = getattr(self.lib, getter)
        if fn is None:
            return spec.default
        out = fn.argtypes[0]._type_()
        if fn(byref(out)) < 0:
            return spec.default
        return min(max(int(out.value), spec.minimum), spec.maximum)

    @property
    def controls(self) -> Sequence[ControlSpec]:
        return self._specs

    def get(self, name: str) -> int:
        return self._values[name]

    def set(self, name: str, value: int) -> None:
        fn = self._setters.get(name)
        if fn is None:
            raise KeyError(name)
        ret = fn(int(value))
        if ret < 0:
            raise T31Error(f"{fn.__name__}({value}) failed ({ret})")
        self._values[name] = int(value)


# ---------------------------------------------------------------- helpers

def _undo_all(undo: list[tuple[str, Callable[[], int]]], what: str) -> None:
    """Run undo steps in reverse; failures are logged, never raised."""
    while undo:
        name, fn = undo.pop()
        try:
            ret = fn()
            if ret is not None and ret < 0:
                log.error("%s: %s failed (%d)", what, name, ret)
        except Exception:  # noqa: BLE001 - teardown must go on
            log.exception("%s: %s raised", what, name)


def _run(steps: Sequence, index: int) -> None:
    """Run teardown steps in the given order (errors logged)."""
    _undo_all(list(reversed(steps)), f"ch{index}")


def _dest(buf: memoryview):
    """(address, capacity) of a writable sink buffer."""
    arr = (ctypes.c_char * len(buf)).from_buffer(buf)
    return arr, ctypes.addressof(arr), len(buf)


class _Capture:
    """One capture thread: ``step()`` delivers one frame or raises TimeoutError."""

    def __init__(self, name: str, step: Callable[[], None], on_timeout: Callable[[], None]):
        self.stop_event = threading.Event()
        self._step, self._on_timeout = step, on_timeout
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try:
                self._step()
            except TimeoutError:
                self._on_timeout()
                if time.monotonic() - t0 < 0.01:  # a failing call returning at once must not spin
                    self.stop_event.wait(0.05)
            except Exception:  # noqa: BLE001 - keep capturing; the sink or library misbehaved once
                log.exception("%s: capture step failed", self.thread.name)
                self.stop_event.wait(0.05)

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not threading.current_thread():
            self.thread.join()


# ---------------------------------------------------------------- encoded streams

class T31StreamChannel(EncoderChannel):
    """An encoder channel bound to a frame channel (FrameSource -> Encoder tunnel)."""

    def __init__(self, channel: "T31FrameChannel", params: EncoderParams, enc_chn: int):
        self.params = params
        self.channel = channel
        self.enc_chn = enc_chn
        self.lib = channel.lib
        self.capture: _Capture | None = None
        self.sink: FrameSink | None = None
        self._seq = 0
        self._resync = False  # an AU was lost: deliver nothing before the next IDR
        # SetChnBitRate: H.264/H.265 channels with a rate control only (imp_encoder.h @attention)
        self._rate_controlled = params.codec is not Codec.JPEG and params.rc_mode is not RcMode.FIXQP
        # the release's IMPEncoderStream (+ ABI_TAIL), used through its 1.1.1 head
        self._stream_full = st.alloc(channel.backend.stream_cls)
        self._stream = S.IMPEncoderStream.from_buffer(self._stream_full._raw)

    # the tunnel has no input port: frames come from the FrameSource
    def encode(self, nv12: memoryview, timestamp_ns: int) -> EncodedFrame:
        raise T31Error("a bound T31 encoder channel takes its frames from the FrameSource")

    def request_idr(self) -> None:
        if self.lib.has("idr"):
            self.lib.call("IMP_Encoder_RequestIDR", self.enc_chn)
        elif self.lib.has("flush"):  # FlushStream also restarts the GOP
            self.lib.call("IMP_Encoder_FlushStream", self.enc_chn)
        else:
            log.warning("ch%d: libimp has no RequestIDR/FlushStream", self.channel.index)

    def update(self, **changes) -> None:
        for key, value in changes.items():
            setattr(self.params, key, value)
        if {"bitrate", "max_bitrate"} & changes.keys() and self.lib.has("bitrate") and self._rate_controlled:
            # bit/s (1.1.4 zh imp_encoder.h: 码率单位是 bit/s; 1.1.6 en: unit "bit/s"), unlike the
            # kbit/s of SetDefaultParam and the rc attrs
            self.lib.call("IMP_Encoder_SetChnBitRate", self.enc_chn, int(self.params.bitrate),
                          int(self.params.max_bitrate))
        if "gop" in changes and self.lib.has("gop"):
            self.lib.call("IMP_Encoder_SetChnGopLength", self.enc_chn, int(self.params.gop))

    def close(self) -> None:
        self.channel._close_stream(self)

    # -- capture thread
    def _start(self, sink: FrameSink, timeout_ms: int) -> None:
        self.sink, self._timeout_ms = sink, timeout_ms
        name = f"impv4l2-t31-ch{self.channel.index}-{self.params.codec.value}"
        self.capture = _Capture(name, self._step, self._timeout)

    def _timeout(self) -> None:
        self.channel._deliver_error(self.sink, self._seq)

    def _step(self) -> None:
        lib, chn, stream = self.lib, self.enc_chn, self._stream
        if lib.IMP_Encoder_PollingStream(chn, self._timeout_ms) < 0:
            raise TimeoutError
        if lib.IMP_Encoder_GetStream(chn, byref(stream), True) < 0:
            raise TimeoutError
        buf = None
        try:
            key = self._keyframe(stream)
            # The AVPU encoded the AU whether or not a client buffer was free: after a drop the
            # P-frames that follow reference a picture the client never got, so none is delivered
            # until the IDR asked for at the drop.
            if key:
                self._resync = False
            if not self._resync:
                buf = self.sink.get_buffer()
            info = self._copy(stream, buf, key)
            if (buf is None or info.error) and not self._resync and self.params.codec is not Codec.JPEG:
                self._resync = True
                log.debug("ch%d: AU %d lost (%s): skipping to the next IDR", self.channel.index,
                          stream.seq, "too large" if buf is not None else "no free buffer")
                self.request_idr()
        finally:
            lib.IMP_Encoder_ReleaseStream(chn, byref(stream))  # promptly: the ring is small
        self._seq = stream.seq + 1
        if buf is not None:
            self.sink.frame_done(buf, info)

    def _keyframe(self, stream) -> bool:
        packs = stream.pack
        return self.params.codec is Codec.JPEG or any(
            packs[i].nalType.h264NalType == st.H264_NAL_IDR for i in range(stream.packCount))

    def _copy(self, stream, buf: memoryview | None, key: bool) -> FrameInfo:
        """Assemble the access unit of ``stream`` into ``buf`` (packs in order,
        each one NAL with its start code; a pack may wrap the stream ring)."""
        n = stream.packCount
        packs = stream.pack
        ts_us = packs[0].timestamp if n else 0
        info = FrameInfo(timestamp_ns=self.channel.backend._to_monotonic_ns(ts_us), sequence=stream.seq)
        if buf is None:
            return info
        _keep, dst, cap = _dest(buf)
        base, size, pos = stream.virAddr, stream.streamSize, 0
        for i in range(n):
            p = packs[i]
            off, length = p.offset % size, p.length
            if pos + length > cap:
                log.warning("ch%d: access unit larger than the buffer (%d bytes)", self.channel.index, cap)
                info.error = True
                break
            first = min(length, size - off)
            ctypes.memmove(dst + pos, base + off, first)
            if length > first:  # wrapped around the end of the ring
                ctypes.memmove(dst + pos + first, base, length - first)
            pos += length
        info.bytesused, info.keyframe = pos, key
        return info


# ---------------------------------------------------------------- frame channels

class T31FrameChannel(FrameChannel):
    """IMP FrameSource channel: raw NV12 (GetFrame) and bound encoder streams.

    Raw and encoded consumers may run at the same time; the FrameSource
    channel lives while any of them does."""

    def __init__(self, backend: "T31Backend", index: int, role: str, max_size: tuple[int, int],
                 mode: ChannelMode):
        self.backend, self.lib = backend, backend.lib
        self.index, self.role = index, role
        self.max_width, self.max_height = max_size
        self._mode = mode
        self._lock = threading.RLock()
        self._created = self._enabled = self._bound = self._group = False
        self._raw: _Capture | None = None
        self._raw_sink: FrameSink | None = None
        self._raw_seq = 0
        self._streams: dict[int, T31StreamChannel] = {}

    # -- FrameChannel
    def sizes(self) -> Sequence[tuple[int, int]]:
        # max_width is a multiple of FS_WIDTH_ALIGN (T31Backend), so S_FMT's nearest size is too
        sizes = [(w, h) for w, h in SCALED_SIZES if w <= self.max_width and h <= self.max_height]
        if (self.max_width, self.max_height) not in sizes:
            sizes.insert(0, (self.max_width, self.max_height))
        return sizes

    def frame_rates(self) -> Sequence[int]:
        return [r for r in (30, 25, 20, 15, 10, 5) if r <= self.backend.sensor.fps] or [self.backend.sensor.fps]

    @property
    def mode(self) -> ChannelMode:
        return self._mode

    def configure(self, mode: ChannelMode) -> None:
        with self._lock:
            if self._created:
                raise T31Error(f"ch{self.index}: configure while streaming")
            if mode.width > self.max_width or mode.height > self.max_height:
                raise ValueError(f"ch{self.index}: {mode.width}x{mode.height} above the channel maximum")
            if mode.width <= 0 or mode.height <= 0 or mode.width % 2 or mode.height % 2:
                raise ValueError(f"ch{self.index}: {mode.width}x{mode.height} is not an NV12 size")
            if mode.width % FS_WIDTH_ALIGN:  # IMP_FrameSource_CreateChn would refuse it
                raise ValueError(f"ch{self.index}: width {mode.width} is not a multiple of {FS_WIDTH_ALIGN}"
                                 " (IMP frame source)")
            if not 0 < mode.fps <= self.backend.sensor.fps:  # channels only decimate the sensor
                raise ValueError(f"ch{self.index}: {mode.fps} fps outside 1..{self.backend.sensor.fps}"
                                 " (the sensor rate)")
            self._mode = mode

    @property
    def busy(self) -> bool:
        return self._raw is not None or bool(self._streams)

    def start(self, sink: FrameSink) -> None:
        lib = self.lib
        if not lib.has("raw"):
            raise T31Error("libimp lacks IMP_FrameSource_GetFrame/ReleaseFrame/SetFrameDepth")
        with self._lock:
            if self._raw is not None:
                raise T31Error(f"ch{self.index}: raw capture already started")
            undo: list = []
            try:
                self._fs_up(undo)
                lib.call("IMP_FrameSource_SetFrameDepth", self.index, self.backend.raw_depth)
                undo.append(("SetFrameDepth 0", lambda: lib.IMP_FrameSource_SetFrameDepth(self.index, 0)))
            except Exception:
                _undo_all(undo, f"ch{self.index}")
                raise
            self._raw_sink, self._raw_seq = sink, 0
            self._frame_ptr = ctypes.POINTER(S.IMPFrameInfo)()
            self._raw = _Capture(f"impv4l2-t31-ch{self.index}-nv12", self._raw_step,
                                 lambda: self._deliver_error(self._raw_sink, self._raw_seq))

    def start_encoded(self, params: EncoderParams, sink: FrameSink) -> EncoderChannel:
        lib = self.lib
        jpeg = params.codec is Codec.JPEG
        enc_chn = (JPEG_CHN_BASE if jpeg else 0) + self.index
        with self._lock:
            if enc_chn in self._streams:
                raise T31Error(f"ch{self.index}: {params.codec.value} stream already started")
            sc = T31StreamChannel(self, params, enc_chn)
            undo: list = []
            try:
                self._fs_up(undo, enable=False)
                if not self._group:
                    lib.call("IMP_Encoder_CreateGroup", self.index)
                    self._group = True
                    undo.append(("DestroyGroup", self._destroy_group))
                attr = st.alloc(S.IMPEncoderChnAttr)
                self._default_param(attr, params, jpeg)
                lib.call("IMP_Encoder_CreateChn", enc_chn, byref(attr))
                undo.append(("Encoder_DestroyChn", lambda: lib.IMP_Encoder_DestroyChn(enc_chn)))
                lib.call("IMP_Encoder_RegisterChn", self.index, enc_chn)
                undo.append(("UnRegisterChn", lambda: lib.IMP_Encoder_UnRegisterChn(enc_chn)))
                if not self._bound:
                    src, dst = self._cells()
                    lib.call("IMP_System_Bind", byref(src), byref(dst))
                    self._bound = True
                    undo.append(("UnBind", self._unbind))
                if not self._enabled:
                    lib.call("IMP_FrameSource_EnableChn", self.index)
                    self._enabled = True
                    undo.append(("DisableChn", self._disable))
                lib.call("IMP_Encoder_StartRecvPic", enc_chn)
            except Exception:
                _undo_all(undo, f"ch{self.index}")
                raise
            self._streams[enc_chn] = sc
            sc._start(sink, self.backend.poll_timeout_ms)
            return sc

    def stop(self) -> None:
        with self._lock:
            for sc in list(self._streams.values()):
                self._close_stream(sc)
            self._stop_raw()

    # -- internals
    def _fs_attr(self):
        m = self._mode
        a = S.IMPFSChnAttr()
        a.picWidth, a.picHeight, a.pixFmt = m.width, m.height, st.PIX_FMT_NV12
        a.outFrmRateNum, a.outFrmRateDen = m.fps, 1
        a.nrVBs, a.type = self.backend.nr_vbs, st.FS_PHY_CHANNEL
        if (m.width, m.height) != (self.backend.sensor.width, self.backend.sensor.height):
            a.scaler.enable, a.scaler.outwidth, a.scaler.outheight = 1, m.width, m.height
        return a

    def _fs_up(self, undo: list, enable: bool = True) -> None:
        lib = self.lib
        if not self._created:
            attr = self._fs_attr()
            lib.call("IMP_FrameSource_CreateChn", self.index, byref(attr))
            self._created = True
            undo.append(("FrameSource_DestroyChn", self._destroy_fs))
            lib.call("IMP_FrameSource_SetChnAttr", self.index, byref(attr))
        if enable and not self._enabled:
            lib.call("IMP_FrameSource_EnableChn", self.index)
            self._enabled = True
            undo.append(("DisableChn", self._disable))

    def _cells(self):
        return (S.IMPCell(st.DEV_ID_FS, self.index, 0), S.IMPCell(st.DEV_ID_ENC, self.index, 0))

    def _disable(self) -> int:
        self._enabled = False
        return self.lib.IMP_FrameSource_DisableChn(self.index)

    def _unbind(self) -> int:
        self._bound = False
        src, dst = self._cells()
        return self.lib.IMP_System_UnBind(byref(src), byref(dst))

    def _destroy_group(self) -> int:
        self._group = False
        return self.lib.IMP_Encoder_DestroyGroup(self.index)

    def _destroy_fs(self) -> int:
        self._created = False
        return self.lib.IMP_FrameSource_DestroyChn(self.index)

    def _default_param(self, attr, p: EncoderParams, jpeg: bool) -> None:
        if jpeg:  # as sample_jpeg_init: FIXQP, qp from quality
            qp = max(1, min(51, round(51 - p.jpeg_quality * 0.5)))
            args = (st.IMP_ENC_PROFILE_JPEG, int(RcMode.FIXQP), p.width, p.height, p.fps_num, p.fps_den,
                    0, 0, qp, 0)
        else:
            qp = p.i_qp if p.rc_mode is RcMode.FIXQP else -1
            args = (PROFILES[p.profile], int(p.rc_mode), p.width, p.height, p.fps_num, p.fps_den,
                    p.gop, GOP_SAME_SCENE_CNT, qp, p.bitrate // 1000)  # SDK bit rates are kbit/s
        self.lib.call("IMP_Encoder_SetDefaultParam", byref(attr), *args)
        rc = attr.rcAttr.attrRcMode
        if not jpeg and p.rc_mode is not RcMode.FIXQP:
            sub = {RcMode.CBR: rc.attrCbr, RcMode.VBR: rc.attrVbr, RcMode.CAPPED_VBR: rc.attrCappedVbr,
                   RcMode.CAPPED_QUALITY: rc.attrCappedQuality}[p.rc_mode]
            sub.iMinQP, sub.iMaxQP = p.min_qp, p.max_qp
            if p.rc_mode is not RcMode.CBR:
                sub.uMaxBitRate = p.max_bitrate // 1000

    def _close_stream(self, sc: T31StreamChannel) -> None:
        """Stop one encoder stream; when it is the channel's last consumer,
        tear down in the exact reverse of start_encoded."""
        lib, chn = self.lib, sc.enc_chn
        with self._lock:
            if self._streams.get(chn) is not sc:
                return
            del self._streams[chn]
            if sc.capture:
                sc.capture.stop()
            _run([("StopRecvPic", lambda: lib.IMP_Encoder_StopRecvPic(chn))], self.index)
            encoder = [("UnRegisterChn", lambda: lib.IMP_Encoder_UnRegisterChn(chn)),
                       ("Encoder_DestroyChn", lambda: lib.IMP_Encoder_DestroyChn(chn))]
            if self.busy:  # others still use the FrameSource / group / binding
                _run(encoder, self.index)
            else:
                self._teardown(encoder)

    def _stop_raw(self) -> None:
        with self._lock:
            if self._raw is None:
                return
            self._raw.stop()
            self._raw = None
            _run([("SetFrameDepth 0", lambda: self.lib.IMP_FrameSource_SetFrameDepth(self.index, 0))],
                 self.index)
            if not self.busy:
                self._teardown()

    def _teardown(self, encoder_steps: Sequence = ()) -> None:
        """FrameSource side, reverse of bring-up: DisableChn, UnBind, [encoder
        UnRegisterChn/DestroyChn], DestroyGroup, FrameSource DestroyChn."""
        steps = []
        if self._enabled:
            steps.append(("DisableChn", self._disable))
        if self._bound:
            steps.append(("UnBind", self._unbind))
        steps.extend(encoder_steps)
        if self._group:
            steps.append(("DestroyGroup", self._destroy_group))
        if self._created:
            steps.append(("FrameSource_DestroyChn", self._destroy_fs))
        _run(steps, self.index)

    def _deliver_error(self, sink: FrameSink | None, seq: int) -> None:
        """A timeout: hand the client an errored buffer instead of hanging."""
        log.warning("ch%d: no frame within %d ms", self.index, self.backend.poll_timeout_ms)
        buf = sink.get_buffer() if sink else None
        if buf is not None:
            sink.frame_done(buf, FrameInfo(timestamp_ns=time.monotonic_ns(), sequence=seq, error=True))

    def _raw_step(self) -> None:
        lib, fp = self.lib, self._frame_ptr
        if lib.IMP_FrameSource_GetFrame(self.index, byref(fp)) < 0:
            raise TimeoutError
        buf = None
        try:
            f = fp.contents
            ts_us = self.backend._frame_timestamp(fp)
            buf = self._raw_sink.get_buffer()
            info = FrameInfo(timestamp_ns=self.backend._to_monotonic_ns(ts_us), sequence=self._raw_seq)
            if buf is not None:
                _keep, dst, cap = _dest(buf)
                w, h = f.width, f.height
                y, uv = w * h, w * (h // 2)  # contiguous NV12 for the client
                if y + uv > cap:
                    info.error, y, uv = True, min(y, cap), max(0, cap - y)
                ctypes.memmove(dst, f.virAddr, y)  # the one copy, plane by plane:
                uv_at = w * (-(-h // NV12_UV_ALIGN) * NV12_UV_ALIGN)  # the UV plane after padding rows
                ctypes.memmove(dst + y, f.virAddr + uv_at, uv)
                info.bytesused = y + uv
        finally:
            lib.IMP_FrameSource_ReleaseFrame(self.index, fp)
        self._raw_seq += 1
        if buf is not None:
            self._raw_sink.frame_done(buf, info)


# ---------------------------------------------------------------- encoder (M2M)

class T31Encoder(Encoder):
    """The AVPU as a memory-to-memory encoder.

    SDK 1.1.x has no public call to feed user frames to an encoder channel
    (only FrameSource bindings), so this backend does not offer M2M."""

    m2m = False

    def create_channel(self, params: EncoderParams) -> EncoderChannel:
        raise T31Error("libimp 1.1.x cannot encode user frames (no M2M path); use the sim encoder")


# ---------------------------------------------------------------- backend

@dataclasses.dataclass(frozen=True)
class SensorSetup:
    """The sensor to add: /proc/jz/sensor, configuration overriding it field by field."""

    name: str
    i2c_addr: int
    i2c_adapter: int
    width: int
    height: int
    max_fps: int | None
    source: str  # where it came from, for the start log line


def read_proc_sensor(root: str | Path) -> dict[str, Any] | None:
    """The PROC_SENSOR_FILES values under ``root`` (None: no such directory)."""
    d = Path(root)
    if not d.is_dir():
        return None
    out: dict[str, Any] = {}
    for fname, key, parse in PROC_SENSOR_FILES:
        try:
            text = (d / fname).read_text().strip()
        except OSError:
            continue
        try:
            if text:
                out[key] = parse(text)
        except ValueError:
            log.warning("t31: %s: %r is not a value, ignored", d / fname, text)
    return out


def sensor_setup(proc_root: str | Path, configured: dict[str, Any]) -> SensorSetup:
    """Merge /proc/jz/sensor with the configured sensor options (configuration wins);
    one T31Error naming what is missing and where to set it."""
    proc = read_proc_sensor(proc_root)
    given = {k: v for k, v in configured.items() if v is not None}
    if isinstance(given.get("i2c_addr"), str):
        given["i2c_addr"] = int(given["i2c_addr"], 0)
    merged = {**(proc or {}), **given}
    missing = [k for k in SENSOR_REQUIRED if k not in merged]
    if missing:
        where = (f"there is no {proc_root} (a sensor module without sensor-info)" if proc is None
                 else f"{proc_root} does not give it")
        raise T31Error(f"t31: which sensor? {where}: name it in the [t31] configuration ("
                       + ", ".join(missing) + ")")
    if proc is None:
        source = "configured"
    else:
        over = sorted(k for k in given if k in proc and proc[k] != given[k])
        source = str(proc_root) + (f", configuration overriding {', '.join(over)}" if over else "")
    return SensorSetup(str(merged["sensor"]), int(merged["i2c_addr"]), int(merged.get("i2c_adapter", 0)),
                       int(merged["sensor_width"]), int(merged["sensor_height"]),
                       int(merged["max_fps"]) if "max_fps" in merged else None, source)


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
        self._undo: list = []
        self._closed = False
        self._bring_up(sen.name, sen.i2c_addr, sen.i2c_adapter, rate)
        try:
            self.isp = T31Isp(self.lib, self.sensor)
            # frame-source widths are multiples of FS_WIDTH_ALIGN: the largest such size fits the sensor
            max_w = _align_down(sen.width, FS_WIDTH_ALIGN)
            modes = [self._mode(m) for m in (channels or [(max_w, sen.height, rate), (640, 360, rate)])]
            # ch0 scales down from the sensor; ch1 too, and never above 1920x1080
            sub_max = (min(max_w, 1920), min(sen.height, 1080))
            self.channels = [T31FrameChannel(self, i, "main" if i == 0 else "sub",
                                             (max_w, sen.height) if i == 0 else sub_max, m)
                             for i, m in enumerate(modes)]
            self.encoder = T31Encoder()
        except Exception:
            self.close()
            raise

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

    def _bring_up(self, sensor: str, i2c_addr: int, i2c_adapter: int, fps: int) -> None:
        lib = self.lib
        si = self._sensor_info = S.IMPSensorInfo()
        si.name = sensor.encode()[:31]
        si.cbus_type = st.TX_SENSOR_CONTROL_INTERFACE_I2C
        si.i2c.type = sensor.encode()[:19]
        si.i2c.addr, si.i2c.i2c_adapter_id = i2c_addr, i2c_adapter
        if lib.has("osd_pool"):  # before ISP_Open, or OSD can never get rmem (sample-common.c)
            lib.call("IMP_OSD_SetPoolSize", OSD_POOL_SIZE)
        # (call, args, undo call, undo args): the SDK samples' sample_system_init
        steps = (("IMP_ISP_Open", (), "IMP_ISP_Close", ()),
                 ("IMP_ISP_AddSensor", (byref(si),), "IMP_ISP_DelSensor", (byref(si),)),
                 ("IMP_ISP_EnableSensor", (), "IMP_ISP_DisableSensor", ()),
                 ("IMP_System_Init", (), "IMP_System_Exit", ()),
                 ("IMP_ISP_EnableTuning", (), "IMP_ISP_DisableTuning", ()))
        try:
            for call, args, undo, uargs in steps:
                lib.call(call, *args)
                self._undo.append((undo, lambda f=getattr(lib, undo), a=uargs: f(*a)))
            if lib.has("day_night"):  # a defined state before any client asks (sample-common.c)
                lib.call("IMP_ISP_Tuning_SetISPRunningMode", INITIAL_RUNNING_MODE)
            if lib.has("sensor_fps"):
                lib.call("IMP_ISP_Tuning_SetSensorFPS", fps, 1)
        except T31Error:
            _undo_all(self._undo, "t31 bring-up")
            raise
        self._ts_offset_ns = None
        if lib.has("timestamps"):  # IMP clock (us since System_Init) -> CLOCK_MONOTONIC
            self._ts_offset_ns = time.monotonic_ns() - lib.IMP_System_GetTimeStamp() * 1000

    def _to_monotonic_ns(self, imp_us: int) -> int:
        if self._ts_offset_ns is None or not imp_us:
            return time.monotonic_ns()
        return imp_us * 1000 + self._ts_offset_ns

    def _frame_timestamp(self, fp) -> int:
        return ctypes.cast(fp, ctypes.POINTER(self.frame_cls)).contents.timeStamp

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ch in getattr(self, "channels", ()):
            ch.stop()
        _undo_all(self._undo, "t31 close")
