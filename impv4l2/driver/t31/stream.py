"""The stream channel of the t31 backend: one AVPU encoder channel fed by a FrameSource.

A capture thread waits in IMP_Encoder_PollingStream, takes the access unit
with GetStream, copies it once into the sink's buffer (ctypes.memmove, packs
that wrap the stream ring in two pieces) and releases it right after the
copy: the ring is small and the AVPU stalls while packs are held.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from ctypes import byref
from typing import Protocol

from ..base import (Codec, EncodedFrame, EncoderChannel, EncoderParams, FrameBuffer, FrameInfo, FrameSink,
                    Profile, RcMode)
from . import structs as st
from .capture import Capture, ChannelHost, dest
from .libimp import LibImp, T31Error

log = logging.getLogger("impv4l2.t31")
S = st.native

__all__ = ["ENC_CHN_PER_GROUP", "GOP_SAME_SCENE_CNT", "JPEG_CHN_BASE", "KEY_PACKS", "NR_ENC_CHN",
           "EncoderChannels", "StreamHost", "T31StreamChannel", "encoder_attr"]

JPEG_CHN_BASE = 4  # SDK samples: JPEG encoder channel = 4 + frame channel
# The AVPU's limits, as libimp enforces them: encoder channel numbers 0..NR_ENC_CHN-1 (OpenIMP,
# from libimp 1.1.6: 9 channel slots) and at most ENC_CHN_PER_GROUP channels registered to one
# group, i.e. per frame channel (imp_encoder.h: "each group can add 2 encoding channel").
NR_ENC_CHN = 9
ENC_CHN_PER_GROUP = 2
# (codec, profile) -> IMPEncoderProfile; the AVPU codes HEVC in Main profile only
PROFILES = {(Codec.H264, Profile.BASELINE): st.IMP_ENC_PROFILE_AVC_BASELINE,
            (Codec.H264, Profile.MAIN): st.IMP_ENC_PROFILE_AVC_MAIN,
            (Codec.H264, Profile.HIGH): st.IMP_ENC_PROFILE_AVC_HIGH,
            **{(Codec.HEVC, p): st.IMP_ENC_PROFILE_HEVC_MAIN for p in Profile}}
# uMaxSameSenceCnt: the 1.1.5/1.1.6 SetDefaultParam doc says "GOPLength = uGopLength *
# uMaxSameSenceCnt" (the strongest source; the SDK 1.1.1 sample passes 2 without a word), so
# 1 makes the IDR interval the GOP the client asked for.  One entry to change if hardware
# shows otherwise.
GOP_SAME_SCENE_CNT = 1
# How a pack says "this AU is a key frame", per codec: (member of the IMPEncoderPack nalType
# union, its IDR NAL types, the IMPEncoderSliceType of an intra slice).  The union and
# sliceType are the same in every T31 release (1.1.1 .. 1.1.6 imp_encoder.h); JPEG AUs are all
# key frames.  HEVC: IDR_W_RADL/IDR_N_LP, and CRA (a random access point; the AVPU codes IDRs).
KEY_PACKS: dict[Codec, tuple[str, frozenset[int], int]] = {
    Codec.H264: ("h264NalType", frozenset({st.H264_NAL_IDR}), st.IMP_ENC_SLICE_I),
    Codec.HEVC: ("h265NalType", frozenset({st.H265_NAL_IDR_W_RADL, st.H265_NAL_IDR_N_LP, st.H265_NAL_CRA}),
                 st.IMP_ENC_SLICE_I),
}


class EncoderChannels:
    """The AVPU's encoder channel numbers, shared by every frame channel of one backend: one
    IMP encoder channel per distinct compressed stream."""

    def __init__(self, count: int = NR_ENC_CHN):
        self.count = count
        self.used: set[int] = set()
        self._lock = threading.Lock()

    def take(self, preferred: int) -> int:
        """``preferred`` (the SDK samples' numbering) if free, else the lowest free number."""
        with self._lock:
            free = [n for n in range(self.count) if n not in self.used]
            if not free:
                raise T31Error(f"all {self.count} AVPU encoder channels are in use")
            n = preferred if preferred in free else free[0]
            self.used.add(n)
            return n

    def give(self, n: int) -> None:
        with self._lock:
            self.used.discard(n)


class StreamHost(ChannelHost, Protocol):
    """What a stream channel needs of the frame channel it is bound to."""

    stream_cls: type  # the release's IMPEncoderStream

    def close_stream(self, sc: "T31StreamChannel") -> None: ...


def encoder_attr(lib: LibImp, p: EncoderParams):
    """IMPEncoderChnAttr for ``p`` from IMP_Encoder_SetDefaultParam, rate limits filled in."""
    attr = st.alloc(S.IMPEncoderChnAttr)
    jpeg = p.codec is Codec.JPEG
    if jpeg:  # as sample_jpeg_init: FIXQP, qp from quality
        qp = max(1, min(51, round(51 - p.jpeg_quality * 0.5)))
        args = (st.IMP_ENC_PROFILE_JPEG, int(RcMode.FIXQP), p.width, p.height, p.fps_num, p.fps_den,
                0, 0, qp, 0)
    else:
        qp = p.i_qp if p.rc_mode is RcMode.FIXQP else -1
        args = (PROFILES[p.codec, p.profile], int(p.rc_mode), p.width, p.height, p.fps_num, p.fps_den,
                p.gop, GOP_SAME_SCENE_CNT, qp, p.bitrate // 1000)  # SDK bit rates are kbit/s
    lib.call("IMP_Encoder_SetDefaultParam", byref(attr), *args)
    rc = attr.rcAttr.attrRcMode
    if not jpeg and p.rc_mode is not RcMode.FIXQP:
        sub = {RcMode.CBR: rc.attrCbr, RcMode.VBR: rc.attrVbr, RcMode.CAPPED_VBR: rc.attrCappedVbr,
               RcMode.CAPPED_QUALITY: rc.attrCappedQuality}[p.rc_mode]
        sub.iMinQP, sub.iMaxQP = p.min_qp, p.max_qp
        if p.rc_mode is not RcMode.CBR:
            sub.uMaxBitRate = p.max_bitrate // 1000
    return attr


class T31StreamChannel(EncoderChannel):
    """An encoder channel bound to a frame channel (FrameSource -> Encoder tunnel)."""

    def __init__(self, channel: StreamHost, params: EncoderParams, enc_chn: int):
        self.params = params
        self.channel = channel
        self.enc_chn = enc_chn
        self.lib = channel.lib
        self.capture: Capture | None = None
        self.sink: FrameSink | None = None
        self._seq = 0
        self._resync = False  # an AU was lost: deliver nothing before the next IDR
        # SetChnBitRate: H.264/H.265 channels with a rate control only (imp_encoder.h @attention)
        self._rate_controlled = params.codec is not Codec.JPEG and params.rc_mode is not RcMode.FIXQP
        # the release's IMPEncoderStream (+ ABI_TAIL), used through its 1.1.1 head
        self._stream_full = st.alloc(channel.stream_cls)
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
        self.channel.close_stream(self)

    # -- capture thread
    def start(self, sink: FrameSink, timeout_ms: int) -> None:
        self.sink, self._timeout_ms = sink, timeout_ms
        name = f"impv4l2-t31-ch{self.channel.index}-{self.params.codec.value}"
        self.capture = Capture(name, self._step, self._timeout)

    def _timeout(self) -> None:
        self.channel.deliver_error(self.sink, self._seq)

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
        """Whether the AU is a key frame, from its packs' nalType union (KEY_PACKS)."""
        rule = KEY_PACKS.get(self.params.codec)
        if rule is None:
            return True
        member, idr_types, intra = rule
        packs = stream.pack
        for i in range(stream.packCount):
            p = packs[i]
            if getattr(p.nalType, member) in idr_types:
                if p.sliceType != intra:  # the two fields disagree: trust the NAL type
                    log.debug("ch%d: IDR pack with sliceType %d", self.channel.index, p.sliceType)
                return True
        return False

    def _copy(self, stream, buf: FrameBuffer | None, key: bool) -> FrameInfo:
        """Assemble the access unit of ``stream`` into ``buf`` (packs in order,
        each one NAL with its start code; a pack may wrap the stream ring)."""
        n = stream.packCount
        packs = stream.pack
        ts_us = packs[0].timestamp if n else 0
        info = FrameInfo(timestamp_ns=self.channel.to_monotonic_ns(ts_us), sequence=stream.seq)
        if buf is None:
            return info
        _keep, dst, cap = dest(buf.view)
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
