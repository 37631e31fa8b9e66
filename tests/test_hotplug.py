"""Hot-plug natively: real kernel uevents from loop devices stand in for the hardware.

``/dev/loop-control`` creates and deletes block devices ``loopN`` on demand, so
the host kernel emits genuine add/remove uevents without any camera.  The
daemon under test (sim backend, FUSE mount, no CUSE) is configured to treat
``loopN`` as its hardware.  The same checks run against CUSE nodes and udev
in the VM (test_vm_udev.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from impv4l2 import config, hotplug, uevent

IMPV4L2 = [sys.executable, "-c", "import sys; from impv4l2.cli import main; sys.exit(main())"]
LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81


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

class LoopHardware:
    """A block device loopN that tests add and remove (real uevents)."""

    def __init__(self):
        self.ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        self.number = next(n for n in range(230, 1000) if not os.path.exists(f"/sys/block/loop{n}"))
        self.name = f"loop{self.number}"
        self.present = False

    def add(self) -> None:
        fcntl.ioctl(self.ctl, LOOP_CTL_ADD, self.number)
        self.present = True

    def remove(self) -> None:
        for _ in range(50):  # EBUSY while udev's workers still have it open
            try:
                fcntl.ioctl(self.ctl, LOOP_CTL_REMOVE, self.number)
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.05)
        self.present = False

    def close(self) -> None:
        if self.present:
            self.remove()
        os.close(self.ctl)


@pytest.fixture
def loop_hw():
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and /dev/loop-control")
    hw = LoopHardware()
    yield hw
    hw.close()


def wait_for(pred, timeout: float, what: str, step: float = 0.02):
    """Poll ``pred`` until truthy; fail naming ``what`` after ``timeout`` s. Returns the time taken."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(step)
    return time.monotonic() - t0


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

def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def task_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def mounts_under(path: str) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(path)]


class DaemonProc:
    """``impv4l2 serve`` in a subprocess with a config file written by the test."""

    def __init__(self, tmp: Path, devices: list[str], mount: str, cuse: str = "off", extra: str = ""):
        self.tmp = tmp
        self.mount = mount
        self.config = tmp / "impv4l2.toml"
        self.log = tmp / "daemon.log"
        self.write_config(devices, cuse, extra)
        self.proc: subprocess.Popen | None = None

    def write_config(self, devices, cuse="off", extra="", log_level="info", bitrate=2000000, base=10):
        self.config.write_text(textwrap.dedent(f"""
            backend = "sim"
            log_level = "{log_level}"
            [main]
            width = 640
            height = 360
            fps = 10
            [sub]
            width = 320
            height = 180
            fps = 10
            [nodes]
            base = {base}
            [encoder]
            bitrate = {bitrate}
            [transport]
            cuse = "{cuse}"
            mount = "{self.mount}"
            dev_links = false
            [hotplug]
            enable = "on"
            devices = {list(devices)!r}
        """).replace("'", '"') + extra)

    def start(self) -> "DaemonProc":
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen([*IMPV4L2, "--config", str(self.config), "serve"],
                                     stdout=self.logf, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text()

    def wait_log(self, needle: str, timeout: float = 10, start: int = 0) -> int:
        wait_for(lambda: needle in self.text()[start:] or self.proc.poll() is not None, timeout,
                 f"log line {needle!r}")
        assert needle in self.text()[start:], self.text()
        return len(self.text())

    def wait_serving(self, timeout: float, count: int = 1) -> None:
        """Until the daemon has logged its ``count``-th complete bring-up (all nodes served)."""
        wait_for(lambda: self.text().count(" with backend ") >= count or self.proc.poll() is not None,
                 timeout, "daemon serving its nodes")
        assert self.proc.poll() is None, self.text()

    def stop(self) -> float:
        """SIGTERM; returns seconds until the process exited."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            pytest.fail("daemon ignored SIGTERM for 10 s:\n" + self.text())
        self.logf.close()
        return time.monotonic() - t0


def nodes_in(mount: str) -> set[str]:
    try:
        return {n for n in os.listdir(mount) if n.startswith("video")}
    except OSError:
        return set()


# A streaming client in its own process: USERPTR streaming (works on FUSE files
# and CUSE nodes alike); prints "frames" after 3 frames, then "error <ERRNO>"
# when a call fails.
CLIENT = r"""
import ctypes, errno, fcntl, os, sys, time
from linuxpy.video import raw
from impv4l2.v4l2 import abi
CAP, UPTR = raw.BufType.VIDEO_CAPTURE, raw.Memory.USERPTR
def ioc(name, s):
    fcntl.ioctl(fd, abi.VIDIOC[name], s)
fd = os.open(sys.argv[1], os.O_RDWR)
n = 0
try:
    f = raw.v4l2_format(); f.type = CAP; ioc("G_FMT", f)
    size = f.fmt.pix.sizeimage
    r = raw.v4l2_requestbuffers(); r.count, r.type, r.memory = 2, CAP, UPTR; ioc("REQBUFS", r)
    mem = [ctypes.create_string_buffer(size) for _ in range(r.count)]
    def qbuf(i):
        b = raw.v4l2_buffer(); b.index, b.type, b.memory = i, CAP, UPTR
        b.m.userptr, b.length = ctypes.addressof(mem[i]), size
        ioc("QBUF", b)
    for i in range(r.count):
        qbuf(i)
    ioc("STREAMON", ctypes.c_int(CAP))
    while True:
        b = raw.v4l2_buffer(); b.type, b.memory = CAP, UPTR
        ioc("DQBUF", b)
        n += 1
        if n == 3:
            print("frames", flush=True)
        qbuf(b.index)
except OSError as e:
    print("error", errno.errorcode.get(e.errno, e.errno), n, time.monotonic(), flush=True)
"""


class StreamingClient:
    def __init__(self, path: str):
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT, path], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def wait_line(self, prefix: str, timeout: float) -> str:
        wait_for(lambda: any(x.startswith(prefix) for x in self.lines) or self.proc.poll() is not None,
                 timeout, f"client output {prefix!r}")
        self._reader.join(0.2)
        hits = [x for x in self.lines if x.startswith(prefix)]
        assert hits, f"client said {self.lines}, stderr {self.proc.stderr.read() if self.proc.poll() is not None else ''}"
        return hits[0]

    def close(self) -> None:
        # A client stuck inside a FUSE request dies only when the daemon answers
        # or its connection ends (daemon teardown): do not wait for it here.
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2)


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
