"""A test Device for the FUSE/CUSE transports (no V4L2 in it).

ioctls (type 'E'):
  ECHO(size)   _IOWR nr 1, any size: the payload comes back with every byte inverted.
  STORE(size)  _IOW  nr 2: remembers the payload.   LOAD(size) _IOR nr 3: returns it (zero padded).
  PTR          _IOWR nr 4, struct {u64 ptr; u32 len; u32 crc}: follows ptr, inverts the array in
               place in the caller's memory, crc = crc32 of what it read.
  WAIT         _IOR  nr 5, u32: blocks (WouldBlock) until SIGNAL was called; returns the count.
  SIGNAL       _IO   nr 6: signal waiters, make the device readable (POLLIN), wake.
  FILL         _IOW  nr 7, struct {u32 off; u32 len; u32 seed; u32 pad}: fills memory with a
               pattern and calls sync_to_client (like DQBUF).
  CHECK        _IOWR nr 8, struct {u32 off; u32 len; u32 crc; u32 pad}: sync_from_client (like
               QBUF; WouldBlock until fetched) then crc32 of the memory region.
  RESIZE       _IOW  nr 9, u32: memory.resize.
  PTR_OUT      _IOW  nr 10, struct {u64 ptr; u32 len; u32 seed}: writes pattern(seed) to ptr (write-only).
  DRAIN        _IO   nr 11: consumes one pending signal (POLLIN drops when none are left).
  DQ           _IOWR nr 12, struct {u32 off; u32 len; u32 seq; u32 pad}: like a DQBUF of a frame the
               producer wrote in place: stamps seq at both ends of the region, sync_to_client.
read() returns queued data (from write() or SIGNAL), WouldBlock when empty.
"""

from __future__ import annotations

import struct
import threading
import zlib

from impv4l2 import fileops
from impv4l2.ioc import NATIVE, READ as IOC_READ, WRITE as IOC_WRITE
from impv4l2.memfd import MemfdMemory

IOC_NONE = 0


def IOC(d: int, nr: int, size: int) -> int:
    """An 'E' ioctl in the running machine's encoding (d: READ/WRITE flags)."""
    return NATIVE.ioc(NATIVE.flags_to_dir(d), "E", nr, size)


def ECHO(size: int) -> int:
    return IOC(IOC_READ | IOC_WRITE, 1, size)


def STORE(size: int) -> int:
    return IOC(IOC_WRITE, 2, size)


def LOAD(size: int) -> int:
    return IOC(IOC_READ, 3, size)


PTR_S = struct.Struct("<QII")
REGION_S = struct.Struct("<IIII")
PTR_OUT_S = struct.Struct("<QII")
PTR = IOC(IOC_READ | IOC_WRITE, 4, PTR_S.size)
WAIT = IOC(IOC_READ, 5, 4)
SIGNAL = IOC(IOC_NONE, 6, 0)
FILL = IOC(IOC_WRITE, 7, REGION_S.size)
CHECK = IOC(IOC_READ | IOC_WRITE, 8, REGION_S.size)
RESIZE = IOC(IOC_WRITE, 9, 4)
PTR_OUT = IOC(IOC_WRITE, 10, PTR_OUT_S.size)
DRAIN = IOC(IOC_NONE, 11, 0)
DQ = IOC(IOC_READ | IOC_WRITE, 12, REGION_S.size)

INVERT = bytes(255 - i for i in range(256))


def pattern(seed: int, length: int) -> bytes:
    """Deterministic bytes for (seed, length): fast, and different per seed."""
    block = bytes((seed * 7 + i * 13) & 0xFF for i in range(251))
    return (block * (length // 251 + 1))[:length]


class EchoHandle:
    def __init__(self, dev: "EchoDevice", caller: fileops.Caller):
        self.dev = dev
        self.caller = caller
        self.seen = dev.signals

    def ioctl(self, cmd: int, arg: bytearray, mem: fileops.UserMemory) -> int:
        d = self.dev
        nr = cmd & 0xFF
        if (cmd >> 8) & 0xFF != ord("E"):
            raise OSError(25, f"unknown ioctl {cmd:#x}")
        if nr == 1:
            arg[:] = bytes(arg).translate(INVERT)
        elif nr == 2:
            d.stored = bytes(arg)
        elif nr == 3:
            n = len(arg)
            arg[:] = (d.stored + bytes(n))[:n]
        elif nr == 4:
            ptr, length, _ = PTR_S.unpack(arg)
            mem.require(reads=[(ptr, length)], writes=[(ptr, length)])
            data = mem.read(ptr, length)
            mem.write(ptr, data.translate(INVERT))
            PTR_S.pack_into(arg, 0, ptr, length, zlib.crc32(data))
        elif nr == 5:
            if d.signals <= self.seen:
                raise fileops.WouldBlock()
            self.seen = d.signals
            struct.pack_into("<I", arg, 0, d.signals)
        elif nr == 6:
            d.signal()
        elif nr == 7:
            off, length, seed, _ = REGION_S.unpack(arg)
            d.memory.view(off, length)[:] = pattern(seed, length)
            d.memory.sync_to_client(off, length)
        elif nr == 8:
            off, length, _, _ = REGION_S.unpack(arg)
            if not d.memory.sync_from_client(off, length):
                raise fileops.WouldBlock()
            REGION_S.pack_into(arg, 0, off, length, zlib.crc32(d.memory.view(off, length)), 0)
        elif nr == 9:
            d.memory.resize(struct.unpack("<I", arg)[0])
        elif nr == 10:
            ptr, length, seed = PTR_OUT_S.unpack(arg)
            mem.require(writes=[(ptr, length)])
            mem.write(ptr, pattern(seed, length))
        elif nr == 12:
            off, length, seq, _ = REGION_S.unpack(arg)
            view = d.memory.view(off, length)
            view[:4] = view[length - 4:] = struct.pack("<I", seq)
            d.memory.sync_to_client(off, length)
        elif nr == 11:
            with d.lock:
                if d.queue:
                    d.queue.pop(0)
        else:
            raise OSError(25, f"unknown ioctl {cmd:#x}")
        d.ioctls += 1
        return 0

    def read(self, size: int, offset: int) -> bytes:
        d = self.dev
        with d.lock:
            if not d.queue:
                raise fileops.WouldBlock()
            data = d.queue.pop(0)
        return data[:size]

    def write(self, data, offset: int) -> int:
        self.dev.push(bytes(data))
        return len(data)

    def poll(self) -> int:
        return (fileops.POLLIN if self.dev.queue else 0) | fileops.POLLOUT

    def release(self) -> None:
        self.dev.released += 1


class EchoDevice:
    """Implements fileops.Device for the transport tests."""

    def __init__(self, name: str = "echo0", memory_size: int = 1 << 20, compat32: bool = False):
        self.name = name
        self.memory = MemfdMemory(name, memory_size) if memory_size else None
        self.compat32 = compat32
        self.stored = b""
        self.signals = 0
        self.queue: list[bytes] = []
        self.lock = threading.Lock()
        self.ioctls = 0
        self.released = 0
        self.wake = fileops.Wakers()

    def open(self, caller: fileops.Caller) -> EchoHandle:
        return EchoHandle(self, caller)

    def add_waker(self, wake) -> None:
        self.wake.add(wake)

    def remove_waker(self, wake) -> None:
        self.wake.remove(wake)

    def push(self, data: bytes) -> None:
        with self.lock:
            self.queue.append(data)
        self.wake()

    def signal(self) -> None:
        """Callable from any thread."""
        self.signals += 1
        self.push(b"signal %d\n" % self.signals)


# ----- client side (run as `python tests/support/fuse_echo_device.py <command> <path> ...`) --------------

def _client_roundtrip(path: str, sizes: list[int]) -> None:
    """ECHO the top-level struct for sizes the _IOC_SIZE field holds, PTR beyond; STORE/LOAD too."""
    import ctypes
    import fcntl
    import os
    fd = os.open(path, os.O_RDWR)
    for size in sizes:
        data = os.urandom(size)
        if size <= 16383:
            buf = bytearray(data)
            fcntl.ioctl(fd, ECHO(size), buf)
            assert bytes(buf) == data.translate(INVERT), f"ECHO {size}"
            fcntl.ioctl(fd, STORE(size), bytearray(data))
            out = bytearray(size)
            fcntl.ioctl(fd, LOAD(size), out)
            assert bytes(out) == data, f"STORE/LOAD {size}"
        arr = bytearray(data)
        cbuf = (ctypes.c_char * size).from_buffer(arr)
        st = bytearray(PTR_S.pack(ctypes.addressof(cbuf), size, 0))
        fcntl.ioctl(fd, PTR, st)
        assert bytes(arr) == data.translate(INVERT), f"PTR {size}"
        assert PTR_S.unpack(st)[2] == zlib.crc32(data), f"PTR crc {size}"
        dst = bytearray(size)
        cdst = (ctypes.c_char * size).from_buffer(dst)
        fcntl.ioctl(fd, PTR_OUT, PTR_OUT_S.pack(ctypes.addressof(cdst), size, size & 0xFF))
        assert bytes(dst) == pattern(size & 0xFF, size), f"PTR_OUT {size}"
        del cbuf, cdst
    print("OK", flush=True)


def _client_hammer(path: str, n: int) -> None:
    import fcntl
    import os
    fd = os.open(path, os.O_RDWR)
    buf = bytearray(64)
    for i in range(n):
        buf[0] = i & 0xFF
        fcntl.ioctl(fd, ECHO(64), buf)
        assert buf[0] == 255 - (i & 0xFF)
        buf[0] = i & 0xFF
    print("OK", n, flush=True)


def _client_wait(path: str) -> None:
    """Block in WAIT; on SIGUSR1 print how long after the signal the ioctl ended (EINTR)."""
    import fcntl
    import os
    import signal
    import time
    got = []

    class Interrupted(Exception):
        pass

    def on_signal(signum, frame):
        got.append(time.monotonic())
        raise Interrupted()

    signal.signal(signal.SIGUSR1, on_signal)
    fd = os.open(path, os.O_RDWR)
    print("WAITING", flush=True)
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, WAIT, buf)
        print("WOKE", struct.unpack("<I", buf)[0], flush=True)
    except Interrupted:
        print("EINTR", time.monotonic(), flush=True)
    except InterruptedError:
        print("EINTR", time.monotonic(), flush=True)
    except OSError as e:
        print("ERR", e.errno, flush=True)


def _client_poll(path: str, how: str) -> None:
    """Wait for POLLIN with select/poll/epoll; print the monotonic time it came."""
    import os
    import select
    import time
    fd = os.open(path, os.O_RDWR)
    print("POLLING", flush=True)
    if how == "select":
        r, _, _ = select.select([fd], [], [], 10)
        ok = fd in r
    elif how == "poll":
        p = select.poll()
        p.register(fd, select.POLLIN)
        ok = bool(p.poll(10000))
    else:
        ep = select.epoll()
        ep.register(fd, select.EPOLLIN)
        ok = bool(ep.poll(10))
    print("READY" if ok else "TIMEOUT", time.monotonic(), flush=True)


def _client_mmap(path: str, size: int, seed: int, offset: int) -> None:
    """FILL a region, check it through the mapping; write through the mapping, CHECK the crc."""
    import fcntl
    import mmap
    import os
    fd = os.open(path, os.O_RDWR)
    length = 640 * 480 * 2
    fcntl.ioctl(fd, FILL, REGION_S.pack(offset, length, seed, 0))
    mp = mmap.mmap(fd, size)
    assert mp[offset:offset + length] == pattern(seed, length), "mapping differs from the device memory"
    for rnd in range(3):
        data = pattern(seed + rnd + 1, length)
        mp[offset:offset + length] = data
        st = bytearray(REGION_S.pack(offset, length, 0, 0))
        fcntl.ioctl(fd, CHECK, st)
        assert REGION_S.unpack(st)[2] == zlib.crc32(data), "device did not see the client's writes"
        fcntl.ioctl(fd, FILL, REGION_S.pack(offset, length, seed + 10 + rnd, 0))
        assert mp[offset:offset + length] == pattern(seed + 10 + rnd, length), "stale mapping after FILL"
    print("OK", flush=True)


if __name__ == "__main__":
    import sys
    cmd, path, *rest = sys.argv[1:]
    if cmd == "roundtrip":
        _client_roundtrip(path, [int(x) for x in rest])
    elif cmd == "hammer":
        _client_hammer(path, int(rest[0]))
    elif cmd == "wait":
        _client_wait(path)
    elif cmd == "poll":
        _client_poll(path, rest[0])
    elif cmd == "mmap":
        _client_mmap(path, int(rest[0]), int(rest[1]), int(rest[2]))
    else:
        raise SystemExit(f"unknown command {cmd}")
