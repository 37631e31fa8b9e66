"""System calls Python lacks: mount(2), umount2(2), process_vm_readv/writev(2)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
for _fn in (_libc.process_vm_readv, _libc.process_vm_writev):
    _fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                    ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
    _fn.restype = ctypes.c_ssize_t


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()), f"mount {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def _vm_transfer(call, name: str, pid: int, addr: int, cbuf, length: int) -> None:
    """Run process_vm_readv/writev (``call``) until ``length`` bytes of ``cbuf`` moved."""
    done = 0
    while done < length:
        local = _IoVec(ctypes.addressof(cbuf) + done, length - done)
        remote = _IoVec(addr + done, length - done)
        n = call(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if n <= 0:
            err = ctypes.get_errno() if n < 0 else 14
            raise OSError(err or 14, f"{name} pid {pid} at {addr:#x}+{length}")
        done += n


def vm_read(pid: int, addr: int, length: int) -> bytearray:
    """Read ``length`` bytes at ``addr`` of process ``pid`` (EFAULT if unmapped)."""
    buf = bytearray(length)
    if length:
        cbuf = (ctypes.c_char * length).from_buffer(buf)
        _vm_transfer(_libc.process_vm_readv, "process_vm_readv", pid, addr, cbuf, length)
        del cbuf
    return buf


def vm_write(pid: int, addr: int, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` at ``addr`` of process ``pid`` (EFAULT if unmapped)."""
    length = len(data)
    if not length:
        return
    view = memoryview(data).cast("B")
    # Writable sources (buffer memory views) are sent in place: USERPTR frames
    # cost one copy, the kernel's, not a staging copy more.
    src = view if not view.readonly else bytearray(view)
    cbuf = (ctypes.c_char * length).from_buffer(src)
    _vm_transfer(_libc.process_vm_writev, "process_vm_writev", pid, addr, cbuf, length)
    del cbuf


_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def ioctl_int(fd: int, request: int, arg: bytes | bytearray) -> int:
    """ioctl(2) returning its integer result (fcntl.ioctl returns the buffer instead)."""
    buf = ctypes.create_string_buffer(bytes(arg), len(arg))
    return _check(_libc.ioctl(fd, request, ctypes.cast(buf, ctypes.c_void_p)), f"ioctl {request:#x}")
