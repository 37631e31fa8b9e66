"""The sim test pattern: OSD counter/timestamp read back from pixels, at every
channel size and after scaling, format round trips and lossy compression."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from impv4l2.driver.sim.pattern import (pattern, read_counter, read_timestamp_us,
                                        y_plane)

SIZES = [(1920, 1080), (1280, 720), (960, 540), (640, 360), (320, 180)]
SEQ, TS_NS = 0xDEADBEEF, 5_123_456_789_012_345  # timestamp > 2**32 µs: high row used


def frame(w: int, h: int, seq: int = SEQ, ts: int = TS_NS, sensor_frame: int = 7) -> np.ndarray:
    pat = pattern(w, h)
    f = pat.base.copy()
    pat.draw_box(f, pat.box_rect(sensor_frame, 25), (210, 16, 146))
    pat.draw_osd(f, seq, ts)
    return f


def to_av(f: np.ndarray, w: int, h: int) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(f.reshape(h * 3 // 2, w), format="nv12")


@pytest.mark.parametrize("w,h", SIZES)
def test_read_back_native(w, h):
    f = frame(w, h)
    assert f.size == w * h * 3 // 2
    y = y_plane(f, w, h)
    assert read_counter(y) == SEQ
    assert read_timestamp_us(y) == TS_NS // 1000


@pytest.mark.parametrize("seq", [0, 1, 2, 255, 0x7FFFFFFF, 0xFFFFFFFF])
def test_counter_values(seq):
    assert read_counter(y_plane(frame(320, 180, seq=seq), 320, 180)) == seq


def test_yuyv_round_trip():
    w, h = 640, 360
    yuyv = to_av(frame(w, h), w, h).reformat(format="yuyv422")
    back = yuyv.reformat(format="nv12").to_ndarray()
    y = back[:h]
    assert read_counter(y) == SEQ
    assert read_timestamp_us(y) == TS_NS // 1000


@pytest.mark.parametrize("dst", [(640, 360), (320, 180), (1280, 720)])
def test_scaled_by_swscale(dst):
    w, h = 1920, 1080
    scaled = to_av(frame(w, h), w, h).reformat(width=dst[0], height=dst[1], format="nv12",
                                               interpolation="BICUBIC")
    y = scaled.to_ndarray()[: dst[1]]
    assert read_counter(y) == SEQ
    assert read_timestamp_us(y) == TS_NS // 1000


def _codec_round_trip(f: np.ndarray, w: int, h: int, codec: str, pix_fmt: str, **options) -> np.ndarray:
    enc = av.CodecContext.create(codec, "w")
    enc.width, enc.height, enc.pix_fmt = w, h, pix_fmt
    enc.time_base = Fraction(1, 25)
    enc.framerate = Fraction(25, 1)
    enc.options = options
    src = to_av(f, w, h).reformat(format=pix_fmt)
    src.pts = 0
    packets = list(enc.encode(src)) + list(enc.encode(None))
    dec = av.CodecContext.create(codec.replace("libx264", "h264"), "r")
    frames = [fr for p in packets for fr in dec.decode(p)] + list(dec.decode(None))
    assert frames, "decoder produced no frame"
    return frames[0].reformat(format="gray").to_ndarray()


@pytest.mark.parametrize("w,h", [(1920, 1080), (320, 180)])
def test_h264_compressed(w, h):
    y = _codec_round_trip(frame(w, h), w, h, "libx264", "yuv420p", crf="35", preset="ultrafast")
    assert read_counter(y) == SEQ
    assert read_timestamp_us(y) == TS_NS // 1000


def test_jpeg_compressed():
    w, h = 640, 360
    y = _codec_round_trip(frame(w, h), w, h, "mjpeg", "yuvj420p", q="20")
    assert read_counter(y) == SEQ


def test_no_pattern_is_an_error():
    with pytest.raises(ValueError):
        read_counter(np.full((360, 640), 128, np.uint8))
    # a corrupted data cell is caught by the check bits
    w, h = 640, 360
    y = y_plane(frame(w, h), w, h).copy()
    cw = w // 40
    row_h = h // 24
    cell = 10
    y[:row_h, cell * cw:(cell + 1) * cw] = 251 - y[:row_h, cell * cw:(cell + 1) * cw]
    with pytest.raises(ValueError):
        read_counter(y)


def test_box_moves_and_bars_precomputed():
    w, h = 640, 360
    a, b = frame(w, h, sensor_frame=0), frame(w, h, sensor_frame=10)
    assert not np.array_equal(a, b)
    pat = pattern(w, h)
    assert pattern(w, h) is pat  # cached per size
    assert not pat.base.flags.writeable
    x0, _, _ = pat.box_rect(0, 25)
    x1, _, _ = pat.box_rect(10, 25)
    assert x1 > x0
    # the same moment puts the box at the same relative place at every size
    small = pattern(320, 180).box_rect(10, 25)
    assert abs(small[0] / 320 - x1 / 640) < 0.02


def test_odd_size_rejected():
    with pytest.raises(ValueError):
        pattern(641, 360)
