"""FUSE/CUSE kernel protocol: constants and wire structs (include/uapi/linux/fuse.h).

Only what impv4l2 speaks.  All structs are little-endian x86/ARM/MIPS-el
native layouts; every struct is precompiled once.
"""

from __future__ import annotations

import struct

from .. import ioc as _ioc
from ..ioc import NATIVE

KERNEL_MAJOR = 7
MIN_MINOR = 22          # Linux 3.10
MAX_MINOR = 45          # newest we know about; we answer min(kernel's, ours)

# Opcodes.
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 25, 26, 27, 28, 29
INTERRUPT, DESTROY, IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET = 36, 38, 39, 40, 41, 42
CUSE_INIT = 4096

OPCODE_NAMES = {
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 6: "SYMLINK", 8: "MKNOD",
    9: "MKDIR", 10: "UNLINK", 11: "RMDIR", 12: "RENAME", 13: "LINK", 14: "OPEN", 15: "READ",
    16: "WRITE", 17: "STATFS", 18: "RELEASE", 20: "FSYNC", 21: "SETXATTR", 22: "GETXATTR",
    23: "LISTXATTR", 24: "REMOVEXATTR", 25: "FLUSH", 26: "INIT", 27: "OPENDIR", 28: "READDIR",
    29: "RELEASEDIR", 30: "FSYNCDIR", 31: "GETLK", 32: "SETLK", 33: "SETLKW", 34: "ACCESS",
    35: "CREATE", 36: "INTERRUPT", 37: "BMAP", 38: "DESTROY", 39: "IOCTL", 40: "POLL",
    41: "NOTIFY_REPLY", 42: "BATCH_FORGET", 43: "FALLOCATE", 44: "READDIRPLUS", 45: "RENAME2",
    46: "LSEEK", 47: "COPY_FILE_RANGE", 48: "SETUPMAPPING", 49: "REMOVEMAPPING", 50: "SYNCFS",
    51: "TMPFILE", 52: "STATX", 4096: "CUSE_INIT",
}

# Notification codes (sent with unique=0, code in the `error` field).
NOTIFY_POLL, NOTIFY_INVAL_INODE, NOTIFY_INVAL_ENTRY = 1, 2, 3
NOTIFY_STORE, NOTIFY_RETRIEVE, NOTIFY_DELETE = 4, 5, 6

# INIT flags (flags | flags2 << 32).
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
HAS_IOCTL_DIR = 1 << 11
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37

# The protocol minor that brought each thing we use (include/uapi/linux/fuse.h changelog): an
# INIT flag is asked for, a notification sent, only when the negotiated minor has it, so a 3.10
# (7.22) or 4.4 (7.23) kernel never sees what it would not know.
FLAG_SINCE = {ASYNC_READ: 6, BIG_WRITES: 9, HAS_IOCTL_DIR: 18, MAX_PAGES: 28, INIT_EXT: 36,
              DIRECT_IO_ALLOW_MMAP: 39, PASSTHROUGH: 40}
NOTIFY_SINCE = {NOTIFY_POLL: 11, NOTIFY_INVAL_INODE: 12, NOTIFY_INVAL_ENTRY: 12, NOTIFY_STORE: 15,
                NOTIFY_RETRIEVE: 15, NOTIFY_DELETE: 18}


def flags_known(minor: int) -> int:
    """The INIT flags of FLAG_SINCE that protocol 7.<minor> defines."""
    return sum(flag for flag, since in FLAG_SINCE.items() if since <= minor)


# CUSE_INIT flags.
CUSE_UNRESTRICTED_IOCTL = 1 << 0

# OPEN reply flags.
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_PASSTHROUGH = 1 << 7

# READ/WRITE flags.
READ_LOCKOWNER = 1 << 1     # set for direct read(2); absent for page-cache fills
WRITE_CACHE = 1 << 0        # write-back from the page cache (a client's mapping)

# IOCTL flags.
IOCTL_COMPAT = 1 << 0
IOCTL_UNRESTRICTED = 1 << 1
IOCTL_RETRY = 1 << 2
IOCTL_32BIT = 1 << 3
NATIVE_32BIT = struct.calcsize("P") == 4  # this process's word size (a 32-bit kernel flags all ioctls 32BIT)
IOCTL_DIR = 1 << 4
IOCTL_COMPAT_X32 = 1 << 5
IOCTL_MAX_IOV = 256

POLL_SCHEDULE_NOTIFY = 1 << 0

# /dev/fuse ioctls: FUSE_DEV_IOC_BACKING_OPEN = _IOW(229, 1, struct fuse_backing_map),
# FUSE_DEV_IOC_BACKING_CLOSE = _IOW(229, 2, uint32_t).
DEV_IOC_BACKING_OPEN = NATIVE.IOW(229, 1, 16)
DEV_IOC_BACKING_CLOSE = NATIVE.IOW(229, 2, 4)

# A request's _IOC_DIR/_IOC_SIZE in the running machine's encoding (impv4l2.ioc):
# the kernel copies by the same bits.  Numbers are unsigned 32-bit.
IOC_WRITE, IOC_READ = _ioc.WRITE, _ioc.READ
ioc_dir = NATIVE.dir_flags
ioc_size = NATIVE.size


# Wire structs.
IN_HEADER = struct.Struct("<IIQQIIIHH")        # len opcode unique nodeid uid gid pid extlen pad (40)
OUT_HEADER = struct.Struct("<IiQ")              # len error unique (16)
INIT_IN = struct.Struct("<IIII")                # major minor max_readahead flags (+flags2 at 16)
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")   # 64 bytes (7.23+)
INIT_OUT_COMPAT22 = struct.Struct("<IIIIHHI")   # 24 bytes (7.22: FUSE_COMPAT_22_INIT_OUT_SIZE)
INIT_OUT_SINCE = ((23, INIT_OUT), (MIN_MINOR, INIT_OUT_COMPAT22))  # the reply a minor expects
CUSE_INIT_IN = struct.Struct("<IIII")
CUSE_INIT_OUT = struct.Struct("<IIIIIIII40x")    # 72 bytes
OPEN_IN = struct.Struct("<II")                  # flags open_flags
OPEN_OUT = struct.Struct("<QIi")                # fh open_flags backing_id
READ_IN = struct.Struct("<QQIIQII")             # fh offset size read_flags lock_owner flags pad
WRITE_IN = struct.Struct("<QQIIQII")            # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")             # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")
IOCTL_IN = struct.Struct("<QIIQII")             # fh flags cmd arg in_size out_size (32)
IOCTL_OUT = struct.Struct("<iIII")              # result flags in_iovs out_iovs
IOVEC = struct.Struct("<QQ")
POLL_IN = struct.Struct("<QQII")                # fh kh flags events
POLL_OUT = struct.Struct("<II")
NOTIFY_POLL_OUT = struct.Struct("<Q")
INTERRUPT_IN = struct.Struct("<Q")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
ATTR = struct.Struct("<QQQQQQIIIIIIIII4x")      # ino size blocks a/m/ctime nsecs mode nlink uid gid rdev blksize flags (88)
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")       # nodeid generation entry_valid attr_valid nsecs (40)
ATTR_OUT_HEAD = struct.Struct("<QII")           # attr_valid nsec dummy (16)
KSTATFS = struct.Struct("<QQQQQIIII24x")         # blocks bfree bavail files ffree bsize namelen frsize pad spare (80)
DIRENT_HEAD = struct.Struct("<QQII")            # ino off namelen type
NOTIFY_STORE_OUT = struct.Struct("<QQII")       # nodeid offset size pad
NOTIFY_RETRIEVE_OUT = struct.Struct("<QQQII")   # notify_unique nodeid offset size pad
NOTIFY_RETRIEVE_IN = struct.Struct("<QQIIQQ")   # dummy offset size dummy dummy dummy (40)
BACKING_MAP = struct.Struct("<iIQ")

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and INIT_OUT.size == 64


def init_out_for(minor: int) -> struct.Struct:
    """The fuse_init_out layout the kernel of protocol 7.<minor> reads (a 3.10 kernel refuses
    a reply longer than its 24-byte struct)."""
    return next(st for since, st in INIT_OUT_SINCE if minor >= since)


assert ATTR.size == 88 and CUSE_INIT_OUT.size == 72 and KSTATFS.size == 80
