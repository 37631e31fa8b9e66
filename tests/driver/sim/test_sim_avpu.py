"""The sim AVPU emits what the T31 emits (layout, profiles, GOP, rate control),
checked by parsing its output and decoding it back with FFmpeg (PyAV)."""

from __future__ import annotations

import numpy as np
import av
import pytest

from impv4l2.driver import h264
from impv4l2.driver.base import Codec, EncodedFrame, EncoderParams, Profile, RcMode
from impv4l2.driver.sim.avpu import OutputTooSmall, SimAvpu

W, H = 320, 240


def moving_frames(n: int, w: int = W, h: int = H, seed: int = 1, noise: int = 12):
    """NV12 frames: diagonal bars moving 3 px/frame, a moving chroma ramp, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    cy, cx = np.mgrid[0:h // 2, 0:w // 2]
    for i in range(n):
        f = np.empty((h * 3 // 2, w), np.uint8)
        luma = 128 + 90 * np.sin((x + y / 2 + 3 * i) / 9.0)
        f[:h] = np.clip(luma + rng.integers(-noise, noise + 1, (h, w)), 0, 255)
        uv = f[h:].reshape(h // 2, w // 2, 2)
        uv[..., 0] = (cx * 2 + i) % 256
        uv[..., 1] = 255 - (cy * 2 + i) % 256
        yield f


def nv12_to_i420(f: np.ndarray, w: int = W, h: int = H) -> np.ndarray:
    uv = f[h:].reshape(h // 2, w // 2, 2)
    return np.concatenate([f[:h].ravel(), uv[..., 0].ravel(), uv[..., 1].ravel()])


def encode_all(ch, frames, hook=None) -> list[EncodedFrame]:
    out = []
    for i, f in enumerate(frames):
        if hook:
            hook(i, ch)
        out.append(ch.encode(memoryview(f), i * 40_000_000))
    return out


def au_bytes(ef: EncodedFrame) -> bytes:
    return b"".join(bytes(n) for n in ef.nals)


def decode_aus(aus: list[bytes]) -> list[av.VideoFrame]:
    """Decode access units one by one; each must yield exactly one picture
    right away (zero latency, one AU per frame)."""
    dec = av.CodecContext.create("h264", "r")
    pics = []
    for i, au in enumerate(aus):
        got = dec.decode(av.Packet(au))
        assert len(got) == 1, f"AU {i} decoded to {len(got)} pictures"
        pics += got
    assert dec.decode(None) == []  # nothing held back
    return pics


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / max(mse, 1e-9))


def params(**kw) -> EncoderParams:
    base = dict(codec=Codec.H264, width=W, height=H, fps_num=25, gop=25,
                rc_mode=RcMode.CBR, bitrate=1_000_000, max_bitrate=2_000_000)
    base.update(kw)
    return EncoderParams(**base)


@pytest.fixture(scope="module")
def avpu() -> SimAvpu:
    return SimAvpu()


# ---------------------------------------------------------------- h264 helpers

def test_nal_split_normalizes_start_codes():
    stream = (b"\x00\x00\x00\x01\x67\x64\x00\x1f" + b"\x00\x00\x01\x68\xee"
              + b"\x00\x00\x01\x65\x88\x00\x00\x03\x01" + b"\x00\x00\x00\x01\x41\x9a")
    spans = h264.nal_spans(stream)
    assert [s.nal_type for s in spans] == [7, 8, 5, 1]
    assert [s.start_code_len for s in spans] == [4, 3, 3, 4]
    payloads = [bytes(p) for p in h264.split_annexb(stream)]
    assert payloads[2] == b"\x65\x88\x00\x00\x03\x01"
    assert h264.nal_type(b"\x00\x00\x00\x01\x65") == 5 == h264.nal_type(b"\x65")
    assert h264.level_idc("4.0") == 40 and h264.level_str(51) == "5.1"


# ---------------------------------------------------------------- layout

def test_t31_layout_and_one_au_per_frame(avpu):
    ch = avpu.create_channel(params(gop=25))
    frames = list(moving_frames(100))
    efs = encode_all(ch, frames)
    assert len(efs) == 100
    for i, ef in enumerate(efs):
        assert all(bytes(n[:4]) == h264.START_CODE for n in ef.nals)
        assert ef.nal_types == [h264.nal_type(n) for n in ef.nals]
        assert ef.timestamp_ns == i * 40_000_000
        if i % 25 == 0:  # IDR exactly every gop frames, SPS+PPS first
            assert ef.keyframe
            assert ef.nal_types[:2] == [7, 8] and set(ef.nal_types[2:]) == {5}
        else:
            assert not ef.keyframe and set(ef.nal_types) == {1}, (i, ef.nal_types)
        assert 6 not in ef.nal_types and 9 not in ef.nal_types
    pics = decode_aus([au_bytes(ef) for ef in efs])
    assert [p.key_frame for p in pics] == [i % 25 == 0 for i in range(100)]
    # the concatenated stream, as a file, decodes too (no errors, 100 frames)
    dec = av.CodecContext.create("h264", "r")
    stream = b"".join(au_bytes(ef) for ef in efs)
    packets = dec.parse(stream) + dec.parse(None)  # None flushes the parser
    n = sum(len(dec.decode(p)) for p in packets) + len(dec.decode(None))
    assert n == 100


def test_one_slice_per_picture_as_the_avpu(avpu):
    """The T31's AVPU codes each picture as one slice; x264 with (automatic) sliced threads
    cut 720p and 1080p pictures into one slice per thread (7, 8, 5, 5, 1, 1, ... on 2 cores)."""
    w, h = 1280, 720
    ch = avpu.create_channel(params(width=w, height=h, gop=5))
    efs = encode_all(ch, moving_frames(10, w, h))
    slices = [sum(t in (1, 5) for t in ef.nal_types) for ef in efs]
    assert slices == [1] * 10, [ef.nal_types for ef in efs]
    assert [ef.nal_types for ef in efs[:2]] == [[7, 8, 5], [1]]


@pytest.mark.parametrize("profile,idc,level", [
    (Profile.HIGH, 100, "5.1"), (Profile.MAIN, 77, "4.0"), (Profile.BASELINE, 66, "3.1")])
def test_profile_level_in_sps(avpu, profile, idc, level):
    ch = avpu.create_channel(params(profile=profile, level=level))
    ef = ch.encode(memoryview(next(moving_frames(1))), 0)
    sps = h264.parse_sps(ef.nals[0])
    assert (sps.profile_idc, sps.level, sps.width, sps.height) == (idc, level, W, H)
    # FFmpeg's own parser agrees
    pic = decode_aus([au_bytes(ef)])[0]
    assert (pic.width, pic.height) == (W, H)


def test_odd_macroblock_size_cropping(avpu):
    ch = avpu.create_channel(params(width=328, height=186))
    f = next(moving_frames(1, 328, 186))
    sps = h264.parse_sps(ch.encode(memoryview(f), 0).nals[0])
    assert (sps.width, sps.height) == (328, 186)


@pytest.mark.parametrize("fmt", ["nv12", "yu12"])
def test_height_not_multiple_of_four_keeps_rows(avpu, fmt):
    """186 rows: PyAV's wrapped-buffer height would drop two lines (rows // 3 * 2)."""
    w, h = 328, 186
    f = np.full((h * 3 // 2, w), 128, np.uint8)
    f[:h] = np.where(np.arange(h) % 16 < 8, 40, 200).astype(np.uint8)[:, None]  # stripes
    ch = avpu.create_channel(params(width=w, height=h, pixel_format=fmt, rc_mode=RcMode.FIXQP,
                                    i_qp=12, p_qp=12))
    src = f if fmt == "nv12" else nv12_to_i420(f, w, h)
    pic = decode_aus([au_bytes(ch.encode(memoryview(src), 0))])[0]
    assert psnr(pic.to_ndarray(format="yuv420p")[:h], f[:h]) > 35


# ---------------------------------------------------------------- quality / input

def test_decode_psnr_nv12_and_yu12(avpu):
    frames = list(moving_frames(30, noise=2))
    for fmt, conv in (("nv12", lambda f: f), ("yu12", nv12_to_i420)):
        ch = avpu.create_channel(params(bitrate=1_500_000, pixel_format=fmt))
        efs = encode_all(ch, [conv(f) for f in frames])
        pics = decode_aus([au_bytes(ef) for ef in efs])
        worst = min(psnr(p.to_ndarray(format="yuv420p")[:H], f[:H])
                    for p, f in zip(pics, frames))
        assert worst > 30, (fmt, worst)


def test_short_frame_rejected(avpu):
    ch = avpu.create_channel(params())
    with pytest.raises(ValueError):
        ch.encode(memoryview(bytes(W * H)), 0)


# ---------------------------------------------------------------- rate control

def test_cbr_bitrate_within_20_percent(avpu):
    target = 400_000
    ch = avpu.create_channel(params(rc_mode=RcMode.CBR, bitrate=target, gop=50))
    efs = encode_all(ch, moving_frames(300))
    rate = sum(ef.size for ef in efs) * 8 * 25 / 300
    assert abs(rate - target) / target < 0.2, rate


def test_vbr_cap_and_capped_quality_run(avpu):
    for mode in (RcMode.VBR, RcMode.CAPPED_VBR, RcMode.CAPPED_QUALITY):
        ch = avpu.create_channel(params(rc_mode=mode, bitrate=300_000,
                                        max_bitrate=500_000, p_qp=20))
        efs = encode_all(ch, moving_frames(100))
        rate = sum(ef.size for ef in efs[25:]) * 8 * 25 / 75
        assert rate < 500_000 * 1.2, (mode, rate)


def test_fixqp_constant_sizes_and_qp_order(avpu):
    frames = list(moving_frames(50, noise=0))
    sizes = {}
    for qp in (22, 38):
        ch = avpu.create_channel(params(rc_mode=RcMode.FIXQP, i_qp=qp, p_qp=qp))
        sizes[qp] = [ef.size for ef in encode_all(ch, frames)]
    p = np.array(sizes[22][5:25])  # P frames of a uniformly moving pattern
    assert p.std() / p.mean() < 0.15, p
    assert sum(sizes[38]) < sum(sizes[22]) / 2
    # i_qp below p_qp: bigger IDRs, same P frames
    ch = avpu.create_channel(params(rc_mode=RcMode.FIXQP, i_qp=16, p_qp=22))
    s = [ef.size for ef in encode_all(ch, frames)]
    assert s[0] > sizes[22][0] * 1.3


# ---------------------------------------------------------------- control

def test_request_idr_mid_gop(avpu):
    ch = avpu.create_channel(params(gop=25))
    efs = encode_all(ch, moving_frames(40),
                     hook=lambda i, c: c.request_idr() if i == 7 else None)
    keys = [i for i, ef in enumerate(efs) if ef.keyframe]
    assert keys == [0, 7, 32]  # the GOP restarts at the forced IDR
    assert efs[7].nal_types[:3] == [7, 8, 5]
    decode_aus([au_bytes(ef) for ef in efs])


def test_update_bitrate_halves_within_two_gops(avpu):
    gop = 25
    ch = avpu.create_channel(params(rc_mode=RcMode.CBR, bitrate=800_000, gop=gop))
    efs = encode_all(ch, moving_frames(8 * gop),
                     hook=lambda i, c: c.update(bitrate=400_000) if i == 3 * gop + 10 else None)
    before = np.mean([ef.size for ef in efs[gop:3 * gop]])
    after = np.mean([ef.size for ef in efs[5 * gop + 10:8 * gop]])
    assert 0.35 < after / before < 0.65, (before, after)
    assert ch.params.bitrate == 400_000
    assert [i for i, ef in enumerate(efs) if ef.keyframe] == list(range(0, 8 * gop, gop))
    decode_aus([au_bytes(ef) for ef in efs])


def test_update_gop_reopens_at_next_idr(avpu):
    ch = avpu.create_channel(params(gop=20))
    efs = encode_all(ch, moving_frames(60),
                     hook=lambda i, c: c.update(gop=10, max_qp=40) if i == 5 else None)
    assert [i for i, ef in enumerate(efs) if ef.keyframe] == [0, 20, 30, 40, 50]
    decode_aus([au_bytes(ef) for ef in efs])


def test_update_size_applies_next_frame(avpu):
    ch = avpu.create_channel(params())
    f1 = list(moving_frames(3))
    f2 = list(moving_frames(3, 160, 120))
    efs = encode_all(ch, f1[:2])
    ch.update(width=160, height=120)
    efs += [ch.encode(memoryview(f), 0) for f in f2]
    assert efs[2].keyframe
    assert (h264.parse_sps(efs[2].nals[0]).width, ch.params.height) == (160, 120)
    with pytest.raises(ValueError):
        ch.update(bogus=1)
    for bad in ({"width": 161}, {"level": "x"}, {"min_qp": 40, "max_qp": 30}):
        with pytest.raises(ValueError):
            ch.update(**bad)


def test_encode_into_matches_encode_and_too_small(avpu):
    frames = list(moving_frames(12))
    a, b = avpu.create_channel(params()), avpu.create_channel(params())
    out = memoryview(bytearray(200_000))
    for i, f in enumerate(frames[:10]):
        ef = a.encode(memoryview(f), i)
        n, key = b.encode_into(memoryview(f), i, out)
        assert (bytes(out[:n]), key) == (au_bytes(ef), ef.keyframe)
    with pytest.raises(OutputTooSmall) as e:
        b.encode_into(memoryview(frames[10]), 10, memoryview(bytearray(16)))
    assert e.value.needed > 16
    n, key = b.encode_into(memoryview(frames[11]), 11, out)
    assert key and h264.nal_types(out[:n])[:3] == [7, 8, 5]  # recovers with an IDR


# ---------------------------------------------------------------- JPEG

def test_jpeg_one_picture_per_frame_and_quality(avpu):
    frames = list(moving_frames(3, noise=0))
    sizes = {}
    for q in (30, 90):
        ch = avpu.create_channel(params(codec=Codec.JPEG, jpeg_quality=q))
        efs = encode_all(ch, frames)
        sizes[q] = efs[0].size
        dec = av.CodecContext.create("mjpeg", "r")
        for ef, f in zip(efs, frames):
            jpg = au_bytes(ef)
            assert ef.keyframe and jpg[:2] == b"\xff\xd8" and jpg[-2:] == b"\xff\xd9"
            (pic,) = dec.decode(av.Packet(jpg))
            # JPEG is full range: the channel expanded the limited-range NV12
            want = np.clip((f[:H].astype(np.float64) - 16) * 255 / 219, 0, 255)
            assert psnr(pic.to_ndarray()[:H], want) > (35 if q == 90 else 28)
        out = memoryview(bytearray(200_000))
        n, key = ch.encode_into(memoryview(frames[0]), 0, out)
        assert key and bytes(out[:2]) == b"\xff\xd8" and n > 1000
    assert sizes[30] < sizes[90] * 0.8
