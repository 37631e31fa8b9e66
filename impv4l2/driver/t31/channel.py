"""The frame channel of the t31 backend: one IMP FrameSource channel and its consumers.

Raw NV12 (:mod:`.raw`) and encoded streams (:mod:`.stream`) may run on one
channel at the same time; the FrameSource channel, its encoder group and
its bind live while any of them does.  Every bring-up step that succeeded
pushes its undo, so a failure anywhere unwinds exactly what was done.
"""

from __future__ import annotations

import logging
import threading
import time
from ctypes import byref
from typing import Protocol, Sequence

from ..base import (ChannelMode, Codec, EncoderChannel, EncoderParams, FrameChannel, FrameInfo, FrameSink,
                    SensorInfo)
from . import structs as st
from .capture import Step, run_steps, undo_all
from .libimp import LibImp, T31Error
from .raw import RawCapture
from .stream import ENC_CHN_PER_GROUP, JPEG_CHN_BASE, EncoderChannels, T31StreamChannel, encoder_attr

log = logging.getLogger("impv4l2.t31")
S = st.native

__all__ = ["FS_WIDTH_ALIGN", "SCALED_SIZES", "ChannelOwner", "T31FrameChannel"]

# Frame-source widths are multiples of FS_WIDTH_ALIGN (the vendor's IMP_FrameSource_CreateChn
# refuses others).
FS_WIDTH_ALIGN = 16
SCALED_SIZES = ((2560, 1440), (1920, 1080), (1280, 720), (960, 540), (640, 360), (320, 180))


class ChannelOwner(Protocol):
    """What a frame channel needs of its backend."""

    lib: LibImp
    sensor: SensorInfo
    nr_vbs: int
    raw_depth: int
    poll_timeout_ms: int
    frame_cls: type
    stream_cls: type
    enc_channels: EncoderChannels  # the AVPU's channel numbers, shared by every frame channel

    def to_monotonic_ns(self, imp_us: int) -> int: ...


class T31FrameChannel(FrameChannel):
    """IMP FrameSource channel: raw NV12 (GetFrame) and bound encoder streams.

    Raw and encoded consumers may run at the same time; the FrameSource
    channel lives while any of them does."""

    def __init__(self, backend: ChannelOwner, index: int, role: str, max_size: tuple[int, int],
                 mode: ChannelMode):
        self.backend, self.lib = backend, backend.lib
        self.frame_cls, self.stream_cls = backend.frame_cls, backend.stream_cls
        self.index, self.role = index, role
        self.max_width, self.max_height = max_size
        self._mode = mode
        self._lock = threading.RLock()
        self._created = self._enabled = self._bound = self._group = False
        # imp_framesource.h, SetFrameDepth remark 6: "可以调用位置没有要求，但是只能使用一次" (any
        # time, but once): one depth per FrameSource channel, kept while the channel lives.
        self._depth_set = False
        self._raw: RawCapture | None = None
        self._streams: dict[int, T31StreamChannel] = {}  # IMP encoder channel -> its stream

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
            undo: list[Step] = []
            try:
                self._fs_up(undo)
                if not self._depth_set:
                    lib.call("IMP_FrameSource_SetFrameDepth", self.index, self.backend.raw_depth)
                    self._depth_set = True
            except Exception:
                undo_all(undo, f"ch{self.index}")
                raise
            self._raw = RawCapture(self, sink)

    def start_encoded(self, params: EncoderParams, sink: FrameSink) -> EncoderChannel:
        lib = self.lib
        with self._lock:
            if any(sc.params.codec is params.codec for sc in self._streams.values()):
                raise T31Error(f"ch{self.index}: {params.codec.value} stream already started")
            if len(self._streams) >= ENC_CHN_PER_GROUP:  # libimp's RegisterChn would refuse it
                raise T31Error(f"ch{self.index}: encoder group {self.index} has its {ENC_CHN_PER_GROUP}"
                               f" channels ({', '.join(sc.params.codec.value for sc in self._streams.values())})")
            chns = self.backend.enc_channels
            enc_chn = chns.take((JPEG_CHN_BASE if params.codec is Codec.JPEG else 0) + self.index)
            sc = T31StreamChannel(self, params, enc_chn)
            undo: list[Step] = [("release channel number", lambda: chns.give(enc_chn))]
            try:
                self._fs_up(undo, enable=False)
                if not self._group:
                    lib.call("IMP_Encoder_CreateGroup", self.index)
                    self._group = True
                    undo.append(("DestroyGroup", self._destroy_group))
                attr = encoder_attr(lib, params)
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
                undo_all(undo, f"ch{self.index}")
                raise
            self._streams[enc_chn] = sc
            sc.start(sink, self.backend.poll_timeout_ms)
            return sc

    def stop(self) -> None:
        with self._lock:
            for sc in list(self._streams.values()):
                self.close_stream(sc)
            self.stop_raw()

    # -- hosts of the raw capture and the stream channels
    def to_monotonic_ns(self, imp_us: int) -> int:
        return self.backend.to_monotonic_ns(imp_us)

    def deliver_error(self, sink: FrameSink | None, seq: int) -> None:
        """A timeout: hand the client an errored buffer instead of hanging."""
        log.warning("ch%d: no frame within %d ms", self.index, self.backend.poll_timeout_ms)
        buf = sink.get_buffer() if sink else None
        if buf is not None:
            sink.frame_done(buf, FrameInfo(timestamp_ns=time.monotonic_ns(), sequence=seq, error=True))

    def close_stream(self, sc: T31StreamChannel) -> None:
        """Stop one encoder stream; when it is the channel's last consumer,
        tear down in the exact reverse of start_encoded."""
        lib, chn = self.lib, sc.enc_chn
        with self._lock:
            if self._streams.get(chn) is not sc:
                return
            del self._streams[chn]
            if sc.capture:
                sc.capture.stop()
            run_steps([("StopRecvPic", lambda: lib.IMP_Encoder_StopRecvPic(chn))], f"ch{self.index}")
            encoder = [("UnRegisterChn", lambda: lib.IMP_Encoder_UnRegisterChn(chn)),
                       ("Encoder_DestroyChn", lambda: lib.IMP_Encoder_DestroyChn(chn))]
            if self.busy:  # others still use the FrameSource / group / binding
                run_steps(encoder, f"ch{self.index}")
            else:
                self._teardown(encoder)
            self.backend.enc_channels.give(chn)  # destroyed: the number is free again

    def stop_raw(self) -> None:
        with self._lock:
            if self._raw is None:
                return
            self._raw.stop()
            self._raw = None
            if self.busy:  # the depth stays (once per channel); a later raw start reuses it
                return
            # depth 0 frees the frames the channel caches (OpenIMP's SetFrameDepth <= 0 path)
            run_steps([("SetFrameDepth 0", lambda: self.lib.IMP_FrameSource_SetFrameDepth(self.index, 0))],
                      f"ch{self.index}")
            self._teardown()

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

    def _fs_up(self, undo: list[Step], enable: bool = True) -> None:
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

    def _teardown(self, encoder_steps: Sequence[Step] = ()) -> None:
        """FrameSource side, reverse of bring-up: DisableChn, UnBind, [encoder
        UnRegisterChn/DestroyChn], DestroyGroup, FrameSource DestroyChn."""
        steps: list[Step] = []
        if self._enabled:
            steps.append(("DisableChn", self._disable))
        if self._bound:
            steps.append(("UnBind", self._unbind))
        steps.extend(encoder_steps)
        if self._group:
            steps.append(("DestroyGroup", self._destroy_group))
        if self._created:
            steps.append(("FrameSource_DestroyChn", self._destroy_fs))
        run_steps(steps, f"ch{self.index}")

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
        self._created = self._depth_set = False
        return self.lib.IMP_FrameSource_DestroyChn(self.index)
