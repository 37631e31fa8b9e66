"""CUSE transport against a real kernel with cuse.ko (run inside the VM: pytest -m vm)."""

from __future__ import annotations

import os
import signal
import stat
import time

import pytest

from impv4l2.fuse import CuseServer, cuse_available

from support.fuse_echo_device import EchoDevice  # noqa: E402
from support.fuse_clients import client, finish

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(not cuse_available(), reason="needs /dev/cuse (cuse.ko): run in the VM")]


@pytest.fixture
def cuse():
    dev = EchoDevice("impv4l2-echo0", memory_size=0)
    srv = CuseServer(dev)
    srv.start()
    path = f"/dev/{srv.devname}"
    deadline = time.monotonic() + 5
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    yield srv, dev, path
    srv.stop()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/sys/class/cuse/{srv.devname}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/sys/class/cuse/{srv.devname}"), "the CUSE device must vanish with the fd"


def test_character_device(cuse):
    srv, _, path = cuse
    st = os.stat(path)
    assert stat.S_ISCHR(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == srv.devnum
    with open(f"/sys/dev/char/{srv.devnum[0]}:{srv.devnum[1]}/uevent") as f:
        assert f"DEVNAME={srv.devname}" in f.read()


def test_roundtrip_via_retry(cuse):
    # ECHO/STORE/LOAD: the top-level struct through one retry (≤ 16383 by _IOC_SIZE);
    # PTR: chained retry for the array (128 KiB + the struct exceeds the kernel's limit:
    # that region falls back to process_vm, still byte-exact).
    _, _, path = cuse
    assert finish(client("roundtrip", path, 4, 100, 4096, 16383, 16384, 65536, 131072 - 16, 131072)).strip() == "OK"


def test_blocking_and_eintr(cuse):
    _, dev, path = cuse
    waiter = client("wait", path)
    assert waiter.stdout.readline().strip() == "WAITING"
    hammer = client("hammer", path, 500)
    assert finish(hammer, timeout=120).split() == ["OK", "500"]
    dev.signal()
    assert finish(waiter).split()[0] == "WOKE"
    waiter = client("wait", path)
    assert waiter.stdout.readline().strip() == "WAITING"
    time.sleep(0.3)
    t0 = time.monotonic()
    waiter.send_signal(signal.SIGUSR1)
    out = finish(waiter, timeout=5).split()
    assert out[0] == "EINTR"
    assert float(out[1]) - t0 < 0.1


@pytest.mark.parametrize("how", ["select", "poll", "epoll"])
def test_poll(cuse, how):
    _, dev, path = cuse
    with dev.lock:
        dev.queue.clear()
    p = client("poll", path, how)
    assert p.stdout.readline().strip() == "POLLING"
    time.sleep(0.3)
    dev.signal()
    assert finish(p, timeout=5).split()[0] == "READY"


def test_fixed_minor_and_restart():
    dev = EchoDevice("impv4l2-echo1", memory_size=0)
    srv = CuseServer(dev)
    srv.start()
    major = srv.devnum[0]
    srv.stop()
    srv2 = CuseServer(dev, major=major, minor=77)
    srv2.start()
    try:
        assert srv2.devnum == (major, 77)
    finally:
        srv2.stop()
