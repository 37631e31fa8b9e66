"""Hot-plug natively: real kernel uevents from loop devices stand in for the hardware.

``/dev/loop-control`` creates and deletes block devices ``loopN`` on demand, so
the host kernel emits genuine add/remove uevents without any camera.  The
daemon under test (sim backend, FUSE mount, no CUSE) is configured to treat
``loopN`` as its hardware.  The same checks run against CUSE nodes and udev
in the VM (test_vm_udev.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from impv4l2 import config, hotplug, uevent

from support.daemon import (DaemonProc, StreamingClient, fd_count, mounts_under, nodes_in, task_count,
                            wait_for)



# ---------------------------------------------------------------- pure logic

def test_hardware_set_needs_every_pattern():
    hw = hotplug.HardwareSet(["tx-isp", "avpu", "framechan*"])
    assert not hw.present and hw.missing == ["tx-isp", "avpu", "framechan*"]
    assert hw.update("add", "tx-isp") and hw.update("add", "avpu")
    assert not hw.update("add", "sda")  # not ours
    assert not hw.present and hw.missing == ["framechan*"]
    hw.update("add", "framechan0")
    hw.update("add", "framechan1")
    assert hw.present
    hw.update("remove", "framechan1")
    assert hw.present  # one frame channel is enough
    hw.update("remove", "framechan0")
    assert not hw.present
    hw.update("add", "framechan0")
    hw.update("remove", "avpu")
    assert not hw.present and hw.missing == ["avpu"]


def test_hardware_set_reset_from_sysfs_names():
    hw = hotplug.HardwareSet(["avpu", "framechan*"])
    hw.update("add", "avpu")
    hw.reset(["framechan1", "sda", "tty0"])  # what sysfs says after lost events
    assert not hw.present and hw.missing == ["avpu"]
    hw.reset(["avpu", "framechan0", "framechan2"])
    assert hw.present
    hw.update("remove", "framechan0")
    assert hw.present  # framechan2 is still known


class FakeSource:
    """An EventSource fed by the test: a pipe makes its fd readable."""

    def __init__(self):
        self.r, self.w = os.pipe()
        self.queue: list = []
        self.closed = False

    def push(self, item) -> None:
        self.queue.append(item)
        os.write(self.w, b"x")

    def fileno(self) -> int:
        return self.r

    def receive(self):
        if not self.queue:
            return None
        os.read(self.r, 1)
        item = self.queue.pop(0)
        if item == "overrun":
            raise uevent.Overrun("test")
        return item

    def close(self) -> None:
        self.closed = True
        os.close(self.r)
        os.close(self.w)


def ev(action, devpath, **env):
    return uevent.Uevent(action, devpath, {"ACTION": action, "DEVPATH": devpath, **env})


def test_monitor_rename_and_resync_with_a_fake_source(tmp_path):
    sysfs = tmp_path / "sys"
    (sysfs / "class" / "misc").mkdir(parents=True)
    (sysfs / "bus").mkdir()
    src = FakeSource()
    changes: list[tuple[bool, str]] = []
    mon = hotplug.HotplugMonitor(["cam*"], lambda p, d: changes.append((p, d)),
                                 open_source=lambda source: src, sysfs=str(sysfs))
    assert mon.start() is False
    try:
        src.push(ev("add", "/devices/virtual/misc/cam0"))
        wait_for(lambda: len(changes) == 1, 2, "add")
        src.push(ev("move", "/devices/virtual/net/eth1", DEVPATH_OLD="/devices/virtual/net/cam0"))
        wait_for(lambda: len(changes) == 2, 2, "rename away")  # the old name is gone
        # lost events: sysfs now has cam7 (a link, as in /sys/class/*/*)
        os.symlink("../../devices/virtual/misc/cam7", sysfs / "class" / "misc" / "cam7")
        src.push("overrun")
        wait_for(lambda: len(changes) == 3, 2, "resync")
        src.push("overrun")  # nothing changed: nothing reported
        src.push(ev("remove", "/devices/virtual/misc/cam7"))
        wait_for(lambda: len(changes) == 4, 2, "remove after resync")
    finally:
        mon.stop()
    assert changes == [(True, "add cam0"), (False, "move eth1"),
                       (True, "uevents lost, sysfs says present"), (False, "remove cam7")]
    assert mon.overruns == 2 and src.closed


def test_udev_source_still_works_through_pyudev():
    pytest.importorskip("pyudev")  # udev-processed events: pyudev only on this path
    mon = hotplug.HotplugMonitor(["null"], lambda p, d: None, source="udev")
    try:
        assert mon.start() is True  # /dev/null exists (enumerated from sysfs)
        assert isinstance(mon._events, hotplug.UdevSource)
    finally:
        mon.stop()
    assert mon._events is None


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="'kernel' or 'udev'"):
        hotplug.HotplugMonitor(["x"], lambda p, d: None, source="mdev").start()


@pytest.mark.parametrize("backend,enable,devices,expect", [
    ("sim", "auto", [], ()),  # sim: off unless configured, so `serve` needs no device
    ("sim", "on", [], ("impv4l2-sim-hw",)),
    ("sim", "auto", ["loop9"], ("loop9",)),
    ("t31", "auto", [], ("tx-isp", "avpu", "framechan*")),
    ("t31", "off", [], ()),
    ("t31", "on", ["avpu"], ("avpu",)),
])
def test_resolve(backend, enable, devices, expect):
    cfg = config.Config(backend=backend, hotplug=config.HotplugConfig(enable, devices))
    assert hotplug.resolve(cfg) == expect


# ---------------------------------------------------------------- loop devices

@pytest.fixture
def no_pyudev(monkeypatch):
    """``import pyudev`` fails, as on the camera: the kernel source must not need it."""
    monkeypatch.setitem(sys.modules, "pyudev", None)


@pytest.mark.root
def test_monitor_follows_real_uevents(loop_hw, no_pyudev):
    changes: list[tuple[bool, str]] = []
    fds = fd_count(os.getpid())
    mon = hotplug.HotplugMonitor([loop_hw.name], lambda p, d: changes.append((p, d)), source="kernel")
    assert mon.start() is False
    try:
        assert mon._thread.name == "impv4l2-hotplug"
        assert isinstance(mon._events, uevent.UeventSocket)  # the stdlib netlink socket
        for cycle in range(3):
            loop_hw.add()
            wait_for(lambda: len(changes) == 2 * cycle + 1, 2, "add reported")
            loop_hw.remove()
            wait_for(lambda: len(changes) == 2 * cycle + 2, 2, "remove reported")
        assert [p for p, _ in changes] == [True, False] * 3
        assert changes[0][1] == f"add {loop_hw.name}"
    finally:
        mon.stop()
    assert mon._thread is None
    assert fd_count(os.getpid()) == fds  # socket and pipe released


@pytest.mark.root
def test_monitor_sees_existing_device(loop_hw, no_pyudev):
    loop_hw.add()
    mon = hotplug.HotplugMonitor([loop_hw.name], lambda p, d: None, source="kernel")
    try:
        assert mon.start() is True
    finally:
        mon.stop()


# ---------------------------------------------------------------- the daemon

@pytest.fixture
def daemon(tmp_path, loop_hw):
    d = DaemonProc(tmp_path, [loop_hw.name], str(tmp_path / "mnt"))
    yield d
    d.stop()
    print("----- daemon log -----\n" + (d.text() if d.log.exists() else "(none)"))
    assert not mounts_under(d.mount), "mount left behind"


@pytest.mark.root
def test_nodes_follow_the_hardware(daemon, loop_hw):
    daemon.start()
    daemon.wait_log("waiting for the hardware")
    wait_for(lambda: daemon.mount in mounts_under(daemon.mount), 5, "FUSE mount")
    assert nodes_in(daemon.mount) == set()  # no hardware, no nodes

    loop_hw.add()
    took_up = wait_for(lambda: daemon.text().count(" with backend ") == 1, 2,
                       "all nodes served after the hardware appeared")
    names = nodes_in(daemon.mount)
    assert len(names) >= 2, names
    main = sorted(names)[0]
    client = StreamingClient(os.path.join(daemon.mount, main))
    try:
        client.wait_line("frames", 20)
        t_gone = time.monotonic()
        loop_hw.remove()
        took_down = wait_for(lambda: not nodes_in(daemon.mount), 2, "nodes gone after the hardware left")
        line = client.wait_line("error", 5)  # not a hang
        assert line.split()[1] == "ENODEV", line
        # the streaming client's DQBUF ends within 100 ms of the hardware going
        assert float(line.split()[3]) - t_gone < 0.1, (line, t_gone)
    finally:
        client.close()
    assert "hardware gone" in daemon.text()

    loop_hw.add()
    wait_for(lambda: nodes_in(daemon.mount) == names, 2, "the same names again")

    # A bounce (remove and add at once) still reopens the hardware.
    starts = daemon.text().count("hardware present")
    loop_hw.remove()
    loop_hw.add()
    wait_for(lambda: daemon.text().count("hardware present") == starts + 1, 2, "restart after a bounce")
    wait_for(lambda: nodes_in(daemon.mount) == names, 2, "nodes after a bounce")
    print(f"nodes up {took_up * 1000:.0f} ms after add, gone {took_down * 1000:.0f} ms after remove")


@pytest.mark.root
def test_twenty_cycles_leak_nothing(daemon, loop_hw):
    loop_hw.add()
    daemon.start()
    daemon.wait_serving(30)
    names = nodes_in(daemon.mount)

    def cycle():
        loop_hw.remove()
        wait_for(lambda: not nodes_in(daemon.mount), 2, "nodes gone")
        loop_hw.add()
        wait_for(lambda: nodes_in(daemon.mount) == names, 2, "nodes back")

    cycle()  # first cycle warms up lazy imports and thread pools
    before = fd_count(daemon.pid), task_count(daemon.pid), mounts_under("/")
    for _ in range(20):
        cycle()
    time.sleep(0.3)  # threads of the last teardown finish exiting
    after = fd_count(daemon.pid), task_count(daemon.pid), mounts_under("/")
    print(f"fds {before[0]} -> {after[0]}, threads {before[1]} -> {after[1]}, "
          f"mounts {len(before[2])} -> {len(after[2])}")
    assert after == before


@pytest.mark.root
def test_sigterm_removes_everything(daemon, loop_hw):
    loop_hw.add()
    daemon.start()
    daemon.wait_serving(30)
    client = StreamingClient(os.path.join(daemon.mount, sorted(nodes_in(daemon.mount))[0]))
    try:
        client.wait_line("frames", 20)
        took = daemon.stop()
        client.wait_line("error", 5)
    finally:
        client.close()
    assert daemon.proc.returncode == 0, daemon.text()
    assert not mounts_under(daemon.mount)
    assert "stopping (SIGTERM)" in daemon.text()
    print(f"SIGTERM while streaming: exited in {took * 1000:.0f} ms")
    assert took < 5  # generous liveness bound (the target is 1 s; measured above)


@pytest.mark.root
def test_sighup_applies_safe_changes_and_names_the_rest(daemon, loop_hw):
    loop_hw.add()
    daemon.start()
    daemon.wait_serving(30)
    names = nodes_in(daemon.mount)
    mark = len(daemon.text())
    daemon.write_config([loop_hw.name], log_level="debug", bitrate=3000000, base=30)
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("reload: not applied", start=mark)
    new = daemon.text()[mark:]
    assert "reload: log_level info -> debug" in new
    assert "reload: encoder.bitrate 2000000 -> 3000000" in new
    assert "not applied (restart impv4l2 to change): nodes" in new
    assert nodes_in(daemon.mount) == names  # nothing rebuilt

    # Hot-plug settings apply at once: watching another device that is absent removes the nodes.
    mark = len(daemon.text())
    daemon.write_config(["impv4l2-no-such-device"], log_level="debug", bitrate=3000000, base=30)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: not nodes_in(daemon.mount), 2, "nodes gone after hot-plug settings changed")
    assert "reload: hotplug" in daemon.text()[mark:]

    # A broken file is refused with its line, and the daemon keeps running.
    mark = len(daemon.text())
    daemon.config.write_text("[main]\nfps = 0\n")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("keeping the running configuration", start=mark)
    assert f"{daemon.config}:2: main.fps" in daemon.text()[mark:]
    assert daemon.proc.poll() is None


@pytest.mark.root
def test_backend_reporting_loss_removes_nodes(tmp_path, loop_hw):
    """Backend.set_lost_callback: the backend itself notices the hardware is gone."""
    from impv4l2.daemon import Daemon

    d = DaemonProc(tmp_path, [loop_hw.name], str(tmp_path / "mnt"))  # only for its config file
    daemon_ = Daemon(config.load(str(d.config)))
    loop_hw.add()
    daemon_.start()
    try:
        assert daemon_.up and len(nodes_in(d.mount)) >= 2
        names = nodes_in(d.mount)
        daemon_.backend._lost("sensor i2c timeout")  # what a backend's thread would call
        daemon_._handle(daemon_._events.get(timeout=2))
        assert not daemon_.up and nodes_in(d.mount) == set()
        # udev still says present; the next add (after a remove) brings it back
        loop_hw.remove()
        loop_hw.add()
        for _ in range(2):
            daemon_._handle(daemon_._events.get(timeout=2))
        assert daemon_.up and nodes_in(d.mount) == names
    finally:
        daemon_.stop()
    assert not mounts_under(d.mount)


@pytest.mark.root
def test_backend_loss_without_hotplug_exits_non_zero(tmp_path):
    from impv4l2.daemon import Daemon

    d = DaemonProc(tmp_path, [], str(tmp_path / "mnt"))
    cfg = config.load(str(d.config))
    cfg.hotplug.enable = "off"
    daemon_ = Daemon(cfg)
    daemon_.start()
    try:
        daemon_.backend._lost("gone")
        daemon_._handle(daemon_._events.get(timeout=2))
        assert daemon_._events.get(timeout=2) == ("stop", "hardware lost")
        assert daemon_.exit_status == 1
    finally:
        daemon_.stop()
