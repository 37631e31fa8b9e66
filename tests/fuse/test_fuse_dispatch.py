"""The request dispatcher fed raw bytes, with a pipe standing in for /dev/fuse: malformed
requests get an error reply and a log line, and the server keeps serving."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from impv4l2.fuse import FuseMount
from impv4l2.fuse import proto as P

from support.fuse_echo_device import ECHO, WAIT, EchoDevice  # noqa: E402


@pytest.fixture
def server():
    m = FuseMount("/nonexistent-impv4l2-test")
    r, w = os.pipe()
    m._fd = w
    m.add(EchoDevice("echo0", memory_size=0))
    yield m, r
    os.close(r)
    os.close(w)


def send(m: FuseMount, opcode: int, payload: bytes, unique: int = 7, nodeid: int = 2, length: int | None = None):
    req = P.IN_HEADER.pack(length if length is not None else 40 + len(payload), opcode, unique, nodeid,
                           0, 0, 4242, 0, 0) + payload
    m._dispatch(memoryview(req), len(req))


def reply(r: int) -> tuple[int, int, bytes]:
    data = os.read(r, 1 << 20)
    length, err, unique = P.OUT_HEADER.unpack_from(data)
    assert length == len(data)
    return err, unique, data[16:]


def open_fh(m, r) -> int:
    send(m, P.OPEN, P.OPEN_IN.pack(os.O_RDWR, 0))
    err, _, body = reply(r)
    assert err == 0
    return P.OPEN_OUT.unpack(body)[0]


def test_unknown_opcode_is_enosys_and_logged(server, caplog):
    m, r = server
    with caplog.at_level(logging.INFO, "impv4l2.fuse"):
        send(m, 999, b"", unique=11)
    assert reply(r)[:2] == (-errno.ENOSYS, 11)
    assert "999" in caplog.text and "4242" in caplog.text


def test_short_payloads_are_einval(server, caplog):
    m, r = server
    with caplog.at_level(logging.WARNING, "impv4l2.fuse"):
        for opcode in (P.OPEN, P.READ, P.WRITE, P.IOCTL, P.POLL, P.RELEASE):
            send(m, opcode, b"\x01\x02", unique=opcode)
            assert reply(r)[:2] == (-errno.EINVAL, opcode)
    assert caplog.text.count("malformed") == 6


def test_length_mismatch_and_oversize_ioctl(server, caplog):
    m, r = server
    fh = open_fh(m, r)
    with caplog.at_level(logging.WARNING, "impv4l2.fuse"):
        send(m, P.GETATTR, b"\0" * 16, unique=3, length=999)
        assert reply(r)[:2] == (-errno.EINVAL, 3)
        # in_size claims more than the request carries
        send(m, P.IOCTL, P.IOCTL_IN.pack(fh, 0, ECHO(8), 0, 4096, 8) + b"x" * 8, unique=4)
        assert reply(r)[:2] == (-errno.EINVAL, 4)
        # in_size disagrees with _IOC_SIZE of a restricted ioctl
        send(m, P.IOCTL, P.IOCTL_IN.pack(fh, 0, ECHO(8), 0, 4, 8) + b"x" * 4, unique=5)
        assert reply(r)[:2] == (-errno.EINVAL, 5)
    assert caplog.text.count("malformed") == 2
    # ...and it still serves.
    send(m, P.IOCTL, P.IOCTL_IN.pack(fh, 0, ECHO(4), 0, 4, 4) + b"\0\1\2\3", unique=6)
    err, unique, body = reply(r)
    assert (err, unique) == (0, 6)
    assert body[16:] == bytes([255, 254, 253, 252])


@pytest.mark.parametrize("native_32bit", [False, True], ids=["64-bit daemon", "32-bit daemon"])
def test_32bit_caller_refused_without_compat32(server, caplog, monkeypatch, native_32bit):
    """A caller whose word size is not the daemon's is refused (its structs differ); one whose
    word size is ours is served, whatever the flags say about the kernel: a 64-bit kernel flags
    its compat callers COMPAT|32BIT, a 32-bit kernel (the T31's) flags every ioctl 32BIT."""
    monkeypatch.setattr(P, "NATIVE_32BIT", native_32bit)
    m, r = server
    fh = open_fh(m, r)
    ours, foreign = (P.IOCTL_32BIT, 0) if native_32bit else (0, P.IOCTL_COMPAT | P.IOCTL_32BIT)
    with caplog.at_level(logging.WARNING, "impv4l2.fuse"):
        send(m, P.IOCTL, P.IOCTL_IN.pack(fh, foreign, ECHO(4), 0, 4, 4) + b"abcd", unique=9)
    assert reply(r)[:2] == (-errno.ENOTTY, 9)
    assert ("64-bit" if native_32bit else "32-bit") in caplog.text
    send(m, P.IOCTL, P.IOCTL_IN.pack(fh, ours, ECHO(4), 0, 4, 4) + b"\0\1\2\3", unique=10)
    assert reply(r)[:2] == (0, 10)


def test_interrupt_ends_parked_request(server):
    m, r = server
    fh = open_fh(m, r)
    send(m, P.IOCTL, P.IOCTL_IN.pack(fh, 0, WAIT, 0, 0, 4), unique=20)
    assert 20 in m._parked            # parked, nothing answered yet
    send(m, P.INTERRUPT, P.INTERRUPT_IN.pack(20), unique=21)
    assert reply(r)[:2] == (-errno.EINTR, 20)
    send(m, P.INTERRUPT, P.INTERRUPT_IN.pack(20), unique=22)   # unknown target: silently ignored
    send(m, P.FLUSH, P.FLUSH_IN.pack(fh, 0, 0, 0), unique=23)
    assert reply(r)[:2] == (0, 23)    # the INTERRUPTs themselves were never answered


def test_unrestricted_ioctl_retry_layout(server):
    """The CUSE path: first call without data -> RETRY for the top-level struct, then a pointer."""
    from support.fuse_echo_device import PTR, PTR_S, INVERT
    m, r = server
    fh = open_fh(m, r)
    U = P.IOCTL_UNRESTRICTED
    arg, ptr, n = 0x1000, 0x7000, 32
    send(m, P.IOCTL, P.IOCTL_IN.pack(fh, U, PTR, arg, 0, 0), unique=30)
    err, _, body = reply(r)
    res, flags, in_iovs, out_iovs = P.IOCTL_OUT.unpack_from(body)
    assert (err, flags, in_iovs, out_iovs) == (0, P.IOCTL_RETRY, 1, 1)
    assert [P.IOVEC.unpack_from(body, 16 + 16 * i) for i in range(2)] == [(arg, 16), (arg, 16)]
    top = PTR_S.pack(ptr, n, 0)
    send(m, P.IOCTL, P.IOCTL_IN.pack(fh, U, PTR, arg, 16, 16) + top, unique=31)
    err, _, body = reply(r)
    res, flags, in_iovs, out_iovs = P.IOCTL_OUT.unpack_from(body)
    assert (flags, in_iovs, out_iovs) == (P.IOCTL_RETRY, 2, 2)
    iovs = [P.IOVEC.unpack_from(body, 16 + 16 * i) for i in range(4)]
    assert iovs == [(arg, 16), (ptr, n), (arg, 16), (ptr, n)]   # in-iovecs first
    data = bytes(range(n))
    send(m, P.IOCTL, P.IOCTL_IN.pack(fh, U, PTR, arg, 16 + n, 16 + n) + top + data, unique=32)
    err, _, body = reply(r)
    assert err == 0 and P.IOCTL_OUT.unpack_from(body)[1] == 0
    out = body[16:]
    assert len(out) == 16 + n and out[16:] == data.translate(INVERT)
