"""The hardware interface: ISP with tuning, frame channels, and the encoder (AVPU).

Backends (``sim``, ``t31``) implement these classes; the V4L2 device model
uses only them.  Backends know nothing of V4L2: controls are described as
data with backend-neutral names, frames are NV12 bytes in memory the caller
provides, encoded output is a list of NAL units.

Threading: a started channel delivers frames from a backend thread by calling
its sink; sinks must not block (they return ``None`` from
:meth:`FrameSink.get_buffer` to drop a frame when no buffer is free).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

if TYPE_CHECKING:
    import numpy as np


# ---------------------------------------------------------------- controls

class ControlKind(enum.Enum):
    INTEGER = "int"
    BOOLEAN = "bool"
    MENU = "menu"
    BUTTON = "button"


@dataclasses.dataclass(frozen=True)
class ControlSpec:
    """One tunable parameter of the ISP or an encoder channel."""

    name: str  # backend-neutral: "brightness", "hflip", "exposure_auto", ...
    kind: ControlKind
    minimum: int = 0
    maximum: int = 1
    step: int = 1
    default: int = 0
    menu: tuple[str, ...] = ()  # MENU: item names indexed minimum..maximum


# Names of the ISP controls every backend should offer (subset allowed).
ISP_CONTROL_NAMES = (
    "brightness", "contrast", "saturation", "hue", "sharpness",
    "hflip", "vflip", "exposure_auto", "exposure", "gain_auto", "gain",
    "power_line_frequency", "day_night",
)


@dataclasses.dataclass(frozen=True)
class SensorInfo:
    name: str
    width: int
    height: int
    fps: int


class Isp(abc.ABC):
    """Sensor + image pipeline with its tuning controls."""

    sensor: SensorInfo

    @property
    @abc.abstractmethod
    def controls(self) -> Sequence[ControlSpec]: ...

    @abc.abstractmethod
    def get(self, name: str) -> int: ...

    @abc.abstractmethod
    def set(self, name: str, value: int) -> None:
        """Apply a control (value already range-checked by the caller)."""


# ---------------------------------------------------------------- frames

@dataclasses.dataclass
class FrameInfo:
    """Metadata of a delivered frame."""

    timestamp_ns: int  # CLOCK_MONOTONIC at capture
    sequence: int  # sensor frame number; gaps mean dropped frames
    error: bool = False
    bytesused: int = 0  # encoded streams: bytes written into the buffer
    keyframe: bool = False  # encoded streams


@dataclasses.dataclass(eq=False)
class FrameBuffer:
    """A buffer a sink lends the producer for one frame: the token that travels from
    :meth:`FrameSink.get_buffer` back to :meth:`FrameSink.frame_done` (as vivid hands its
    ``vivid_buffer`` to ``vb2_buffer_done``), so a sink never matches buffers by memory."""

    view: memoryview  # where the producer writes the frame (writable, at least one frame)
    index: int = -1  # the consumer queue's buffer index (-1: a buffer of no queue)
    sequence: int = -1  # slot: the sequence number of the frame it carries, once done
    token: Any = None  # the sink's own bookkeeping (its queue buffer), opaque to producers


class FrameSink(Protocol):
    """Where a started channel delivers frames (implemented by the device model)."""

    def get_buffer(self) -> FrameBuffer | None:
        """A writable buffer for the next frame, or None to drop it."""

    def frame_done(self, buf: FrameBuffer, info: FrameInfo) -> None:
        """The frame in ``buf`` (from get_buffer) is complete."""


class MemberSink(FrameSink, Protocol):
    """A sink of a fan-out (:mod:`impv4l2.driver.fanout`): it may also get a buffer back
    unfilled, as a client that joined a compressed stream waits for its first key frame."""

    def cancel(self, buf: FrameBuffer) -> None:
        """``buf`` (from get_buffer) carries no frame: back to the sink as it was."""


@dataclasses.dataclass(frozen=True)
class ChannelMode:
    width: int
    height: int
    fps: int


class FrameChannel(abc.ABC):
    """One ISP output (IMP FrameSource channel): scaled NV12 frames."""

    index: int
    role: str  # "main" | "sub"
    max_width: int
    max_height: int

    @abc.abstractmethod
    def sizes(self) -> Sequence[tuple[int, int]]:
        """Frame sizes this channel can scale to (discrete, largest first)."""

    @abc.abstractmethod
    def frame_rates(self) -> Sequence[int]:
        """Frame rates offered (fps)."""

    @property
    @abc.abstractmethod
    def mode(self) -> ChannelMode: ...

    @abc.abstractmethod
    def configure(self, mode: ChannelMode) -> None:
        """Set size and rate; only while stopped."""

    # Consumers: at most one raw sink and one encoded stream per codec at a time, all at the
    # channel's mode and fed by the same frames (each its own AVPU channel on the T31).  More
    # clients of one of them share it through impv4l2.driver.fanout.

    @abc.abstractmethod
    def start(self, sink: FrameSink) -> None:
        """Deliver NV12 frames (Y plane then interleaved UV, stride = width)."""

    @abc.abstractmethod
    def start_encoded(self, params: "EncoderParams", sink: FrameSink) -> "EncoderChannel":
        """Deliver encoded frames (IMP FrameSource->Encoder binding): each
        buffer receives one access unit (H.264) or one JPEG picture.  The
        stream ends with the returned channel's ``close()``."""

    @abc.abstractmethod
    def stop_raw(self) -> None:
        """End the raw consumer only (encoded streams go on)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """End every consumer."""


# ---------------------------------------------------------------- encoder

class RcMode(enum.IntEnum):
    """Rate control modes, numbered as IMP's IMPEncoderRcMode."""

    FIXQP = 0
    CBR = 1
    VBR = 2
    CAPPED_VBR = 4
    CAPPED_QUALITY = 8


class Codec(enum.Enum):
    H264 = "h264"
    HEVC = "hevc"
    JPEG = "jpeg"


class Profile(enum.Enum):
    BASELINE = "baseline"  # constrained baseline
    MAIN = "main"
    HIGH = "high"


@dataclasses.dataclass
class EncoderParams:
    codec: Codec = Codec.H264
    width: int = 1920
    height: int = 1080
    fps_num: int = 25
    fps_den: int = 1
    rc_mode: RcMode = RcMode.CAPPED_QUALITY
    bitrate: int = 2_000_000  # bit/s (target)
    max_bitrate: int = 4_000_000  # bit/s (peak, capped modes)
    gop: int = 50  # frames between IDRs
    profile: Profile = Profile.HIGH
    level: str = "5.1"  # H.264 or HEVC level, as its menu names it
    high_tier: bool = False  # HEVC: High tier allowed (libx265 uses it only beyond Main's limits)
    min_qp: int = 15
    max_qp: int = 48
    i_qp: int = 30  # FIXQP
    p_qp: int = 30
    jpeg_quality: int = 80
    # Layout of the raw frames handed to encode(): "nv12" (the ISP's output,
    # Y plane then interleaved UV) or "yu12" (I420: Y, U, V planes).
    pixel_format: str = "nv12"


@dataclasses.dataclass
class EncodedFrame:
    """One access unit: NAL units in order, each with its 4-byte start code."""

    nals: list[bytes | memoryview]
    keyframe: bool
    timestamp_ns: int
    nal_types: list[int] = dataclasses.field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(n) for n in self.nals)


class OutputTooSmall(ValueError):
    """encode_into(): the access unit does not fit the destination buffer.

    The access unit is dropped and the next frame is forced to be an IDR so
    the stream stays decodable.
    """

    def __init__(self, needed: int, available: int):
        super().__init__(f"access unit needs {needed} bytes, buffer has {available}")
        self.needed = needed
        self.available = available


class EncoderChannel(abc.ABC):
    """One AVPU channel.  Zero latency: a frame in, its access unit out."""

    params: EncoderParams

    @abc.abstractmethod
    def encode(self, nv12: memoryview, timestamp_ns: int) -> EncodedFrame: ...

    def encode_into(self, nv12: memoryview, timestamp_ns: int, out: memoryview) -> tuple[int, bool]:
        """Encode one frame into ``out``: (bytesused, keyframe), or
        :class:`OutputTooSmall` (the frame is lost, the next is an IDR).  This default
        copies :meth:`encode`'s NAL units; an AVPU that can write the client's buffer
        directly overrides it."""
        au = self.encode(nv12, timestamp_ns)
        out = memoryview(out).cast("B")
        if au.size > len(out):
            self.request_idr()
            raise OutputTooSmall(au.size, len(out))
        pos = 0
        for nal in au.nals:
            out[pos:pos + len(nal)] = nal
            pos += len(nal)
        return pos, au.keyframe

    @abc.abstractmethod
    def request_idr(self) -> None: ...

    @abc.abstractmethod
    def update(self, **changes) -> None:
        """Change parameters while streaming (bitrate, gop, qp...)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Encoder(abc.ABC):
    """The AVPU: creates encoder channels."""

    # Can encode frames handed in from memory (a V4L2 M2M encoder node is
    # offered only then); False where the hardware encodes only what a frame
    # channel feeds it (T31 with SDK 1.1.x).
    m2m: bool = True
    # What the AVPU can encode; the device model offers only these formats.
    codecs: frozenset[Codec] = frozenset({Codec.H264, Codec.JPEG})

    @abc.abstractmethod
    def create_channel(self, params: EncoderParams) -> EncoderChannel: ...


# ---------------------------------------------------------------- camera features (optional)

MOTION_ACTIVITY_MAX = 1000  # activity unit: per mille of a cell's pixels that changed


@dataclasses.dataclass(frozen=True)
class MotionReport:
    """Motion activity of one analysed frame."""

    timestamp_ns: int  # capture time of the frame (the clock of FrameInfo.timestamp_ns)
    activity: "np.ndarray"  # (rows, cols) uint16, 0..MOTION_ACTIVITY_MAX per grid cell


class MotionSource(abc.ABC):
    """Motion analysis of the picture over a grid of cells (IMP's IVS move interface).

    The source only measures; thresholds and regions are the caller's.  Reports come
    from a backend thread, one per analysed frame, and must not block."""

    rows: int
    cols: int

    @abc.abstractmethod
    def start(self, report: Callable[[MotionReport], None]) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...


class LightMeter(abc.ABC):
    """The ISP's exposure readout, for day/night decisions."""

    @abc.abstractmethod
    def total_gain(self) -> float:
        """Exposure x gain the AE needs, relative to a well-lit scene (1.0); darker is higher."""


# ---------------------------------------------------------------- backend

class Backend(abc.ABC):
    """A complete set of media hardware."""

    name: str
    isp: Isp
    channels: Sequence[FrameChannel]
    encoder: Encoder
    # Memory the frame buffers of one consumer (node) may take, and of all of
    # them, in bytes (0: no limit): what the machine's RAM leaves beside the
    # media reserve.  Configuration ([nodes] buffer_mb, total_buffer_mb) overrides.
    buffer_memory: int = 0
    total_buffer_memory: int = 0
    # Optional camera features; None: not offered (the device model shows no controls for them).
    motion: MotionSource | None = None
    light_meter: LightMeter | None = None

    @property
    def overruns(self) -> int:
        """Sensor frames lost because the pipeline was late for them (every consumer of the
        channel misses them alike; 0 where the backend cannot tell)."""
        return 0

    def set_lost_callback(self, lost: Callable[[str], None]) -> None:
        """Called (with a reason) when the hardware disappears (hot-plug)."""
        self._lost = lost

    @abc.abstractmethod
    def close(self) -> None:
        """Stop everything and release the hardware."""
