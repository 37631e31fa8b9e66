"""Sim ISP tuning: every control really changes the rendered image."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from impv4l2.driver.base import ISP_CONTROL_NAMES, ControlKind, SensorInfo
from impv4l2.driver.sim.isp import SimIsp
from impv4l2.driver.sim.pattern import BARS_BANDS, BAND
from impv4l2.driver.sim.sensor import SyntheticScene

W, H = 640, 360
BARS = slice(BARS_BANDS[0] * H // BAND + 2, BARS_BANDS[1] * H // BAND - 2)


def render(values: dict | None = None, fps: int = 25, sensor_frame: int = 3,
           w: int = W, h: int = H) -> tuple[np.ndarray, np.ndarray]:
    """(Y (h, w) int, UV (h/2, w/2, 2) int) of a frame with these controls."""
    isp = SimIsp(SensorInfo("t", 1920, 1080, fps))
    for k, v in (values or {}).items():
        isp.set(k, v)
    f = np.empty(w * h * 3 // 2, np.uint8)
    SyntheticScene(fps).render(f, w, h, sensor_frame, isp.tuning())
    return (f[: w * h].reshape(h, w).astype(int),
            f[w * h:].reshape(h // 2, w // 2, 2).astype(int))


DEFAULT_Y, DEFAULT_UV = render()


def test_controls_are_data():
    isp = SimIsp(SensorInfo("t", 1920, 1080, 25))
    names = [c.name for c in isp.controls]
    assert names == list(ISP_CONTROL_NAMES)
    for c in isp.controls:
        assert c.minimum <= c.default <= c.maximum
        assert isp.get(c.name) == c.default
        if c.kind is ControlKind.MENU:
            assert len(c.menu) == c.maximum - c.minimum + 1
    assert {c.name: c.default for c in isp.controls if c.maximum == 255 and c.minimum == 0} == {
        "brightness": 128, "contrast": 128, "saturation": 128, "hue": 128, "sharpness": 128}
    isp.set("brightness", 300)  # clamped, never an exception
    assert isp.get("brightness") == 255
    with pytest.raises(KeyError):
        isp.set("nonsense", 1)


def test_default_is_neutral():
    isp = SimIsp(SensorInfo("t", 1920, 1080, 25))
    assert isp.tuning().neutral and isp.tuning().band_lut is None


@pytest.mark.parametrize("value,sign", [(200, 1), (60, -1)])
def test_brightness(value, sign):
    y, uv = render({"brightness": value})
    assert sign * (y[BARS].mean() - DEFAULT_Y[BARS].mean()) > 20
    assert np.array_equal(uv, DEFAULT_UV)


def test_contrast():
    hi, _ = render({"contrast": 220})
    lo, _ = render({"contrast": 40})
    flat, _ = render({"contrast": 0})
    d = DEFAULT_Y[BARS].std()
    assert hi[BARS].std() > 1.3 * d
    assert lo[BARS].std() < 0.5 * d
    assert flat[BARS].std() < 1


def test_saturation():
    _, gray = render({"saturation": 0})
    assert np.abs(gray - 128).max() <= 1
    _, vivid = render({"saturation": 200})
    assert np.abs(vivid - 128).mean() > 1.2 * np.abs(DEFAULT_UV - 128).mean()


def test_hue_rotates_chroma():
    y, uv = render({"hue": 192})  # +90 degrees
    assert np.array_equal(y, DEFAULT_Y)
    assert not np.array_equal(uv, DEFAULT_UV)
    mag = np.hypot(uv[..., 0] - 128, uv[..., 1] - 128)
    ref = np.hypot(DEFAULT_UV[..., 0] - 128, DEFAULT_UV[..., 1] - 128)
    unclipped = ref < 100  # strong colours clip after rotation
    assert np.abs(mag - ref)[unclipped].max() < 3


def test_sharpness():
    def edge_energy(y):
        return (np.diff(y[BARS], axis=1) ** 2).sum()  # a blurred step has less energy
    sharp, _ = render({"sharpness": 255})
    soft, _ = render({"sharpness": 0})
    assert edge_energy(sharp) > 1.2 * edge_energy(DEFAULT_Y)
    assert edge_energy(soft) < 0.9 * edge_energy(DEFAULT_Y)


def test_hflip_mirrors():
    y, uv = render({"hflip": 1})
    assert np.array_equal(y, DEFAULT_Y[:, ::-1])
    assert np.array_equal(uv, DEFAULT_UV[:, ::-1])


def test_vflip_mirrors():
    y, uv = render({"vflip": 1})
    assert np.array_equal(y, DEFAULT_Y[::-1])
    assert np.array_equal(uv, DEFAULT_UV[::-1])


def test_manual_exposure_scales_luma():
    dark, _ = render({"exposure_auto": 1, "exposure": 2000})  # default 10000 µs at 25 fps
    bright, _ = render({"exposure_auto": 1, "exposure": 30000})
    assert dark[BARS].mean() < DEFAULT_Y[BARS].mean() - 30
    assert bright[BARS].mean() > DEFAULT_Y[BARS].mean() + 30
    auto, _ = render({"exposure_auto": 0, "exposure": 2000})  # AE ignores the manual value
    assert np.array_equal(auto, DEFAULT_Y)


def test_manual_gain_scales_luma():
    bright, _ = render({"gain_auto": 0, "gain": 40})
    assert bright[BARS].mean() > DEFAULT_Y[BARS].mean() + 30
    auto, _ = render({"gain_auto": 1, "gain": 40})
    assert np.array_equal(auto, DEFAULT_Y)


@pytest.mark.parametrize("setting,banded", [(0, True), (1, False), (2, True), (3, False)])
def test_power_line_frequency(setting, banded):
    y, _ = render({"power_line_frequency": setting})  # the scene is lit at 50 Hz
    assert (not np.array_equal(y, DEFAULT_Y)) == banded
    if banded:
        darker = (y < DEFAULT_Y).any(axis=1)
        assert 0.2 < darker.mean() < 0.8  # faint horizontal bands, not a global change
        assert (y <= DEFAULT_Y).all()


def test_flicker_bands_roll_at_30fps():
    a, _ = render({"power_line_frequency": 0}, fps=30, sensor_frame=0)
    b, _ = render({"power_line_frequency": 0}, fps=30, sensor_frame=1)
    assert not np.array_equal(a, b)


def test_night_is_grayscale():
    y, uv = render({"day_night": 1})
    assert (uv == 128).all()
    assert np.array_equal(y, DEFAULT_Y)


def test_set_is_thread_safe():
    isp = SimIsp(SensorInfo("t", 1920, 1080, 25))
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            isp.tuning()

    t = threading.Thread(target=reader)
    t.start()
    for i in range(200):
        isp.set("brightness", i)
    stop.set()
    t.join()
    assert isp.get("brightness") == 199
    assert isp.tuning().ylut[100] == 100 + 199 - 128
