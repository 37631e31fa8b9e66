"""A V4L2 ioctl fuzzer in its own process, for any door (FUSE file or CUSE node).

    python tests/clients/fuzz.py PATH CALLS SEED [DAEMON_PID]

Random and malformed ioctls on one open (O_NONBLOCK) file: known V4L2 numbers with random
payloads (plausible type/index fields half the time), known numbers with a wrong size or
direction, random numbers, and the structs with pointers inside (EXT_CTRLS, multi-planar
buffers, USERPTR) pointing at NULL, unmapped memory, the daemon's own address range or a
scratch buffer, with huge counts.  Prints one JSON line: calls, successes, the errno
histogram per ioctl, and every (ioctl, errno) outside what the V4L2 spec names for it.
Pointers never point at this process's live objects beyond the scratch buffer, so the
fuzzer itself cannot be corrupted by a driver that writes where it is told.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import json
import os
import random
import sys

from linuxpy.video import raw

from impv4l2.ioc import NATIVE, READ, WRITE
from impv4l2.v4l2 import abi

# gen-errors.rst: what any V4L2 ioctl may return.  EIO is left out on purpose: the daemon
# answers EIO for an exception in a handler, which is the bug a fuzzer looks for.
GENERIC = {errno.EINVAL, errno.ENOTTY, errno.EBUSY, errno.EFAULT, errno.EAGAIN, errno.ENOMEM,
           errno.ENOSPC, errno.EPERM, errno.EACCES, errno.ENODEV, errno.EINTR, errno.ENXIO}
# ...and what single ioctls add (their own pages of the spec)
EXTRA = {name: {errno.ERANGE} for name in ("S_CTRL", "G_CTRL", "S_EXT_CTRLS", "G_EXT_CTRLS", "TRY_EXT_CTRLS")}
EXTRA["DQBUF"] = {errno.EPIPE}
EXTRA["DQEVENT"] = {errno.ENOENT}  # no event pending: what the kernel's v4l2_event_dequeue answers
EXTRA["G_EXT_CTRLS"] |= {errno.ENOSPC}

SCRATCH_SIZE = 1 << 20
UNMAPPED = (0x10, 0x1000, 0xDEAD0000, 0x7FFF00000000 if ctypes.sizeof(ctypes.c_void_p) == 8 else 0xFFFF0000)
POINTER_STRUCTS = {  # ioctl -> (offset of the pointer, offset of the count, element size)
    "G_EXT_CTRLS": (raw.v4l2_ext_controls.controls.offset, 4, ctypes.sizeof(raw.v4l2_ext_control)),
    "S_EXT_CTRLS": (raw.v4l2_ext_controls.controls.offset, 4, ctypes.sizeof(raw.v4l2_ext_control)),
    "TRY_EXT_CTRLS": (raw.v4l2_ext_controls.controls.offset, 4, ctypes.sizeof(raw.v4l2_ext_control)),
    "QBUF": (raw.v4l2_buffer.m.offset, raw.v4l2_buffer.length.offset, ctypes.sizeof(raw.v4l2_plane)),
    "DQBUF": (raw.v4l2_buffer.m.offset, raw.v4l2_buffer.length.offset, ctypes.sizeof(raw.v4l2_plane)),
    "QUERYBUF": (raw.v4l2_buffer.m.offset, raw.v4l2_buffer.length.offset, ctypes.sizeof(raw.v4l2_plane)),
    "PREPARE_BUF": (raw.v4l2_buffer.m.offset, raw.v4l2_buffer.length.offset, ctypes.sizeof(raw.v4l2_plane)),
}
BUF_TYPES = [int(t) for t in raw.BufType]
MEMORY = [int(m) for m in raw.Memory]


def daemon_range(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return [int(line.split("-", 1)[0], 16) for line in f][:64]
    except OSError:
        return []


class Fuzzer:
    def __init__(self, fd: int, seed: int, daemon_pid: int = 0) -> None:
        self.fd = fd
        self.rng = random.Random(seed)
        self.scratch = ctypes.create_string_buffer(SCRATCH_SIZE)
        self.pointers = [0, *UNMAPPED, *daemon_range(daemon_pid)]
        self.names = sorted(abi.VIDIOC)
        self.hist: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.bad: collections.Counter = collections.Counter()
        self.ok = 0

    def payload(self, size: int) -> bytearray:
        buf = bytearray(self.rng.randbytes(size))
        for off in (0, 4, 8):  # type/index/count-like fields: plausible values half the time
            if size >= off + 4 and self.rng.random() < 0.5:
                v = self.rng.choice(BUF_TYPES + MEMORY + [0, 1, 2, 3, 31, 32, 0x7FFFFFFF, 0xFFFFFFFF])
                buf[off:off + 4] = v.to_bytes(4, "little")
        return buf

    def pointer(self, count: int, elem: int) -> int:
        if self.rng.random() < 0.3 and count * elem <= SCRATCH_SIZE:
            return ctypes.addressof(self.scratch) + self.rng.randrange(0, SCRATCH_SIZE - count * elem + 1)
        return self.rng.choice(self.pointers)

    def one(self) -> None:
        r = self.rng.random()
        name = self.rng.choice(self.names)
        cmd = abi.VIDIOC[name]
        size = NATIVE.size(cmd)
        if r < 0.45:                                   # known number, random struct
            arg = self.payload(size)
        elif r < 0.7:                                  # pointers inside structs
            name = self.rng.choice(sorted(POINTER_STRUCTS))
            cmd = abi.VIDIOC[name]
            arg = self.payload(NATIVE.size(cmd))
            p_off, n_off, elem = POINTER_STRUCTS[name]
            count = self.rng.choice([0, 1, 2, 8, 9, 64, 1000, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF])
            if name.endswith("BUF"):
                arg[4:8] = self.rng.choice(BUF_TYPES).to_bytes(4, "little")
                arg[60:64] = self.rng.choice(MEMORY).to_bytes(4, "little")
            arg[n_off:n_off + 4] = count.to_bytes(4, "little")
            ptr = self.pointer(count, elem)
            arg[p_off:p_off + ctypes.sizeof(ctypes.c_void_p)] = ptr.to_bytes(ctypes.sizeof(ctypes.c_void_p), "little")
        elif r < 0.9:                                  # known number, wrong size or direction
            flags = self.rng.choice([0, READ, WRITE, READ | WRITE])
            size = self.rng.choice([0, 1, 3, size - 4 if size > 4 else 5, size + 4, 1024, 4096])
            cmd = NATIVE.ioc(NATIVE.flags_to_dir(flags), cmd >> 8 & 0xFF, cmd & 0xFF, size)
            name = f"{name}/size{size}"
            arg = self.payload(size)
        else:                                          # anything at all ('V' or another type)
            typ = self.rng.choice([ord("V"), ord("V"), ord("E"), 0, 0xFF])
            size = self.rng.choice([0, 4, 16, 100, 2048])
            cmd = NATIVE.ioc(NATIVE.flags_to_dir(self.rng.choice([0, READ, WRITE, READ | WRITE])), typ,
                             self.rng.randrange(256), size)
            if cmd in abi.IOCTL_NAMES:
                return
            name = "random"
            arg = self.payload(size)
        self.call(name, cmd, arg)

    def call(self, name: str, cmd: int, arg: bytearray) -> None:
        base = name.split("/", 1)[0]
        try:
            if len(arg):
                fcntl.ioctl(self.fd, cmd, arg)
            else:
                fcntl.ioctl(self.fd, cmd, 0)
            self.hist[base]["OK"] += 1
            self.ok += 1
        except OSError as e:
            code = errno.errorcode.get(e.errno, str(e.errno))
            self.hist[base][code] += 1
            allowed = GENERIC | EXTRA.get(base, set())
            if "/" in name or base == "random":
                allowed = {errno.ENOTTY, errno.EINVAL, errno.EFAULT}  # not a V4L2 ioctl at all
            if e.errno not in allowed:
                self.bad[f"{name} {code}"] += 1


def main() -> None:
    path, calls, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pid = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    fz = Fuzzer(fd, seed, pid)
    n = 0
    while n < calls:
        fz.one()
        n += 1
        if n % 5000 == 0:  # a fresh file now and then: state reset, release paths exercised
            os.close(fd)
            fd = fz.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    os.close(fd)
    errnos = collections.Counter()
    for c in fz.hist.values():
        errnos.update(c)
    print(json.dumps({"calls": calls, "ok": fz.ok, "errnos": dict(errnos.most_common()),
                      "by_ioctl": {k: dict(v) for k, v in sorted(fz.hist.items())}, "bad": dict(fz.bad)}))


if __name__ == "__main__":
    main()
