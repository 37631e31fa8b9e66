"""Day/night on the sim backend: the private Day/Night menu with Auto, the read-only
Day/Night State control and its V4L2_EVENT_CTRL, IR-cut/IR-LED GPIOs through a sysfs
tree in a temporary directory, and the auto mode's hysteresis."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest

from impv4l2 import config as config_mod
from impv4l2.driver import load_backend
from impv4l2.driver.base import LightMeter
from impv4l2.driver.daynight import AUTO, DayNight, DayNightParams
from impv4l2.v4l2 import abi
from impv4l2.v4l2.capture import CaptureNode
from impv4l2.v4l2.controls import CID_DAY_NIGHT, CID_DAY_NIGHT_STATE

from support.v4l2_helpers import buf, ctrl, dqbuf, err, ioctl, open_node, reqbufs, streamon

IRCUT, IRLED = 52, 49
DAY, NIGHT = 0, 1


@pytest.fixture
def gpio_root(tmp_path):
    """A sysfs-like gpio tree; ``export`` creates the line's directory as the kernel would
    (here: the test pre-creates them, export must not be needed twice)."""
    for n in (IRCUT, IRLED):
        d = tmp_path / f"gpio{n}"
        d.mkdir()
        (d / "direction").write_text("in")
        (d / "value").write_text("0")
    (tmp_path / "export").write_text("")
    return tmp_path


def line(root, n) -> str:
    return (root / f"gpio{n}" / "value").read_text()


@pytest.fixture
def camera(gpio_root):
    """A fresh backend (the day/night feature is per backend) and a sub node."""
    cfg = config_mod.DayNightConfig(ircut_gpio=IRCUT, irled_gpio=IRLED, gpio_root=str(gpio_root),
                                    interval_ms=40, hold=3, night_gain=8, day_gain=2)
    backend = load_backend("sim", fps=30)
    node = CaptureNode("video40", backend, backend.channels[1], daynight=cfg)
    yield backend, node, gpio_root
    node.close()
    backend.close()


def gpio_writes(caplog) -> list[tuple[str, str]]:
    out = []
    for r in caplog.records:
        msg = r.getMessage()
        if r.name == "impv4l2.daynight" and msg.startswith("gpio "):
            label, value = msg.split("(")[1].split(")")[0], msg.rsplit("= ", 1)[1]
            out.append((label, value))
    return out


def state_events(h) -> list[int]:
    out = []
    while True:
        ev = abi.v4l2_event()
        if err(h, "DQEVENT", ev):
            return out
        assert (ev.type, ev.id) == (abi.EventType.CTRL, CID_DAY_NIGHT_STATE)
        out.append(ev.u.ctrl.value)


def subscribe_state(h) -> None:
    sub = abi.v4l2_event_subscription()
    sub.type, sub.id = abi.EventType.CTRL, CID_DAY_NIGHT_STATE
    ioctl(h, "SUBSCRIBE_EVENT", sub)


def grab_uv(h) -> np.ndarray:
    """The chroma plane of one 640x360 NV12 frame."""
    b = dqbuf(h)
    data = bytes(h.node.queue.view(h.node.queue.buffers[b.index]))
    ioctl(h, "QBUF", buf(b.index))
    return np.frombuffer(data, np.uint8)[640 * 360: 640 * 360 * 3 // 2]


def test_controls(camera):
    backend, node, root = camera
    h = open_node(node)
    q = abi.v4l2_queryctrl()
    q.id = CID_DAY_NIGHT
    ioctl(h, "QUERYCTRL", q)
    assert (q.name, q.type, q.minimum, q.maximum, q.default_value) == (b"Day/Night", abi.CtrlType.MENU, 0, 2, 0)
    names = []
    for i in range(3):
        m = abi.v4l2_querymenu()
        m.id, m.index = CID_DAY_NIGHT, i
        ioctl(h, "QUERYMENU", m)
        names.append(m.name)
    assert names == [b"Day", b"Night", b"Auto"]
    q.id = CID_DAY_NIGHT_STATE
    ioctl(h, "QUERYCTRL", q)
    assert (q.name, q.flags, q.maximum) == (b"Day/Night State", abi.CtrlFlag.READ_ONLY, 1)
    assert err(h, "S_CTRL", abi.v4l2_control(CID_DAY_NIGHT_STATE, 1)) == 13  # EACCES
    assert err(h, "S_CTRL", abi.v4l2_control(CID_DAY_NIGHT, 3)) == 34  # ERANGE
    # bring-up drove the lines to day: filter in, LEDs off
    assert (line(root, IRCUT), line(root, IRLED)) == ("1", "0")
    assert (root / f"gpio{IRCUT}" / "direction").read_text() == "out"
    h.release()


def test_switching_drives_gpios_in_order_and_posts_an_event(camera, caplog):
    backend, node, root = camera
    h, other = open_node(node), open_node(node, pid=2)
    subscribe_state(h)
    subscribe_state(other)
    reqbufs(h, 3)
    for i in range(3):
        ioctl(h, "QBUF", buf(i))
    streamon(h)
    assert np.abs(grab_uv(h).astype(int) - 128).max() > 50  # colour bars
    caplog.set_level(logging.INFO, "impv4l2.daynight")
    assert ctrl(h, CID_DAY_NIGHT, NIGHT) == NIGHT
    assert gpio_writes(caplog) == [("ircut", "0"), ("irled", "1")]  # filter out, then LEDs on
    assert (line(root, IRCUT), line(root, IRLED)) == ("0", "1")
    assert backend.isp.get("day_night") == 1 and ctrl(h, CID_DAY_NIGHT_STATE) == NIGHT
    assert state_events(h) == [NIGHT] and state_events(other) == [NIGHT]
    for _ in range(3):
        grab_uv(h)  # frames rendered before the switch
    assert (grab_uv(h) == 128).all()  # monochrome
    caplog.clear()
    ctrl(h, CID_DAY_NIGHT, DAY)
    assert gpio_writes(caplog) == [("irled", "0"), ("ircut", "1")]  # LEDs off, then filter in
    assert (line(root, IRCUT), line(root, IRLED)) == ("1", "0")
    assert state_events(other) == [DAY]
    caplog.clear()
    ctrl(h, CID_DAY_NIGHT, DAY)  # no change: no writes, no event
    assert gpio_writes(caplog) == [] and state_events(other) == []
    h.release()
    other.release()


def test_auto_follows_the_light_with_hysteresis(camera, caplog):
    backend, node, root = camera
    h = open_node(node)
    subscribe_state(h)
    ctrl(h, CID_DAY_NIGHT, AUTO)
    time.sleep(0.3)
    assert state_events(h) == [] and ctrl(h, CID_DAY_NIGHT_STATE) == DAY  # well lit
    backend.set_scene(light=0.1)  # total gain 10 >= night_gain 8
    deadline = time.monotonic() + 2
    while ctrl(h, CID_DAY_NIGHT_STATE) != NIGHT and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ctrl(h, CID_DAY_NIGHT_STATE) == NIGHT and state_events(h) == [NIGHT]
    assert (line(root, IRCUT), line(root, IRLED)) == ("0", "1")
    assert ctrl(h, CID_DAY_NIGHT) == AUTO  # the mode stays Auto; the state says what it chose
    # Between the thresholds (gain 3..7): stays night however long, and light that
    # wobbles around the night threshold does not flap either.
    for light in (0.2, 0.34, 0.14, 0.12, 0.2):
        backend.set_scene(light=light)
        time.sleep(0.25)
    assert ctrl(h, CID_DAY_NIGHT_STATE) == NIGHT and state_events(h) == []
    backend.set_scene(light=1.0)  # gain 1 <= day_gain 2
    deadline = time.monotonic() + 2
    while ctrl(h, CID_DAY_NIGHT_STATE) != DAY and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state_events(h) == [DAY]
    ctrl(h, CID_DAY_NIGHT, DAY)  # stops the auto thread
    backend.set_scene(light=0.05)
    time.sleep(0.3)
    assert ctrl(h, CID_DAY_NIGHT_STATE) == DAY and state_events(h) == []
    h.release()


class FakeMeter(LightMeter):
    def __init__(self):
        self.gain = 1.0

    def total_gain(self) -> float:
        return self.gain


class FakeIsp:
    def __init__(self):
        self.values = {"day_night": 0}

    def get(self, name):
        return self.values[name]

    def set(self, name, value):
        self.values[name] = value


def test_hysteresis_samples():
    """The decision rule itself, sample by sample (no thread: a long interval)."""
    meter, isp, switches = FakeMeter(), FakeIsp(), []
    dn = DayNight(isp, meter, DayNightParams(night_gain=8, day_gain=2, hold=3, interval_ms=60_000),
                  on_switch=switches.append)
    dn.set_mode(AUTO)

    def feed(*gains):
        for g in gains:
            meter.gain = g
            dn.sample()

    feed(9, 9, 7, 9, 9, 7.9, 9, 7)  # around the night threshold, never 3 in a row: no switch
    assert switches == [] and not dn.night
    feed(8, 8)
    assert switches == [] and not dn.night
    feed(8)  # third in a row at the threshold
    assert switches == [True] and isp.values["day_night"] == 1
    feed(*[3, 7.9, 2.1] * 5)  # between the thresholds: stays night
    feed(2, 2, 5, 2, 2, 5)  # at the day threshold, never 3 in a row
    assert switches == [True]
    feed(1, 2)
    assert switches == [True]
    feed(1)
    assert switches == [True, False] and isp.values["day_night"] == 0
    dn.close()
    with pytest.raises(ValueError):
        DayNight(isp, meter, DayNightParams(night_gain=2, day_gain=2))
    with pytest.raises(ValueError):
        DayNight(isp, None, DayNightParams()).set_mode(AUTO)


def test_backend_without_the_interfaces_offers_neither():
    """A backend without motion source or light meter (t31 today): no Detect controls,
    the plain ISP Day/Night (Day, Night), no state control."""
    backend = load_backend("sim", fps=30)
    backend.motion = None
    backend.light_meter = None
    node = CaptureNode("video41", backend, backend.channels[1])
    try:
        h = open_node(node)
        q = abi.v4l2_queryctrl()
        q.id = abi.CID.DETECT_MD_MODE
        assert err(h, "QUERYCTRL", q) == 22
        q.id = CID_DAY_NIGHT_STATE
        assert err(h, "QUERYCTRL", q) == 22
        q.id = CID_DAY_NIGHT
        ioctl(h, "QUERYCTRL", q)
        assert q.maximum == 1
        sub = abi.v4l2_event_subscription()
        sub.type = abi.EventType.MOTION_DET
        assert err(h, "SUBSCRIBE_EVENT", sub) == 22
        h.release()
    finally:
        node.close()
        backend.close()


def test_config_section(tmp_path):
    p = tmp_path / "impv4l2.toml"
    p.write_text("[daynight]\nmode = \"auto\"\nircut_gpio = 52\nirled_gpio = 49\nnight_gain = 10\n")
    cfg = config_mod.load(str(p))
    assert (cfg.daynight.mode, cfg.daynight.ircut_gpio, cfg.daynight.irled_gpio, cfg.daynight.night_gain) == \
        ("auto", 52, 49, 10)
    assert DayNightParams.of(cfg.daynight).ircut_gpio == 52
    p.write_text("[daynight]\nmode = \"dusk\"\n")
    with pytest.raises(config_mod.ConfigError, match="daynight.mode"):
        config_mod.load(str(p))
    assert DayNightParams.of(SimpleNamespace(hold=5)).hold == 5
