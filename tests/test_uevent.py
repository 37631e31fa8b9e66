"""The standard-library uevent source (impv4l2/uevent.py) against the real kernel.

Real messages are triggered through sysfs (writing "change" to a device's
``uevent`` file) and with loop devices (support.hardware.LoopHardware, the loop_hw fixture); pyudev, on
this x86 host, is only the reference for what enumeration must find.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from impv4l2 import hotplug, uevent
from support.daemon import wait_for
from support.paths import CLIENTS


NULL_UEVENT = "/sys/class/mem/null/uevent"
NULL_DEVPATH = "/devices/virtual/mem/null"


def trigger_null(n: int = 1) -> None:
    """``n`` real "change" uevents from the kernel, for /dev/null (harmless to other listeners)."""
    with open(NULL_UEVENT, "w") as f:
        for _ in range(n):
            f.write("change")
            f.flush()


def receive_matching(sock: uevent.UeventSocket, pred, timeout: float = 2.0) -> uevent.Uevent:
    """The first event ``pred`` accepts (other devices' events of this busy host are skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([sock], [], [], 0.1)
        while (e := sock.receive()) is not None:
            if pred(e):
                return e
    pytest.fail("no matching uevent")


# ---------------------------------------------------------------- parsing

def test_parse_kernel_message():
    e = uevent.parse(b"add@/devices/virtual/block/loop7\0ACTION=add\0DEVPATH=/devices/virtual/block/loop7\0"
                     b"SUBSYSTEM=block\0MAJOR=7\0MINOR=7\0DEVNAME=loop7\0DEVTYPE=disk\0SEQNUM=4242\0")
    assert (e.action, e.devpath, e.subsystem, e.devname, e.seqnum, e.sys_name) == \
        ("add", "/devices/virtual/block/loop7", "block", "loop7", 4242, "loop7")
    assert e.env["DEVTYPE"] == "disk" and e.old_sys_name is None


def test_parse_edge_cases():
    # the header alone is enough; '!' in sysfs names is libudev's '/'
    e = uevent.parse(b"remove@/devices/pci0000:00/host0/block/cciss!c0d0")
    assert (e.action, e.sys_name, e.subsystem, e.seqnum) == ("remove", "cciss/c0d0", "", None)
    # a relayed message carries the kernel's SEQNUM last: the last value wins
    assert uevent.parse(b"change@/x/y\0SEQNUM=1\0SEQNUM=99\0").seqnum == 99
    e = uevent.parse(b"move@/devices/virtual/net/wan0\0ACTION=move\0DEVPATH_OLD=/devices/virtual/net/eth0\0")
    assert (e.sys_name, e.old_sys_name) == ("wan0", "eth0")
    # udevd's group-2 messages, garbage, and headers without a devpath are not kernel uevents
    assert uevent.parse(b"libudev\0\xfe\xed\xca\xfe" + bytes(32)) is None
    for junk in (b"", b"\0\0", b"hello", b"add@\0ACTION=add\0", b"add@relative/path\0"):
        assert uevent.parse(junk) is None, junk


# ---------------------------------------------------------------- the real socket

@pytest.mark.root
def test_real_change_uevent_is_parsed():
    with uevent.UeventSocket() as sock:
        assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert sock.rcvbuf >= uevent.DEFAULT_RCVBUF  # SO_RCVBUFFORCE past rmem_max as root
        trigger_null()
        e = receive_matching(sock, lambda e: e.devpath == NULL_DEVPATH)
    assert (e.action, e.subsystem, e.devname, e.sys_name) == ("change", "mem", "null", "null")
    assert e.env["MAJOR"] == "1" and e.env["MINOR"] == "3"
    assert isinstance(e.seqnum, int) and e.seqnum > 0


@pytest.mark.root
def test_real_loop_device_add_and_remove(loop_hw):
    with uevent.UeventSocket() as sock:
        loop_hw.add()
        add = receive_matching(sock, lambda e: e.sys_name == loop_hw.name)
        loop_hw.remove()
        remove = receive_matching(sock, lambda e: e.sys_name == loop_hw.name and e.action == "remove")
    assert (add.action, add.subsystem, add.devname) == ("add", "block", loop_hw.name)
    assert remove.seqnum > add.seqnum


def test_unprivileged_socket_falls_back_to_so_rcvbuf():
    """Without CAP_NET_ADMIN SO_RCVBUFFORCE is refused: SO_RCVBUF (capped by rmem_max) still
    works, and anyone may listen to the kernel's group."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    res = subprocess.run([sys.executable, str(CLIENTS / "uevent_rcvbuf.py")], capture_output=True, text=True, timeout=30,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr
    got, rmem_max = map(int, res.stdout.split())
    assert got == 2 * min(rmem_max, uevent.DEFAULT_RCVBUF)  # the kernel doubles what it grants


@pytest.mark.root
def test_forged_message_from_userspace_is_ignored():
    """A process with CAP_NET_ADMIN can multicast to group 1 — the kernel allows it (root only;
    EPERM otherwise) — and the message reaches every listener with the sender's portid.  The
    monitor must not take it for the hardware appearing."""
    name = f"impv4l2-forged-{os.getpid()}"
    devpath = f"/devices/virtual/misc/{name}"
    forged = (f"add@{devpath}\0ACTION=add\0DEVPATH={devpath}\0SUBSYSTEM=misc\0"
              f"DEVNAME={name}\0SEQNUM=1\0").encode()
    changes: list = []
    mon = hotplug.HotplugMonitor([name], lambda p, d: changes.append((p, d)))
    witness = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, uevent.NETLINK_KOBJECT_UEVENT)
    sender = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, uevent.NETLINK_KOBJECT_UEVENT)
    try:
        witness.bind((0, uevent.KERNEL_GROUP))
        witness.settimeout(2)
        sender.bind((0, 0))
        assert mon.start() is False
        try:
            sender.sendto(forged, (0, uevent.KERNEL_GROUP))
        except PermissionError:
            pytest.skip("the kernel refused a multicast send to group 1 (no CAP_NET_ADMIN here)")
        while True:  # the forgery was delivered, from the sender's portid
            data, (pid, groups) = witness.recvfrom(8192)
            if data == forged:
                break
        assert pid == sender.getsockname()[0] != 0 and groups == uevent.KERNEL_GROUP
        wait_for(lambda: mon._events.ignored >= 1, 2, "the forged message read and dropped")
        time.sleep(0.1)
        assert changes == [] and not mon.present
        # real events still flow after the forgery
        trigger_null()
        deadline = time.monotonic() + 2
        while True:
            data, (pid, _) = witness.recvfrom(8192)
            if pid == 0 and data.startswith(f"change@{NULL_DEVPATH}\0".encode()):
                break
            assert time.monotonic() < deadline
    finally:
        mon.stop()
        witness.close()
        sender.close()


# ---------------------------------------------------------------- overrun

@pytest.mark.root
def test_overrun_re_enumerates_and_reports(loop_hw):
    """ENOBUFS: with the smallest receive buffer and the monitor's thread held, a burst of
    uevents overflows it and the remove of the hardware that follows is lost; the monitor re-reads sysfs
    and reports the hardware gone all the same, then follows the next add normally."""
    gate = threading.Event()
    changes: list[tuple[bool, str]] = []

    def on_change(present: bool, detail: str) -> None:
        changes.append((present, detail))
        gate.wait(10)  # hold the thread inside the first report

    tiny: list[uevent.UeventSocket] = []

    def tiny_source(source: str) -> uevent.UeventSocket:
        tiny.append(uevent.UeventSocket(rcvbuf=0))  # the kernel's minimum, a few KiB
        return tiny[0]

    mon = hotplug.HotplugMonitor([loop_hw.name], on_change, open_source=tiny_source)
    assert mon.start() is False
    try:
        print(f"minimum receive buffer: {tiny[0].rcvbuf} bytes")
        loop_hw.add()
        wait_for(lambda: changes, 2, "add reported")
        trigger_null(200)  # overflows the queue: the remove that follows is dropped
        loop_hw.remove()
        assert mon.overruns == 0
        gate.set()
        wait_for(lambda: len(changes) == 2, 2, "the loss reported after the overrun")
        assert mon.overruns >= 1 and not mon.present
        assert changes[1] == (False, "uevents lost, sysfs says missing")
        loop_hw.add()
        wait_for(lambda: len(changes) == 3, 2, "add after the overrun")
        assert changes[2][0] is True and mon.present
    finally:
        gate.set()
        mon.stop()
    assert changes[0][0] is True  # "add loopN" (or a resync if this busy host overran it first)


# ---------------------------------------------------------------- enumeration

def test_enumeration_finds_what_pyudev_finds():
    pyudev = pytest.importorskip("pyudev")
    t0 = time.perf_counter()
    before = uevent.enumerate_sys_names()
    took = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = {d.sys_name for d in pyudev.Context().list_devices()}
    took_pyudev = time.perf_counter() - t0
    after = uevent.enumerate_sys_names()
    print(f"sysfs enumeration: {len(before)} devices in {took * 1000:.2f} ms "
          f"(pyudev list_devices: {len(reference)} in {took_pyudev * 1000:.1f} ms)")
    # other tests on this host add and remove devices (loop, bdi of FUSE mounts) meanwhile
    assert reference <= before | after, sorted(reference - (before | after))
    assert before & after <= reference, sorted((before & after) - reference)
    wanted = {"null", "fuse", "loop-control", "cuse", "loop0"}
    assert wanted & before == wanted & reference >= {"null", "fuse", "loop-control"}
    assert took < 0.5


@pytest.mark.root
def test_enumeration_follows_a_loop_device(loop_hw):
    assert loop_hw.name not in uevent.enumerate_sys_names()
    loop_hw.add()
    assert loop_hw.name in uevent.enumerate_sys_names()


def test_enumeration_of_an_old_sysfs_layout(tmp_path):
    """Class devices as directories (CONFIG_SYSFS_DEPRECATED) and /sys/block without
    /sys/class/block; class attribute files are not devices."""
    (tmp_path / "class" / "misc" / "avpu").mkdir(parents=True)
    (tmp_path / "class" / "firmware").mkdir()
    (tmp_path / "class" / "firmware" / "timeout").write_text("60\n")
    (tmp_path / "bus" / "platform" / "devices").mkdir(parents=True)
    os.symlink("../../../devices/platform/tx-isp", tmp_path / "bus" / "platform" / "devices" / "tx-isp")
    (tmp_path / "block" / "cciss!c0d0").mkdir(parents=True)
    assert uevent.enumerate_sys_names(str(tmp_path)) == {"avpu", "tx-isp", "cciss/c0d0"}
    assert uevent.enumerate_sys_names(str(tmp_path / "missing")) == set()


# ---------------------------------------------------------------- without pyudev



@pytest.mark.root
def test_monitor_without_pyudev_follows_the_hardware(loop_hw):
    proc = subprocess.Popen([sys.executable, str(CLIENTS / "hotplug_follower.py"), loop_hw.name], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def line() -> str:
        if not select.select([proc.stdout], [], [], 5)[0]:
            proc.kill()
            pytest.fail("no output from the follower: " + proc.stderr.read())
        return proc.stdout.readline().strip()

    try:
        assert line() == "start False"
        for _ in range(2):
            loop_hw.add()
            assert line() == f"change True add {loop_hw.name}"
            loop_hw.remove()
            assert line() == f"change False remove {loop_hw.name}"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert line() == "stopped False None"  # libudev never loaded, pyudev never imported
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in proc.stderr.read()
