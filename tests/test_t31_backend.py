"""The t31 backend against the fake libimp (tests/fakes/libimp_fake.c)."""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakes.build import build_fake  # noqa: E402

from impv4l2.driver.base import Codec, EncoderParams, FrameInfo  # noqa: E402
from impv4l2.driver.t31.backend import T31Backend  # noqa: E402
from impv4l2.driver.t31.libimp import ENV_LIBIMP, T31Error  # noqa: E402

ENV = ("IMPFAKE_LOG", "IMPFAKE_FAIL_AT", "IMPFAKE_POLL_TIMEOUT", "IMPFAKE_FRAME_TIMEOUT",
       "IMPFAKE_H264", "IMPFAKE_RING_SIZE", ENV_LIBIMP)

SYSTEM_UP = ["IMP_ISP_Open", "IMP_ISP_AddSensor", "IMP_ISP_EnableSensor", "IMP_System_Init",
             "IMP_ISP_EnableTuning"]
SYSTEM_DOWN = ["IMP_ISP_DisableTuning", "IMP_System_Exit", "IMP_ISP_DisableSensor",
               "IMP_ISP_DelSensor", "IMP_ISP_Close"]


class Fake:
    def __init__(self, path: Path, log: Path):
        self.path, self.log = path, log
        self.so = ctypes.CDLL(str(path))
        self.so.impfake_get_tuning.argtypes = [ctypes.c_char_p]
        self.so.impfake_reset()
        log.write_text("")

    def calls(self) -> list[str]:
        """Logged call names, without per-frame tuning noise."""
        return [ln.split()[0] for ln in self.log.read_text().splitlines()
                if ln and not ln.startswith(("IMP_ISP_Tuning_", "FAIL ", "ERR "))]

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def __getattr__(self, name):  # impfake_* queries
        return getattr(self.so, "impfake_" + name)

    def backend(self, **kw) -> T31Backend:
        kw.setdefault("channels", [(320, 240, 60), (160, 120, 60)])
        return T31Backend(lib_path=str(self.path), **kw)


@pytest.fixture
def make_fake(tmp_path, monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    log = tmp_path / "imp.log"
    monkeypatch.setenv("IMPFAKE_LOG", str(log))
    return lambda omit=(): Fake(build_fake(omit=tuple(omit)), log)


@pytest.fixture
def fake(make_fake):
    return make_fake()


class Sink:
    """A FrameSink collecting copies of what it is given."""

    def __init__(self, size: int, nbufs: int = 4):
        self.bufs = [bytearray(size) for _ in range(nbufs)]
        self.n = 0
        self.frames: list[tuple[bytes, FrameInfo]] = []
        self.cond = threading.Condition()

    def get_buffer(self):
        self.n += 1
        return memoryview(self.bufs[self.n % len(self.bufs)])

    def frame_done(self, buf, info: FrameInfo) -> None:
        with self.cond:
            self.frames.append((bytes(buf[:info.bytesused]), info))
            self.cond.notify_all()

    def wait(self, count: int, timeout: float = 10.0) -> list[tuple[bytes, FrameInfo]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.frames) >= count, timeout), \
                f"only {len(self.frames)} of {count} frames"
            return list(self.frames)


def split_nals(au: bytes) -> list[bytes]:
    parts = au.split(b"\x00\x00\x00\x01")
    assert parts[0] == b"", "access unit must start with a 4-byte start code"
    return parts[1:]


# ---------------------------------------------------------------- sequences

def test_encoded_bringup_and_teardown_follow_sdk_order(fake):
    be = fake.backend()
    sink = Sink(1 << 20)
    enc = be.channels[0].start_encoded(EncoderParams(width=320, height=240, fps_num=60, gop=10), sink)
    sink.wait(5)
    enc.close()
    be.close()
    channel_up = ["IMP_FrameSource_CreateChn", "IMP_FrameSource_SetChnAttr", "IMP_Encoder_CreateGroup",
                  "IMP_Encoder_SetDefaultParam", "IMP_Encoder_CreateChn", "IMP_Encoder_RegisterChn",
                  "IMP_System_Bind", "IMP_FrameSource_EnableChn", "IMP_Encoder_StartRecvPic"]
    channel_down = ["IMP_Encoder_StopRecvPic", "IMP_FrameSource_DisableChn", "IMP_System_UnBind",
                    "IMP_Encoder_UnRegisterChn", "IMP_Encoder_DestroyChn", "IMP_Encoder_DestroyGroup",
                    "IMP_FrameSource_DestroyChn"]
    assert fake.calls() == SYSTEM_UP + channel_up + channel_down + SYSTEM_DOWN
    assert (fake.outstanding_streams(), fake.outstanding_frames()) == (0, 0)
    assert fake.open_resources() == 0
    assert fake.errors() == 0


def test_raw_nv12_counter_frames_and_sequence(fake):
    be = fake.backend()
    w, h = 160, 120
    sink = Sink(w * h * 3 // 2)
    be.channels[1].start(sink)
    frames = sink.wait(6)
    be.close()
    for i, (data, info) in enumerate(frames[:6]):
        assert not info.error and info.bytesused == w * h * 3 // 2
        assert int.from_bytes(data[:8], "little") == i  # the fake's counter
        assert data[w * h - 1] == i & 0xFF and data[w * h:] == b"\x80" * (w * h // 2)
        assert info.sequence == i
    stamps = [info.timestamp_ns for _, info in frames]
    assert stamps == sorted(stamps) and abs(stamps[-1] - time.monotonic_ns()) < 10e9
    assert fake.calls() == SYSTEM_UP + [
        "IMP_FrameSource_CreateChn", "IMP_FrameSource_SetChnAttr", "IMP_FrameSource_EnableChn",
        "IMP_FrameSource_SetFrameDepth",
        "IMP_FrameSource_SetFrameDepth", "IMP_FrameSource_DisableChn", "IMP_FrameSource_DestroyChn",
    ] + SYSTEM_DOWN
    assert (fake.outstanding_frames(), fake.open_resources(), fake.errors()) == (0, 0, 0)


def test_raw_and_encoded_on_one_channel_share_the_framesource(fake):
    be = fake.backend()
    raw, coded = Sink(320 * 240 * 3 // 2), Sink(1 << 20)
    ch = be.channels[0]
    ch.start(raw)
    ch.start_encoded(EncoderParams(width=320, height=240, fps_num=60), coded)
    raw.wait(3)
    coded.wait(3)
    be.close()  # stops both while frames and streams are in flight
    assert fake.calls().count("IMP_FrameSource_CreateChn") == 1
    assert (fake.outstanding_streams(), fake.outstanding_frames()) == (0, 0)
    assert (fake.open_resources(), fake.errors()) == (0, 0)


# ---------------------------------------------------------------- H.264 assembly

def test_access_units_assembled_across_ring_wrap(fake, monkeypatch):
    monkeypatch.setenv("IMPFAKE_RING_SIZE", "8192")  # packs up to ~5 KB: many wrap
    be = fake.backend()
    sink = Sink(1 << 16)
    enc = be.channels[0].start_encoded(EncoderParams(width=320, height=240, fps_num=60, gop=8), sink)
    frames = sink.wait(12)
    enc.request_idr()
    n_before = len(sink.frames)
    frames = sink.wait(n_before + 4)
    be.close()
    assert fake.wrapped_packs() > 0
    for data, info in frames:
        assert not info.error and len(data) == info.bytesused
        nals = split_nals(data)
        fill = 2 + info.sequence % 200  # the fake's payload byte for this frame
        types = [n[0] & 0x1F for n in nals]
        assert all(set(n[1:]) == {fill} for n in nals), "payload corrupted (ring wrap?)"
        assert info.keyframe == (5 in types)
        if info.sequence % 8 == 0:
            assert types == [7, 8, 5]
    seqs = [info.sequence for _, info in frames]
    assert seqs == list(range(len(seqs)))
    # an IDR out of the GOP schedule after RequestIDR
    assert any(info.keyframe and info.sequence % 8 for _, info in frames[n_before - 1:])
    assert (fake.outstanding_streams(), fake.open_resources(), fake.errors()) == (0, 0, 0)


def test_real_h264_from_file_decodes(fake, monkeypatch, tmp_path):
    av = pytest.importorskip("av")
    import numpy as np
    path = tmp_path / "in.h264"
    w, h, n = 160, 128, 24
    rng = np.random.default_rng(1)
    out = av.open(str(path), "w", format="h264")
    st = out.add_stream("libx264", rate=30)
    st.width, st.height, st.pix_fmt = w, h, "yuv420p"
    st.options = {"g": "8", "bf": "0", "preset": "ultrafast", "tune": "zerolatency", "threads": "1"}  # 1 slice/frame, like the AVPU
    for i in range(n):
        img = rng.integers(16, 235, (h * 3 // 2, w), dtype=np.uint8)
        for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="yuv420p")):
            out.mux(pkt)
    for pkt in st.encode():
        out.mux(pkt)
    out.close()
    monkeypatch.setenv("IMPFAKE_H264", str(path))
    monkeypatch.setenv("IMPFAKE_RING_SIZE", "1")  # the fake raises it to max AU + 64: packs wrap
    be = fake.backend(channels=[(w, h, 60)])
    sink = Sink(1 << 18)
    be.channels[0].start_encoded(EncoderParams(width=w, height=h, fps_num=60, gop=8), sink)
    frames = sink.wait(n)[:n]
    be.close()
    assert fake.wrapped_packs() > 0
    # byte-exact against the file (start codes normalized to 4 bytes)
    ref = path.read_bytes().replace(b"\x00\x00\x00\x01", b"\x00\x00\x01").replace(b"\x00\x00\x01",
                                                                                  b"\x00\x00\x00\x01")
    assert b"".join(d for d, _ in frames) == ref
    dec = av.CodecContext.create("h264", "r")
    decoded = 0
    for data, info in frames:
        assert info.keyframe == (5 in [x[0] & 0x1F for x in split_nals(data)])
        decoded += len(dec.decode(av.Packet(data)))  # each buffer is one whole access unit
    decoded += len(dec.decode(None))
    assert decoded == n
    assert (fake.outstanding_streams(), fake.errors()) == (0, 0)


def test_jpeg_snapshots(fake):
    be = fake.backend()
    sink = Sink(1 << 16)
    be.channels[0].start_encoded(EncoderParams(codec=Codec.JPEG, width=320, height=240, fps_num=60), sink)
    frames = sink.wait(4)
    be.close()
    for data, info in frames:
        assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9" and info.keyframe
    assert "IMP_Encoder_CreateChn 4 0x4000000 320x240" in fake.lines()  # JPEG channel = 4 + ch
    assert (fake.outstanding_streams(), fake.open_resources(), fake.errors()) == (0, 0, 0)


# ---------------------------------------------------------------- failures

def test_missing_library_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_LIBIMP, raising=False)
    t0 = time.monotonic()
    with pytest.raises(T31Error, match=r"libimp\.so"):
        T31Backend(lib_path=str(tmp_path / "nowhere" / "libimp.so"))
    monkeypatch.setenv(ENV_LIBIMP, str(tmp_path / "libimp.so"))
    with pytest.raises(T31Error, match=str(tmp_path / "libimp.so")):
        T31Backend()
    monkeypatch.delenv(ENV_LIBIMP)
    if not ctypes.util.find_library("imp"):  # this machine has no system libimp
        with pytest.raises(T31Error, match=r"libimp\.so"):
            T31Backend()
    assert time.monotonic() - t0 < 1.0


def test_env_var_selects_library(fake, monkeypatch):
    monkeypatch.setenv(ENV_LIBIMP, str(fake.path))
    be = T31Backend(channels=[(320, 240, 30)])
    assert be.lib.path == str(fake.path)
    be.close()
    assert fake.calls() == SYSTEM_UP + SYSTEM_DOWN


def test_missing_optional_symbol_drops_only_its_control(make_fake):
    fake = make_fake(omit=("IMP_ISP_Tuning_SetBrightness",))
    be = fake.backend()
    names = [c.name for c in be.isp.controls]
    assert "brightness" not in names and "contrast" in names
    assert not be.lib.has("brightness") and be.lib.IMP_ISP_Tuning_SetBrightness is None
    sink = Sink(1 << 20)
    be.channels[0].start_encoded(EncoderParams(width=320, height=240, fps_num=60), sink)
    sink.wait(3)
    be.close()
    assert (fake.open_resources(), fake.errors()) == (0, 0)


def test_missing_required_symbol_names_it(make_fake):
    fake = make_fake(omit=("IMP_Encoder_CreateGroup",))
    with pytest.raises(T31Error, match="IMP_Encoder_CreateGroup"):
        fake.backend()
    assert fake.calls() == []  # resolved at load, before touching hardware


def test_isp_controls_reach_the_library(fake):
    be = fake.backend()
    names = {c.name for c in be.isp.controls}
    assert {"brightness", "contrast", "saturation", "sharpness", "hue", "hflip", "vflip",
            "power_line_frequency", "day_night", "exposure", "gain"} <= names
    assert be.isp.get("brightness") == 128  # read back through the getter
    be.isp.set("brightness", 200)
    be.isp.set("hflip", 1)
    be.isp.set("power_line_frequency", 2)
    be.isp.set("day_night", 1)
    get = fake.so.impfake_get_tuning
    assert (get(b"brightness"), get(b"hflip"), get(b"antiflicker"), get(b"running_mode")) == (200, 1, 2, 1)
    assert be.isp.get("brightness") == 200
    be.close()


@pytest.mark.parametrize("failing", SYSTEM_UP)
def test_init_failure_unwinds_everything(fake, monkeypatch, failing):
    monkeypatch.setenv("IMPFAKE_FAIL_AT", failing)
    with pytest.raises(T31Error, match=failing):
        fake.backend()
    done = SYSTEM_UP[:SYSTEM_UP.index(failing)]
    undo = [SYSTEM_DOWN[len(SYSTEM_UP) - 1 - i] for i in range(len(done))][::-1]
    assert fake.calls() == done + [failing] + undo
    assert (fake.open_resources(), fake.errors()) == (0, 0)


@pytest.mark.parametrize("failing", ["IMP_Encoder_CreateChn", "IMP_System_Bind", "IMP_Encoder_StartRecvPic"])
def test_channel_start_failure_unwinds_and_recovers(fake, monkeypatch, failing):
    be = fake.backend()
    monkeypatch.setenv("IMPFAKE_FAIL_AT", failing)
    sink = Sink(1 << 20)
    params = EncoderParams(width=320, height=240, fps_num=60)
    with pytest.raises(T31Error, match=failing):
        be.channels[0].start_encoded(params, sink)
    assert fake.open_resources() == 5  # only the system part is still up
    monkeypatch.delenv("IMPFAKE_FAIL_AT")
    be.channels[0].start_encoded(params, sink)
    sink.wait(2)
    be.close()
    assert (fake.outstanding_streams(), fake.open_resources(), fake.errors()) == (0, 0, 0)


def test_stream_timeout_delivers_error_buffers(fake, monkeypatch):
    monkeypatch.setenv("IMPFAKE_POLL_TIMEOUT", "1")
    be = fake.backend(poll_timeout_ms=50)
    sink = Sink(1 << 16)
    be.channels[0].start_encoded(EncoderParams(width=320, height=240, fps_num=60), sink)
    frames = sink.wait(2, timeout=10)
    assert all(info.error for _, info in frames)
    monkeypatch.delenv("IMPFAKE_POLL_TIMEOUT")  # the stream recovers
    with sink.cond:
        assert sink.cond.wait_for(lambda: any(not i.error for _, i in sink.frames), 10)
    be.close()
    assert (fake.outstanding_streams(), fake.open_resources(), fake.errors()) == (0, 0, 0)


def test_raw_frame_timeout_delivers_error_buffers(fake, monkeypatch):
    monkeypatch.setenv("IMPFAKE_FRAME_TIMEOUT", "1")
    be = fake.backend()
    sink = Sink(160 * 120 * 3 // 2)
    be.channels[1].start(sink)
    frames = sink.wait(2, timeout=10)
    be.close()
    assert all(info.error for _, info in frames)
    assert (fake.outstanding_frames(), fake.open_resources(), fake.errors()) == (0, 0, 0)


def test_no_free_buffer_still_releases_streams(fake):
    class DropSink(Sink):
        def get_buffer(self):
            self.n += 1
            return None  # client holds every buffer

    be = fake.backend()
    sink = DropSink(0)
    be.channels[0].start_encoded(EncoderParams(width=320, height=240, fps_num=60), sink)
    be.channels[1].start(sink)
    deadline = time.monotonic() + 10
    while sink.n < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    be.close()
    assert sink.n >= 10 and sink.frames == []
    assert (fake.outstanding_streams(), fake.outstanding_frames(), fake.errors()) == (0, 0, 0)


def test_close_is_idempotent_and_logs_no_errors(fake, caplog):
    """Whole run at INFO: no ERROR records from the backend."""
    be = fake.backend()
    sink = Sink(1 << 20)
    be.channels[0].start_encoded(EncoderParams(width=320, height=240, fps_num=60), sink)
    sink.wait(2)
    be.close()
    be.close()  # idempotent
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert fake.calls()[-len(SYSTEM_DOWN):] == SYSTEM_DOWN and fake.calls().count("IMP_ISP_Close") == 1


def test_a_lost_access_unit_resumes_at_an_idr(fake, monkeypatch, tmp_path):
    """No free buffer for one AU: the AVPU encoded it anyway, so the P-frames after it would
    reference a picture the client never got.  The backend asks for an IDR and delivers
    nothing before it; what the client gets decodes frame for frame."""
    av = pytest.importorskip("av")
    import numpy as np
    path = tmp_path / "in.h264"
    w, h, n = 160, 128, 48
    out = av.open(str(path), "w", format="h264")
    st = out.add_stream("libx264", rate=30)
    st.width, st.height, st.pix_fmt = w, h, "yuv420p"
    st.options = {"g": "16", "bf": "0", "preset": "ultrafast", "tune": "zerolatency", "threads": "1"}
    rng = np.random.default_rng(2)
    for _ in range(n):
        for pkt in st.encode(av.VideoFrame.from_ndarray(rng.integers(16, 235, (h * 3 // 2, w), dtype=np.uint8),
                                                        format="yuv420p")):
            out.mux(pkt)
    for pkt in st.encode():
        out.mux(pkt)
    out.close()
    monkeypatch.setenv("IMPFAKE_H264", str(path))

    class OneDropSink(Sink):
        def get_buffer(self):
            return None if self.n == 2 and not setattr(self, "n", 3) else super().get_buffer()

    be = fake.backend(channels=[(w, h, 60)])
    sink = OneDropSink(1 << 18)
    be.channels[0].start_encoded(EncoderParams(width=w, height=h, fps_num=60, gop=16), sink)
    frames = sink.wait(12)
    be.close()
    keys = [info.keyframe for _, info in frames]
    seqs = [info.sequence for _, info in frames]
    assert keys[0] and not keys[1], keys  # IDR, P, then the third AU found no buffer
    assert keys[2] and seqs[2] > 2, f"what follows the lost AU is not an IDR: {keys} (sequences {seqs})"
    assert "IMP_Encoder_RequestIDR" in fake.calls()
    dec = av.CodecContext.create("h264", "r")
    decoded = sum(len(dec.decode(av.Packet(data))) for data, _ in frames) + len(dec.decode(None))
    assert decoded == len(frames)
    assert (fake.outstanding_streams(), fake.errors()) == (0, 0)
