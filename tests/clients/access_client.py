"""Client for tests/test_access.py: does the daemon reach the memory of the process that calls?

    python access_client.py ctrls|userptr NODE

The parent opens NODE; a forked child, sharing that open file, makes the calls with pointers
at a fixed address where the child and the parent hold different bytes (or only the parent
holds any).  The daemon must use the caller's memory (the child's), never the opener's
(the parent's).  Prints one JSON object of what each side saw.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import struct
import sys

from impv4l2.v4l2 import abi

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_RW, MAP_PRIV_ANON, MAP_FIXED_NOREPLACE = 3, 0x22, 0x100000
X = 0x5A5A0000            # the address both sides use
CID_BRIGHTNESS, USER_CLASS = 0x00980900, 0x00980000
CAP, USERPTR = 1, 2


def mapped(addr: int, size: int, fill: int) -> None:
    got = libc.mmap(addr, size, PROT_RW, MAP_PRIV_ANON | MAP_FIXED_NOREPLACE, -1, 0)
    if got != addr:
        raise OSError(ctypes.get_errno(), f"mmap at {addr:#x}")
    ctypes.memset(addr, fill, size)


def unmapped(addr: int, size: int) -> None:
    libc.munmap(addr, size)


def ioctl(fd: int, name: str, arg: bytearray) -> str:
    try:
        fcntl.ioctl(fd, abi.VIDIOC[name], arg)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def ext_ctrls(fd: int, name: str, addr: int) -> str:
    # struct v4l2_ext_controls (64-bit): which, count, error_idx, request_fd, reserved, controls
    return ioctl(fd, name, bytearray(struct.pack("=IIIiI4xQ", USER_CLASS, 1, 0, 0, 0, addr)))


def put_ctrl(addr: int, value: int) -> None:
    ctypes.memmove(addr, struct.pack("<IIIq", CID_BRIGHTNESS, 0, 0, value), 20)  # packed v4l2_ext_control


def g_ctrl(fd: int) -> int:
    arg = bytearray(struct.pack("=Ii", CID_BRIGHTNESS, 0))
    fcntl.ioctl(fd, abi.VIDIOC["G_CTRL"], arg)
    return struct.unpack("=Ii", arg)[1]


def in_child(fn) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - reported to the parent
            out = {"exception": repr(e)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.waitpid(pid, 0)
    return json.loads(data)


def ctrls(fd: int) -> dict:
    mapped(X, 4096, 0)
    put_ctrl(X, 11)                  # the opener's bytes: must never be used

    def child() -> dict:
        unmapped(X, 4096)
        mapped(X, 4096, 0)
        put_ctrl(X, 22)              # the caller's bytes
        own = ext_ctrls(fd, "S_EXT_CTRLS", X)
        after_own = g_ctrl(fd)
        unmapped(X, 4096)            # now only the opener has memory there
        return {"own": own, "after_own": after_own, "s_unmapped": ext_ctrls(fd, "S_EXT_CTRLS", X),
                "g_unmapped": ext_ctrls(fd, "G_EXT_CTRLS", X), "after_unmapped": g_ctrl(fd)}

    out = in_child(child)
    out["parent_bytes"] = ctypes.string_at(X, 20).hex()
    out["parent_expected"] = struct.pack("<IIIq", CID_BRIGHTNESS, 0, 0, 11).hex()
    return out


def userptr(fd: int) -> dict:
    f = bytearray(208)
    struct.pack_into("=I", f, 0, CAP)
    fcntl.ioctl(fd, abi.VIDIOC["G_FMT"], f)
    size = (struct.unpack_from("=I", f, 8 + 20)[0] + 4095) & ~4095  # fmt.pix.sizeimage
    req = bytearray(struct.pack("=IIIIB3x", 2, CAP, USERPTR, 0, 0))
    fcntl.ioctl(fd, abi.VIDIOC["REQBUFS"], req)
    mapped(X, 2 * size, 0xAA)        # the opener's decoy

    def buf(index: int, addr: int = 0) -> bytearray:
        b = bytearray(88)            # struct v4l2_buffer (64-bit)
        struct.pack_into("=II", b, 0, index, CAP)
        struct.pack_into("=I", b, 60, USERPTR)
        struct.pack_into("=QI", b, 64, addr, size)
        return b

    def child() -> dict:
        unmapped(X, 2 * size)
        out = {"qbuf_unmapped": ioctl(fd, "QBUF", buf(0, X))}  # only the opener has memory there
        mapped(X, 2 * size, 0)
        out["qbuf"] = [ioctl(fd, "QBUF", buf(i, X + i * size)) for i in range(2)]
        out["streamon"] = ioctl(fd, "STREAMON", bytearray(struct.pack("=i", CAP)))
        b = buf(0)
        out["dqbuf"] = ioctl(fd, "DQBUF", b)
        index, used = struct.unpack_from("=II", b, 0)[0], struct.unpack_from("=I", b, 8)[0]
        frame = ctypes.string_at(X + index * size, used)
        out["bytesused"], out["frame_nonzero"] = used, sum(1 for c in frame[:4096] if c)
        out["streamoff"] = ioctl(fd, "STREAMOFF", bytearray(struct.pack("=i", CAP)))
        return out

    out = in_child(child)
    decoy = ctypes.string_at(X, 2 * size)
    out["parent_untouched"] = decoy.count(0xAA) == len(decoy)
    return out


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDWR)
    print(json.dumps({"ctrls": ctrls, "userptr": userptr}[mode](fd)), flush=True)
    os.close(fd)


if __name__ == "__main__":
    main()
