"""The t31 backend against the fake libimp (tests/fakes/libimp_fake.c)."""

from __future__ import annotations

import ctypes
import time

import pytest

from support import t31_fake  # noqa: E402
from support.t31_fake import SYSTEM_DOWN, SYSTEM_UP, UNDO, Sink, split_nals, write_proc_sensor  # noqa: E402

from impv4l2.driver.base import ChannelMode, Codec, EncoderParams, RcMode, SensorInfo  # noqa: E402
from impv4l2.driver.t31 import structs  # noqa: E402
from impv4l2.driver.t31.backend import OSD_POOL_SIZE, T31Backend  # noqa: E402
from impv4l2.driver.t31.libimp import ENV_LIBIMP, LibImp, T31Error  # noqa: E402

make_fake, fake = t31_fake.make_fake, t31_fake.fake  # the fixtures


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
        assert data[8:w * h] == bytes([i & 0xFF]) * (w * h - 8)
        # 120 lines: the vendor's UV plane starts at w * 128, after 8 rows of padding (zeros)
        assert data[w * h:] == b"\x50\xb0" * (w * h // 4), "chroma read from the padding rows"
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
    be = T31Backend(channels=[(320, 240, 30)], proc_root=str(fake.proc))
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
    owed = {UNDO[c] for c in done if c in UNDO}
    undo = [c for c in SYSTEM_DOWN if c in owed]  # what was done, undone in the sample's order
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
    assert fake.open_resources() == 5  # only the system part is still up (ISP, sensor x2, system, tuning)
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
    # the vendor's GetFrame gives up after 2 s without a frame; so does the fake
    monkeypatch.setenv("IMPFAKE_FRAME_TIMEOUT", "1")
    be = fake.backend()
    sink = Sink(160 * 120 * 3 // 2)
    t0 = time.monotonic()
    be.channels[1].start(sink)
    frames = sink.wait(1, timeout=10)
    waited = time.monotonic() - t0
    t1 = time.monotonic()
    be.close()
    assert all(info.error for _, info in frames)
    assert 1.9 < waited < 4, waited
    assert time.monotonic() - t1 < 3  # close waits out at most one GetFrame
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


# ---------------------------------------------------------------- issue 10: vendor fidelity

def test_bitrate_change_reaches_the_library_in_bit_per_s(fake):
    """IMP_Encoder_SetChnBitRate takes bit/s (1.1.4 zh, 1.1.6 en imp_encoder.h), unlike
    SetDefaultParam's kbit/s: a change while streaming arrives as the same number."""
    be = fake.backend()
    sink = Sink(1 << 20)
    enc = be.channels[0].start_encoded(EncoderParams(width=320, height=240, fps_num=60, rc_mode=RcMode.CBR,
                                                     bitrate=2_000_000, max_bitrate=2_000_000), sink)
    sink.wait(2)
    assert "br=2000" in next(ln for ln in fake.lines() if ln.startswith("IMP_Encoder_SetDefaultParam"))
    enc.update(bitrate=3_500_000, max_bitrate=4_000_000)
    assert (fake.bitrate(0, 0), fake.bitrate(0, 1)) == (3_500_000, 4_000_000)
    assert "IMP_Encoder_SetChnBitRate 0 3500000 4000000" in fake.lines()
    # a JPEG channel and a FIXQP one have no bit rate to set (the vendor refuses): not called
    jpeg = be.channels[1].start_encoded(EncoderParams(codec=Codec.JPEG, width=160, height=120, fps_num=60), Sink(1 << 16))
    jpeg.update(bitrate=1_000_000)
    be.close()
    fixqp = fake.backend().channels[0].start_encoded(EncoderParams(width=320, height=240, fps_num=60,
                                                                   rc_mode=RcMode.FIXQP), Sink(1 << 20))
    fixqp.update(bitrate=1_000_000)
    fixqp.channel.backend.close()
    assert [ln for ln in fake.lines() if ln.startswith("IMP_Encoder_SetChnBitRate")] == \
        ["IMP_Encoder_SetChnBitRate 0 3500000 4000000"]
    assert fake.errors() == 0


def test_fake_refuses_bitrates_as_the_vendor_does(fake):
    be = fake.backend()
    be.channels[0].start_encoded(EncoderParams(codec=Codec.JPEG, width=320, height=240, fps_num=60), Sink(1 << 16))
    assert fake.so.IMP_Encoder_SetChnBitRate(4, 2_000_000, 2_000_000) == -1  # JPEG channel
    be.close()
    assert fake.errors() == 1


@pytest.mark.parametrize("ch,size", [(0, (320, 360)), (1, (160, 120))])
def test_raw_nv12_chroma_comes_from_the_vendors_uv_plane(fake, ch, size):
    """360 and 120 lines are not multiples of 16: the vendor's UV plane starts at
    w * ALIGN16(h), after padding rows; a w*h*3/2 contiguous copy takes 8 of them as chroma."""
    w, h = size
    be = fake.backend(channels=[(320, 360, 60), (160, 120, 60)])
    sink = Sink(w * h * 3 // 2)
    be.channels[ch].start(sink)
    frames = sink.wait(3)
    be.close()
    for data, info in frames:
        assert info.bytesused == w * h * 3 // 2 and not info.error
        assert data[8:w * h] == bytes([info.sequence & 0xFF]) * (w * h - 8)
        assert data[w * h:] == b"\x50\xb0" * (w * h // 4)
    assert fake.errors() == 0


def test_frame_source_widths_are_multiples_of_16(fake, caplog):
    """The vendor's CreateChn refuses other widths (and chn0 not FS_PHY_CHANNEL); the
    backend's sizes and modes never ask for one: a 1000-wide sensor gives a 992-wide main."""
    be = fake.backend(sensor_width=1000, sensor_height=562, channels=None)
    main = be.channels[0]
    assert main.mode == ChannelMode(992, 562, 60)
    assert all(w % 16 == 0 for w, _ in main.sizes()) and (992, 562) in main.sizes()
    with pytest.raises(ValueError, match="multiple of 16"):
        main.configure(ChannelMode(328, 240, 30))
    sink = Sink(992 * 562 * 3 // 2)
    main.start(sink)
    sink.wait(2)
    main.stop()
    # the fake itself: a width of 328 and an extension channel 0 are refused
    attr = structs.native.IMPFSChnAttr(picWidth=328, picHeight=240, pixFmt=structs.PIX_FMT_NV12,
                                       outFrmRateNum=30, outFrmRateDen=1, nrVBs=2)
    assert fake.so.IMP_FrameSource_CreateChn(0, ctypes.byref(attr)) == -1
    attr.picWidth, attr.type = 320, 1  # FS_EXT_CHANNEL
    assert fake.so.IMP_FrameSource_CreateChn(0, ctypes.byref(attr)) == -1
    be.close()
    assert fake.errors() == 2
    be = fake.backend(channels=[(330, 240, 30)])
    assert be.channels[0].mode.width == 320 and "not a multiple of 16" in caplog.text
    be.close()


@pytest.mark.parametrize("version,sdk,stream", [
    ("IMP-1.1.6", "1.1.6", "IMPEncoderStream_116"), ("IMP-1.1.5.2", "1.1.5.2", "IMPEncoderStream"),
    ("IMP-1.1.5", "1.1.5", "IMPEncoderStream_115"), ("IMP-1.1.4", "1.1.4", "IMPEncoderStream_114"),
    ("IMP-1.1.1", "1.1.1", "IMPEncoderStream")])
def test_sdk_release_from_imp_system_getversion(fake, monkeypatch, caplog, version, sdk, stream):
    monkeypatch.setenv("IMPFAKE_VERSION", version)
    caplog.set_level("INFO", "impv4l2.t31")
    be = fake.backend()
    assert (be.libimp_version, be.sdk, be.stream_cls.__name__) == (version, sdk, stream)
    assert be.frame_cls.__name__ == ("IMPFrameInfo_116" if sdk == "1.1.6" else "IMPFrameInfo")
    sink = Sink(1 << 20)
    sc = be.channels[0].start_encoded(EncoderParams(width=320, height=240, fps_num=60), sink)
    sink.wait(3)
    be.close()
    if hasattr(sc._stream_full, "streamInfo"):  # the release's tail of the last AU, as the fake wrote it
        tail = sc._stream_full.streamInfo
        assert (tail.iNumBytes, tail.iSliceQP) == (sink.frames[-1][1].bytesused, 30)
    start = [r.getMessage() for r in caplog.records if r.getMessage().startswith("t31: libimp")]
    assert len(start) == 1 and version in start[0] and "gc2053" in start[0], start
    assert fake.errors() == 0


def test_sdk_option_overrides_and_is_checked(fake, monkeypatch, caplog):
    be = fake.backend(sdk="1.1.5")
    assert be.sdk == "1.1.5" and "overrides libimp's IMP-1.1.6" in caplog.text
    be.close()
    with pytest.raises(T31Error, match="1.1.9"):
        fake.backend(sdk="1.1.9")
    monkeypatch.setenv("IMPFAKE_VERSION", "IMP-1.1.7")  # unknown: the newest release below it
    be = fake.backend()
    assert be.sdk == "1.1.6" and "not a release known here" in caplog.text
    be.close()


def test_sensor_from_proc_jz_sensor_configuration_overriding(fake, tmp_path, caplog):
    caplog.set_level("INFO", "impv4l2.t31")
    proc = write_proc_sensor(tmp_path / "sensor", name="sc2336", i2c_addr="0x30", width=1920, height=1080,
                             max_fps=20)
    be = fake.backend(proc_root=str(proc), channels=[(320, 240, 20)])
    assert be.sensor == SensorInfo("sc2336", 1920, 1080, 20)  # runs at the sensor's max_fps
    assert be.channels[0].max_width == 1920
    be.close()
    assert "IMP_ISP_AddSensor sc2336 i2c=0x30" in fake.lines()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("t31: libimp"))
    assert "IMP-1.1.6" in line and "sc2336 at i2c 0x30" in line and str(proc) in line
    # configuration wins, field by field; a rate above max_fps is clamped
    be = fake.backend(proc_root=str(proc), sensor="gc4653", i2c_addr="0x29", fps=30, channels=[(320, 240, 20)])
    assert be.sensor == SensorInfo("gc4653", 1920, 1080, 20)
    be.close()
    assert "IMP_ISP_AddSensor gc4653 i2c=0x29" in fake.lines()
    assert "overriding i2c_addr, sensor" in caplog.text and "fps 30 above the sensor's 20" in caplog.text


def test_no_proc_jz_sensor_needs_a_configured_sensor(fake, tmp_path):
    with pytest.raises(T31Error, match=r"no .*nowhere.*name it in the \[t31\] configuration "
                                       r"\(sensor, i2c_addr, sensor_width, sensor_height\)"):
        fake.backend(proc_root=str(tmp_path / "nowhere"))
    assert fake.calls() == []  # before touching the hardware
    be = fake.backend(proc_root=str(tmp_path / "nowhere"), sensor="jxf23", i2c_addr=0x40, sensor_width=1920,
                      sensor_height=1080, fps=15)
    assert be.sensor == SensorInfo("jxf23", 1920, 1080, 15)
    be.close()
    assert "IMP_ISP_AddSensor jxf23 i2c=0x40" in fake.lines()


def test_bringup_sets_the_osd_pool_first_and_the_day_mode(fake):
    """sample-common.c: IMP_OSD_SetPoolSize before IMP_ISP_Open (later there is no rmem for OSD),
    IMPISP_RUNNING_MODE_DAY right after EnableTuning."""
    be = fake.backend()
    lines = fake.lines()
    assert lines[0] == f"IMP_OSD_SetPoolSize {OSD_POOL_SIZE}" and lines[1] == "IMP_ISP_Open"
    tuning = lines.index("IMP_ISP_EnableTuning")
    assert lines[tuning + 1] == "IMP_ISP_Tuning_SetISPRunningMode 0"
    assert fake.so.impfake_get_tuning(b"osd_pool") == OSD_POOL_SIZE
    assert fake.so.IMP_OSD_SetPoolSize(1 << 20) == -1  # after ISP_Open: refused like the vendor
    be.close()
    assert fake.errors() == 1


STUB_ALOG = "int IMP_Log_Get_Option(void) { return 0; }\nvoid imp_log_fun(int l, int o, int t) { (void)l; (void)o; (void)t; }\n"


def test_preloads_what_libimp_needs_and_names_what_is_missing(make_fake, tmp_path):
    """The vendor's libimp.so uses libalog's symbols without a DT_NEEDED for it: the loader
    preloads libalog.so (from libimp's directory first) RTLD_GLOBAL, and names it when missing."""
    import shutil
    import subprocess
    from fakes.build import build_fake as build
    lib = tmp_path / "libimp.so"
    shutil.copy(build(cflags=("-DIMPFAKE_NEEDS_ALOG",)), lib)
    with pytest.raises(T31Error) as e:
        LibImp(lib)
    assert "IMP_Log_Get_Option" in str(e.value)  # dlopen's undefined symbol
    assert "libalog.so (imp_log_fun, IMP_Log_Get_Option) not found to preload" in str(e.value)
    src = tmp_path / "alog.c"
    src.write_text(STUB_ALOG)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "libalog.so"), str(src)], check=True)
    loaded = LibImp(lib)
    assert str(tmp_path / "libalog.so") in loaded._preloaded and loaded.path == str(lib)
