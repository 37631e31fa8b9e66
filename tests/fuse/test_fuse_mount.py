"""FUSE mount transport against the real kernel (/dev/fuse, root): echo device, real client processes."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from impv4l2.fuse import FuseMount, cleanup_stale, stale_mounts

from support.fuse_echo_device import (ECHO, PTR_OUT_S, SIGNAL, WAIT, RESIZE, DRAIN,  # noqa: E402
                              EchoDevice, INVERT)
from support.fuse_clients import client, finish, open_as
from support.paths import CLIENTS, ROOT


pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse")




@pytest.fixture
def mnt(request):
    mode = getattr(request, "param", "auto")
    d = tempfile.mkdtemp(prefix="impv4l2-fuse-test-")
    m = FuseMount(os.path.join(d, "mnt"), mmap_mode=mode)
    m.start()
    dev = EchoDevice("echo0", memory_size=1 << 20)
    m.add(dev)
    yield m, dev, os.path.join(m.mountpoint, "echo0")
    m.stop()
    assert not stale_mounts(m.mountpoint)
    os.rmdir(m.mountpoint)
    os.rmdir(d)


def test_listing_and_attrs(mnt):
    m, dev, path = mnt
    assert os.listdir(m.mountpoint) == ["echo0"]
    st = os.stat(path)
    assert st.st_size == dev.memory.size == 1 << 20
    assert oct(st.st_mode & 0o777) == "0o660"  # root:video, as the CUSE nodes


def test_roundtrip_sizes_both_directions(mnt):
    # Restricted ioctls carry at most _IOC_SIZE = 16383 bytes; larger payloads go through a
    # pointer inside the struct (process_vm_readv/writev on the caller), up to 128 KiB here.
    _, _, path = mnt
    sizes = [4, 100, 4096, 16383, 16384, 65536, 131072]
    assert finish(client("roundtrip", path, *sizes)).strip() == "OK"


def test_in_process_client_and_errors(mnt):
    _, dev, path = mnt
    fd = os.open(path, os.O_RDWR)
    try:
        buf = bytearray(b"\x00\x01\xfe")
        fcntl.ioctl(fd, ECHO(3), buf)
        assert bytes(buf) == b"\x00\x01\xfe".translate(INVERT)
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, (2 << 30) | (4 << 16) | (ord("Z") << 8) | 1, bytearray(4))
        assert e.value.errno == errno.ENOTTY
        # Pointer to unmapped memory: the device's process_vm read fails -> EFAULT.
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, (1 << 30) | (PTR_OUT_S.size << 16) | (ord("E") << 8) | 10,
                        PTR_OUT_S.pack(8, 16, 0))
        assert e.value.errno == errno.EFAULT
        fcntl.ioctl(fd, RESIZE, struct.pack("<I", 2 << 20))
        assert os.stat(path).st_size == 2 << 20
    finally:
        os.close(fd)


def _plain(m: FuseMount) -> str:
    """A device without memory: its file is DIRECT_IO, so read()/write() reach the device in every mode."""
    return m.add(EchoDevice("plain", memory_size=0))


def test_nonblocking_handle_gets_eagain(mnt):
    m, _, _ = mnt
    fd = os.open(_plain(m), os.O_RDWR | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.ioctl(fd, WAIT, bytearray(4))
        with pytest.raises(BlockingIOError):
            os.read(fd, 10)
    finally:
        os.close(fd)


def test_many_clients_while_one_waits(mnt):
    _, dev, path = mnt
    waiter = client("wait", path)
    assert waiter.stdout.readline().strip() == "WAITING"
    time.sleep(0.1)
    hammers = [client("hammer", path, 10000) for _ in range(8)]
    for h in hammers:
        assert finish(h, timeout=120).split() == ["OK", "10000"]
    assert waiter.poll() is None, "the waiting client should still be parked"
    fd = os.open(path, os.O_RDWR)
    fcntl.ioctl(fd, SIGNAL)
    os.close(fd)
    assert finish(waiter).split()[0] == "WOKE"


def test_signal_ends_blocked_call_with_eintr(mnt):
    _, dev, path = mnt
    waiter = client("wait", path)
    assert waiter.stdout.readline().strip() == "WAITING"
    time.sleep(0.2)   # let the WAIT reach the server and park
    t0 = time.monotonic()
    waiter.send_signal(signal.SIGUSR1)
    out = finish(waiter, timeout=5).split()
    assert out[0] == "EINTR"
    assert float(out[1]) - t0 < 0.1, "EINTR must end the call within 100 ms"


@pytest.mark.parametrize("how", ["select", "poll", "epoll"])
def test_poll_wakes_on_device_signal(mnt, how):
    _, dev, path = mnt
    best = 1.0
    for _ in range(3):
        with dev.lock:
            dev.queue.clear()
        p = client("poll", path, how)
        assert p.stdout.readline().strip() == "POLLING"
        time.sleep(0.2)
        t0 = time.monotonic()
        dev.signal()   # from a foreign thread, like a backend would
        out = finish(p, timeout=5).split()
        assert out[0] == "READY"
        best = min(best, float(out[1]) - t0)
    print(f"{how}: woke {best * 1e3:.2f} ms after the device signalled")
    assert best < 0.005


def test_read_write_and_poll_mask(mnt):
    m, _, _ = mnt
    fd = os.open(_plain(m), os.O_RDWR | os.O_NONBLOCK)
    try:
        import select
        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLOUT)
        assert p.poll(0)[0][1] & select.POLLIN == 0
        os.write(fd, b"hello")
        assert p.poll(0)[0][1] & select.POLLIN
        assert os.read(fd, 100) == b"hello"
        os.write(fd, b"again")
        fcntl.ioctl(fd, DRAIN)
        assert p.poll(0)[0][1] & select.POLLIN == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("mnt", ["passthrough", "direct", "cached"], indirect=True)
def test_mmap_byte_exact(mnt):
    m, dev, path = mnt
    assert m.mmap_mode == mnt[0].requested_mode
    assert finish(client("mmap", path, 1 << 20, 7, 8192)).strip() == "OK"
    # Growth: the mapping past the old end works once the memory grew (no SIGBUS).
    fd = os.open(path, os.O_RDWR)
    fcntl.ioctl(fd, RESIZE, struct.pack("<I", 4 << 20))
    os.close(fd)
    assert finish(client("mmap", path, 4 << 20, 9, 3 << 20)).strip() == "OK"


def test_hotplug_add_remove(mnt):
    m, dev, path = mnt
    dev2 = EchoDevice("echo1", memory_size=0)
    m.add(dev2)
    assert sorted(os.listdir(m.mountpoint)) == ["echo0", "echo1"]
    fd = os.open(os.path.join(m.mountpoint, "echo1"), os.O_RDWR)
    result: list = []

    def blocked():
        try:
            fcntl.ioctl(fd, WAIT, bytearray(4))
            result.append("woke")
        except OSError as e:
            result.append(e.errno)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.2)
    m.remove("echo1")
    t.join(5)
    assert result == [errno.ENODEV]
    assert os.listdir(m.mountpoint) == ["echo0"]
    with pytest.raises(OSError) as e:
        fcntl.ioctl(fd, ECHO(4), bytearray(4))
    assert e.value.errno == errno.ENODEV
    os.close(fd)
    assert not os.path.exists(os.path.join(m.mountpoint, "echo1"))




def _close(fd: int) -> None:
    try:
        os.close(fd)   # the FLUSH of a dead connection fails with ENOTCONN; the fd is gone anyway
    except OSError as e:
        assert e.errno == errno.ENOTCONN


def _server(mp: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, str(CLIENTS / "echo_server.py"), mp], stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.readline().strip() == "READY"
    return p


@pytest.fixture
def mp(tmp_path):
    path = str(tmp_path / "mnt")
    yield path
    cleanup_stale(path)   # leave no dead mount behind if a test failed midway


def test_kill9_then_restart(mp):
    p = _server(mp)
    fd = os.open(os.path.join(mp, "echo0"), os.O_RDWR)
    p.kill()
    p.wait(5)
    with pytest.raises(OSError) as e:
        fcntl.ioctl(fd, ECHO(4), bytearray(4))
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV)
    _close(fd)
    with pytest.raises(OSError) as e:
        os.listdir(mp)
    assert e.value.errno == errno.ENOTCONN   # the dead mount of a crashed run
    p2 = _server(mp)
    try:
        assert os.listdir(mp) == ["echo0"]
        assert len(stale_mounts(mp)) == 1
    finally:
        p2.send_signal(signal.SIGTERM)
        p2.wait(5)
    assert not stale_mounts(mp)


def test_sigterm_tears_down_within_1s(mp):
    p = _server(mp)
    fd = os.open(os.path.join(mp, "echo0"), os.O_RDWR)   # an open client must not hold it up
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=5)
    elapsed = time.monotonic() - t0
    assert "STOPPED" in out
    assert elapsed < 1.0
    assert not stale_mounts(mp)
    _close(fd)


@pytest.mark.parametrize("door", [0, 1])
def test_device_on_two_transports_wakes_both(door):
    """A device served by two transports at once (the daemon serves every node
    through CUSE and the FUSE mount): a request parked on either door, and a
    poller on either door, is woken by the device.  Regression: the device kept
    one waker, so the door attached first never saw a wake-up again."""
    d = tempfile.mkdtemp(prefix="impv4l2-fuse-test-")
    mounts = [FuseMount(os.path.join(d, f"mnt{i}")) for i in range(2)]
    dev = EchoDevice("plain", memory_size=0)
    try:
        for m in mounts:
            m.start()
            m.add(dev)
        path = os.path.join(mounts[door].mountpoint, "plain")
        for _ in range(3):
            waiter = client("wait", path)
            assert waiter.stdout.readline().strip() == "WAITING"
            time.sleep(0.2)   # parked
            dev.signal()
            assert finish(waiter, timeout=5).split()[0] == "WOKE"
            with dev.lock:
                dev.queue.clear()
            p = client("poll", path, "poll")
            assert p.stdout.readline().strip() == "POLLING"
            time.sleep(0.2)
            dev.signal()
            assert finish(p, timeout=5).split()[0] == "READY"
            with dev.lock:
                dev.queue.clear()
        mounts[1 - door].remove("plain")   # the other door goes: this one still wakes
        waiter = client("wait", path)
        assert waiter.stdout.readline().strip() == "WAITING"
        time.sleep(0.2)
        dev.signal()
        assert finish(waiter, timeout=5).split()[0] == "WOKE"
        assert len(dev.wake) == 1
    finally:
        for m in mounts:
            m.stop()
            os.rmdir(m.mountpoint)
        os.rmdir(d)




def test_files_are_root_video_0660_and_enforced(mnt):
    """The FUSE door has the CUSE door's access (udev: root:video 0660): the kernel checks it
    (default_permissions), so a process outside group video cannot open a node."""
    import grp
    m, _, path = mnt
    os.chmod(os.path.dirname(m.mountpoint), 0o755)  # mkdtemp's 0700 would refuse everyone
    st = os.stat(path)
    video = grp.getgrnam("video").gr_gid
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, os.getuid(), video)
    nobody = 65534
    assert open_as(path, nobody, [nobody]) == "EACCES"
    assert open_as(path, nobody, [nobody, video]) == "ok"
    assert open_as(os.path.dirname(path), nobody, [nobody]) == "EISDIR"  # the directory stays listable
