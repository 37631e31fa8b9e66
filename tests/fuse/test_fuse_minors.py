"""INIT and CUSE_INIT against each FUSE protocol minor a T31 or a desktop kernel speaks.

The kernels' INIT requests are rebuilt from what each kernel's fuse_send_init() offers
(fs/fuse/inode.c of that release); the replies are checked against that kernel's own
fuse_init_out (a 3.10 kernel fails a reply longer than its 24-byte struct) and against the
protocol changelog (proto.FLAG_SINCE): no flag the kernel did not offer or its minor lacks, no
notification newer than the minor, the mmap mode that kernel can do.
"""

from __future__ import annotations

import errno
import os

import pytest

from impv4l2.fuse import CuseServer, FuseMount
from impv4l2.fuse import proto as P

from support.fuse_echo_device import EchoDevice  # noqa: E402

# fuse_init_in flag bits a kernel offers that impv4l2 never asks for (values from fuse.h).
POSIX_LOCKS, ATOMIC_O_TRUNC, EXPORT_SUPPORT, DONT_MASK = 1 << 1, 1 << 3, 1 << 4, 1 << 6
SPLICE = (1 << 7) | (1 << 8) | (1 << 9)
FLOCK_LOCKS, AUTO_INVAL_DATA, READDIRPLUS = 1 << 10, 1 << 12, (1 << 13) | (1 << 14)
ASYNC_DIO, WRITEBACK_CACHE, NO_OPEN_SUPPORT = 1 << 15, 1 << 16, 1 << 17
PARALLEL_DIROPS, HANDLE_KILLPRIV, POSIX_ACL, ABORT_ERROR = 1 << 18, 1 << 19, 1 << 20, 1 << 21
CACHE_SYMLINKS, NO_OPENDIR, EXPLICIT_INVAL, MAP_ALIGNMENT = 1 << 23, 1 << 24, 1 << 25, 1 << 26
SUBMOUNTS, KILLPRIV_V2, SETXATTR_EXT = 1 << 27, 1 << 28, 1 << 29
SECURITY_CTX, HAS_INODE_DAX, CREATE_SUPP_GROUP = 1 << 32, 1 << 33, 1 << 34

K310 = (P.ASYNC_READ | POSIX_LOCKS | ATOMIC_O_TRUNC | EXPORT_SUPPORT | P.BIG_WRITES | DONT_MASK | SPLICE
        | FLOCK_LOCKS | P.HAS_IOCTL_DIR | AUTO_INVAL_DATA | READDIRPLUS | ASYNC_DIO)
K44 = K310 | WRITEBACK_CACHE | NO_OPEN_SUPPORT
K61 = (K44 | PARALLEL_DIROPS | HANDLE_KILLPRIV | POSIX_ACL | ABORT_ERROR | P.MAX_PAGES | CACHE_SYMLINKS
       | NO_OPENDIR | EXPLICIT_INVAL | MAP_ALIGNMENT | SUBMOUNTS | KILLPRIV_V2 | SETXATTR_EXT | P.INIT_EXT
       | SECURITY_CTX | HAS_INODE_DAX | CREATE_SUPP_GROUP)
K618 = K61 | P.DIRECT_IO_ALLOW_MMAP | P.PASSTHROUGH

# kernel: (protocol minor, flags its INIT offers, the mmap mode `auto` must end in)
KERNELS = {
    "3.10": (22, K310, "cached"),     # T31 (Ingenic 3.10.14)
    "4.4": (23, K44, "cached"),       # T31 (Ingenic 4.4.94)
    "6.1": (36, K61, "cached"),       # Debian bookworm (the x86 and mipsel VMs)
    "6.18": (45, K618, "direct"),     # passthrough offered; a pipe for /dev/fuse refuses BACKING_OPEN
}


def init_request(minor: int, offered: int) -> bytes:
    """The INIT payload that kernel sends: fuse_init_in was 16 bytes before 7.36 (flags2)."""
    body = P.INIT_IN.pack(P.KERNEL_MAJOR, minor, 128 * 1024, offered & 0xFFFFFFFF)
    if minor >= 36:
        body += (offered >> 32).to_bytes(4, "little") + bytes(44)
    return body


def request(server, opcode: int, payload: bytes, unique: int = 1) -> None:
    req = P.IN_HEADER.pack(40 + len(payload), opcode, unique, 0, 0, 0, 1, 0, 0) + payload
    server._dispatch(memoryview(req), len(req))


def answer(r: int) -> tuple[int, bytes]:
    data = os.read(r, 1 << 16)
    length, err, _ = P.OUT_HEADER.unpack_from(data)
    assert length == len(data)
    return err, data[16:]


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def mount_on(w: int, mode: str = "auto") -> FuseMount:
    m = FuseMount("/nonexistent-impv4l2-test", mmap_mode=mode)
    m._fd = w
    m.add(EchoDevice("echo0", memory_size=0))
    return m


@pytest.mark.parametrize("kernel", KERNELS)
def test_fuse_init_speaks_each_kernels_minor(kernel, pipe):
    minor, offered, mode = KERNELS[kernel]
    r, w = pipe
    m = mount_on(w)
    request(m, P.INIT, init_request(minor, offered))
    err, body = answer(r)
    assert err == 0 and m._init_error is None
    layout = P.INIT_OUT if minor >= 23 else P.INIT_OUT_COMPAT22
    assert len(body) == layout.size == (64 if minor >= 23 else 24)
    major, got_minor, _, flags = P.INIT_IN.unpack_from(body)
    assert (major, got_minor) == (7, min(minor, P.MAX_MINOR))
    if minor >= 23:
        fields = P.INIT_OUT.unpack(body)
        flags |= fields[10] << 32                      # flags2
        assert fields[8] == m._max_write // 4096          # max_pages
    assert flags & ~offered == 0, f"asked for flags {flags & ~offered:#x} the kernel did not offer"
    assert flags & ~P.flags_known(minor) == 0
    assert flags & P.BIG_WRITES and flags & P.HAS_IOCTL_DIR
    assert m._max_write == (256 if offered & P.MAX_PAGES else 32) * 4096
    assert m.mmap_mode == mode


@pytest.mark.parametrize("kernel", ["3.10", "4.4", "6.1"])
def test_a_mode_the_kernel_lacks_is_refused_with_its_minor(kernel, pipe):
    minor, offered, _ = KERNELS[kernel]
    r, w = pipe
    m = mount_on(w, "direct")
    request(m, P.INIT, init_request(minor, offered))
    assert answer(r)[0] == -errno.EPROTO
    assert m._init_error == f"mmap mode direct not offered by this kernel (FUSE 7.{minor})"


@pytest.mark.parametrize("minor", [7, 21])
def test_kernels_older_than_3_10_are_refused(minor, pipe):
    r, w = pipe
    m = mount_on(w)
    request(m, P.INIT, init_request(minor, K310))
    assert answer(r)[0] == -errno.EPROTO and "older than 7.22" in m._init_error


@pytest.mark.parametrize("kernel", KERNELS)
def test_cuse_init_speaks_each_kernels_minor(kernel, pipe):
    minor, _, _ = KERNELS[kernel]
    r, w = pipe
    c = CuseServer(EchoDevice("echo0", memory_size=0))
    c._fd = w
    request(c, P.CUSE_INIT, P.CUSE_INIT_IN.pack(P.KERNEL_MAJOR, minor, 0, P.CUSE_UNRESTRICTED_IOCTL))
    err, body = answer(r)
    assert err == 0 and c._init_done.is_set() and c._init_error is None
    fields = P.CUSE_INIT_OUT.unpack_from(body)
    assert fields[:2] == (7, min(minor, P.MAX_MINOR)) and fields[3] == P.CUSE_UNRESTRICTED_IOCTL
    assert body[P.CUSE_INIT_OUT.size:] == b"DEVNAME=echo0\0"


def test_notifications_newer_than_the_minor_are_not_sent(pipe, caplog):
    r, w = pipe
    m = mount_on(w)
    request(m, P.INIT, init_request(22, K310))
    answer(r)
    P.NOTIFY_SINCE[99] = 23                               # a notification from 7.23 on
    try:
        assert m._notify(99, [b"x" * 8]) == errno.ENOSYS
        assert m._notify(P.NOTIFY_POLL, [P.NOTIFY_POLL_OUT.pack(5)]) == 0
    finally:
        del P.NOTIFY_SINCE[99]
    assert answer(r) == (P.NOTIFY_POLL, P.NOTIFY_POLL_OUT.pack(5))
    assert "notification 99 not in FUSE 7.22" in caplog.text


def test_protocol_tables_agree_with_the_structs():
    assert P.init_out_for(22) is P.INIT_OUT_COMPAT22 and P.init_out_for(23) is P.INIT_OUT
    assert P.flags_known(22) == P.ASYNC_READ | P.BIG_WRITES | P.HAS_IOCTL_DIR
    assert P.flags_known(39) & P.DIRECT_IO_ALLOW_MMAP and not P.flags_known(39) & P.PASSTHROUGH
