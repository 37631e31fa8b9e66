"""Sim backend: frame channels paced by the sensor clock, sinks, drops,
decimation, file input, encoded delivery, backend loading."""

from __future__ import annotations

import subprocess
import threading
import time

import av
import numpy as np
import pytest

from impv4l2.driver import load_backend
from impv4l2.driver.base import (ChannelMode, Codec, EncodedFrame, EncoderChannel,
                                 EncoderParams, FrameBuffer, FrameInfo)
from impv4l2.driver.sim.backend import SimBackend
from impv4l2.driver.sim.pattern import read_counter, read_timestamp_us, y_plane


class RecordingSink:
    """A FrameSink keeping copies of delivered frames; ``drop`` decides per
    get_buffer call whether to return None."""

    def __init__(self, size: int, width: int = 0, height: int = 0, drop=lambda i: False) -> None:
        self.size, self.width, self.height = size, width, height
        self.drop = drop
        self.calls = 0
        self.infos: list[FrameInfo] = []
        self.counters: list[int] = []
        self.stamps: list[int] = []
        self.frames: list[bytes] = []
        self.threads: set[int] = set()
        self.handed: list[memoryview] = []
        self.done = threading.Event()

    def get_buffer(self):
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.drop(self.calls - 1):
            return None
        fb = FrameBuffer(memoryview(bytearray(self.size)), len(self.handed))
        self.handed.append(fb)
        return fb

    def frame_done(self, buf, info: FrameInfo) -> None:
        assert buf is self.handed[-1]
        self.infos.append(info)
        if self.width:
            y = y_plane(buf.view, self.width, self.height)
            self.counters.append(read_counter(y))
            self.stamps.append(read_timestamp_us(y))
        else:
            self.frames.append(bytes(buf.view[: info.bytesused]))


@pytest.fixture
def backend():
    be = SimBackend()
    yield be
    be.close()


def _sink_for(ch, **kw) -> RecordingSink:
    m = ch.mode
    return RecordingSink(m.width * m.height * 3 // 2, m.width, m.height, **kw)


def test_layout(backend):
    main, sub = backend.channels
    assert (main.index, main.role, main.max_width, main.max_height) == (0, "main", 1920, 1080)
    assert (sub.index, sub.role) == (1, "sub")
    assert main.sizes()[0] == (1920, 1080) and sub.sizes()[0] == (640, 360)
    for ch in backend.channels:
        assert all(w <= ch.max_width and h <= ch.max_height and w % 2 == 0 == h % 2
                   for w, h in ch.sizes())
        assert list(ch.sizes()) == sorted(ch.sizes(), reverse=True)
        assert max(ch.frame_rates()) == backend.isp.sensor.fps == 25
        assert 5 in ch.frame_rates()
    assert (main.mode.width, main.mode.height, main.mode.fps) == (1920, 1080, 25)
    assert (sub.mode.width, sub.mode.height) == (640, 360)


def test_configure_rules(backend):
    main = backend.channels[0]
    with pytest.raises(ValueError):
        main.configure(ChannelMode(1000, 500, 25))
    with pytest.raises(ValueError):
        main.configure(ChannelMode(1280, 720, 60))
    main.configure(ChannelMode(1280, 720, 10))
    assert main.mode == ChannelMode(1280, 720, 10)
    sink = _sink_for(main)
    main.start(sink)
    try:
        with pytest.raises(RuntimeError):
            main.configure(ChannelMode(640, 360, 25))
        with pytest.raises(RuntimeError):
            main.start(sink)
    finally:
        main.stop()
    main.configure(ChannelMode(640, 360, 25))


def test_pacing_both_channels_one_thread(backend):
    main, sub = backend.channels
    ms, ss = _sink_for(main), _sink_for(sub)
    t0 = time.monotonic_ns()
    main.start(ms)
    sub.start(ss)
    time.sleep(1.0)
    main.stop()
    sub.stop()
    t1 = time.monotonic_ns()
    n_main, n_sub = len(ms.infos), len(ss.infos)
    time.sleep(0.15)
    assert len(ms.infos) == n_main and len(ss.infos) == n_sub  # nothing after stop()
    for sink in (ms, ss):
        assert 20 <= len(sink.infos) <= 30  # 1 s at 25 fps (generous liveness bound)
        seqs = [i.sequence for i in sink.infos]
        assert seqs[0] == 0 and all(b > a for a, b in zip(seqs, seqs[1:]))
        # gaps only where the loaded machine made the sensor skip frames
        assert seqs[-1] + 1 - len(seqs) <= backend.clock.skipped
        assert sink.counters == seqs  # burned-in counter = FrameInfo.sequence
        ts = [i.timestamp_ns for i in sink.infos]
        assert t0 - 50_000_000 <= ts[0] and ts[-1] <= t1  # CLOCK_MONOTONIC
        assert sink.stamps == [t // 1000 for t in ts]
        # absolute deadlines: capture times are exact multiples of the period
        assert list(np.diff(ts)) == [40_000_000 * d for d in np.diff(seqs)]
    assert len(ms.threads | ss.threads) == 1  # one sensor thread feeds both


def test_dropped_frames_leave_sequence_gaps(backend):
    sub = backend.channels[1]
    sink = _sink_for(sub, drop=lambda i: i % 2 == 1)  # every other buffer unavailable
    sub.start(sink)
    time.sleep(0.6)
    sub.stop()
    seqs = [i.sequence for i in sink.infos]
    assert len(seqs) >= 5
    assert seqs[0] == 0 and all(d >= 2 for d in np.diff(seqs))  # each drop is a gap
    assert sink.counters == seqs


def test_decimated_rate(backend):
    sub = backend.channels[1]
    sub.configure(ChannelMode(320, 180, 5))
    sink = _sink_for(sub)
    sub.start(sink)
    time.sleep(1.1)
    sub.stop()
    assert 4 <= len(sink.infos) <= 7
    assert [i.sequence for i in sink.infos] == list(range(len(sink.infos)))
    gaps = np.diff([i.timestamp_ns for i in sink.infos])
    assert np.median(gaps) == 200_000_000  # every 5th sensor frame
    assert all(g % 40_000_000 == 0 for g in gaps)


def test_restart_resets_sequence_and_tuning_applies_live(backend):
    sub = backend.channels[1]
    for _ in range(2):
        sink = RecordingSink(sub.frame_bytes)
        sub.start(sink)
        time.sleep(0.2)
        backend.isp.set("day_night", 1)
        time.sleep(0.2)
        sub.stop()
        assert sink.infos[0].sequence == 0
        n = 640 * 360
        first = np.frombuffer(sink.frames[0], np.uint8)[n:]
        last = np.frombuffer(sink.frames[-1], np.uint8)[n:]
        backend.isp.set("day_night", 0)
    assert not (first == 128).all()  # day: colour bars
    assert (last == 128).all()  # night: grayscale


def test_short_sink_buffer_is_an_error_frame(backend):
    sub = backend.channels[1]
    sink = RecordingSink(100)
    sub.start(sink)
    time.sleep(0.2)
    sub.stop()
    assert sink.infos and all(i.error for i in sink.infos)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=400x300:rate=25",
                    "-frames:v", "10", "-pix_fmt", "yuv420p", "-c:v", "libx264", str(path)], check=True)
    return str(path)


def test_file_source_loops_and_scales(clip):
    be = load_backend("sim", source=clip)
    try:
        main, sub = be.channels
        ms, ss = _sink_for(main), _sink_for(sub)
        main.start(ms)
        sub.start(ss)
        # 15 sensor frames > 10 file frames: looped (waited for, not timed: a loaded host
        # decodes the clip slower than 25 fps and the sensor skips frames meanwhile)
        deadline = time.monotonic() + 30
        while min(len(ms.infos), len(ss.infos)) < 15 and time.monotonic() < deadline:
            time.sleep(0.05)
        main.stop()
        sub.stop()
    finally:
        be.close()
    assert len(ms.infos) >= 15 and len(ss.infos) >= 15
    assert ms.counters == [i.sequence for i in ms.infos]
    # the burned-in counter is the sensor frame (a frame the loaded host's sensor thread
    # skipped is skipped on both channels), so it follows the sequence numbers
    assert ss.counters == [i.sequence for i in ss.infos]
    assert all(b > a for a, b in zip(ss.counters, ss.counters[1:])) and ss.counters[0] == 0


def test_file_source_image(tmp_path):
    png = tmp_path / "still.png"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=320x240",
                    "-frames:v", "1", str(png)], check=True)
    be = SimBackend(source=str(png))
    try:
        sub = be.channels[1]
        sink = RecordingSink(sub.frame_bytes)
        sub.start(sink)
        time.sleep(0.3)
        be.isp.set("hflip", 1)
        time.sleep(0.2)
        sub.stop()
    finally:
        be.close()
    w, h = 640, 360
    a = np.frombuffer(sink.frames[1], np.uint8)[: w * h].reshape(h, w)
    b = np.frombuffer(sink.frames[-1], np.uint8)[: w * h].reshape(h, w)
    body = slice(h // 4, h)  # below the OSD
    # scaled picture, then mirrored by the ISP
    assert np.abs(a[body].astype(int) - b[body][:, ::-1]).mean() < 1
    assert a[body].std() > 20


class FakeEncoderChannel(EncoderChannel):
    def __init__(self, params: EncoderParams) -> None:
        self.params = params
        self.frames = 0
        self.closed = False

    def encode(self, nv12, timestamp_ns):
        assert len(nv12) == self.params.width * self.params.height * 3 // 2
        counter = read_counter(y_plane(nv12, self.params.width, self.params.height))
        key = self.frames % 3 == 0
        self.frames += 1
        nal = b"\x00\x00\x00\x01\x65" + counter.to_bytes(4, "big")
        return EncodedFrame([nal, memoryview(b"\x00\x00\x00\x01\x41xy")], key, timestamp_ns)

    def request_idr(self):
        pass

    def update(self, **changes):
        pass

    def close(self):
        self.closed = True


class FakeEncoder:
    def __init__(self):
        self.channels = []

    def create_channel(self, params):
        self.channels.append(FakeEncoderChannel(params))
        return self.channels[-1]


def test_encoded_delivery_with_fake_encoder(backend):
    backend.encoder = FakeEncoder()
    sub = backend.channels[1]
    sink = RecordingSink(1000)
    enc = sub.start_encoded(EncoderParams(width=1920, height=1080), sink)
    assert (enc.params.width, enc.params.height, enc.params.fps_num) == (640, 360, 25)
    time.sleep(0.3)
    sub.stop()
    assert enc.closed
    assert len(sink.frames) >= 3
    for k, (info, data) in enumerate(zip(sink.infos, sink.frames)):
        assert info.bytesused == 9 + 7
        assert data[5:9] == k.to_bytes(4, "big")  # the encoder saw frame k's pixels
        assert data[9:] == b"\x00\x00\x00\x01\x41xy"
        assert info.keyframe == (k % 3 == 0) and info.sequence == k


def _have_avpu() -> bool:
    try:
        from impv4l2.driver.sim.avpu import SimAvpu  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _have_avpu(), reason="sim AVPU not available")
@pytest.mark.parametrize("codec", [Codec.H264, Codec.JPEG])
def test_encoded_with_sim_avpu_decodes_to_counter(backend, codec):
    sub = backend.channels[1]
    sink = RecordingSink(640 * 360 * 3 // 2)
    sub.start_encoded(EncoderParams(codec=codec, width=640, height=360, gop=10), sink)
    time.sleep(0.5)
    sub.stop()
    assert len(sink.frames) >= 5
    assert sink.infos[0].keyframe
    dec = av.CodecContext.create("h264" if codec is Codec.H264 else "mjpeg", "r")
    counters = []
    for data in sink.frames:
        for fr in dec.decode(av.Packet(data)):
            counters.append(read_counter(fr.reformat(format="gray").to_ndarray()))
    assert counters[: len(sink.infos)] == [i.sequence for i in sink.infos][: len(counters)]
    assert len(counters) >= len(sink.frames) - 1


def test_load_backend_registry():
    with pytest.raises(ValueError):
        load_backend("nope")
    be = load_backend("sim", fps=30, width=1280, height=720)
    try:
        assert be.name == "sim"
        assert be.isp.sensor.fps == 30
        assert be.channels[0].sizes()[0] == (1280, 720)
        assert 30 in be.channels[0].frame_rates()
    finally:
        be.close()
    assert not be.clock._thread.is_alive()
