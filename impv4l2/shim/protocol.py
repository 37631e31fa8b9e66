"""Wire formats shared with ``impv4l2_preload.c`` (keep the two in sync).

* ``VIDIOC_IMPV4L2_SHIM_INFO``: a driver-private ioctl only impv4l2 nodes
  answer; it tells the shim that an fd is ours and where to fetch its memory.
* ``VIDIOC_IMPV4L2_SHIM_MMAP``: asked on every mmap of a known node; the
  driver says whether vb2 would allow that mmap on this file (offset and
  length of an MMAP buffer currently allocated on the file's queues) and
  repeats the SHIM_INFO answer, so one ioctl per mmap is all it costs.
* The handover socket (SOCK_SEQPACKET): the shim sends a :data:`REQUEST`, the
  daemon answers a :data:`REPLY`, with the node's memfd as SCM_RIGHTS when
  ``error`` is 0.
"""

from __future__ import annotations

import struct

from ..ioc import NATIVE

MAGIC = b"impv4l2\0"
VERSION = 2  # 2: VIDIOC_IMPV4L2_SHIM_MMAP (a v1 shim would map freed/USERPTR offsets)
FLAG_READONLY = 1  # reply flag: the memfd was sent read-only

# struct impv4l2_shim_info: magic[8] version flags memory_size memory_id
# daemon_pid reserved0 node[32] socket[108] reserved[12] — 192 bytes, the same
# for 32- and 64-bit callers (explicit padding).
INFO = struct.Struct("<8sIIQQII32s108s12x")
assert INFO.size == 192

BASE_VIDIOC_PRIVATE = 192

# _IOR('V', BASE_VIDIOC_PRIVATE + 40, struct impv4l2_shim_info), in the running machine's encoding
VIDIOC_IMPV4L2_SHIM_INFO = NATIVE.IOR("V", BASE_VIDIOC_PRIVATE + 40, INFO.size)

# struct impv4l2_shim_mmap: offset length (in) prot (in: PROT_*) error (out: 0
# or the errno vb2_mmap gives) info (out: struct impv4l2_shim_info) — 216 bytes.
MMAP_REQ = struct.Struct("<QQIi")
MMAP_SIZE = MMAP_REQ.size + INFO.size
assert MMAP_SIZE == 216
# _IOWR('V', BASE_VIDIOC_PRIVATE + 41, struct impv4l2_shim_mmap)
VIDIOC_IMPV4L2_SHIM_MMAP = NATIVE.IOWR("V", BASE_VIDIOC_PRIVATE + 41, MMAP_SIZE)

REQUEST = struct.Struct("<8sII32s")  # magic version reserved node[32]
REPLY = struct.Struct("<iIQQ")  # error flags memory_size memory_id

NODE_MAX = 31
SOCKET_MAX = 107


def pack_info(node: str, socket_name: str, memory_size: int, memory_id: int, daemon_pid: int) -> bytes:
    return INFO.pack(MAGIC, VERSION, 0, memory_size, memory_id, daemon_pid, 0,
                     node.encode()[:NODE_MAX], socket_name.encode()[:SOCKET_MAX])


def unpack_info(data: bytes | bytearray) -> dict:
    magic, version, flags, size, mem_id, pid, _r, node, sock = INFO.unpack(bytes(data[:INFO.size]))
    return {"magic": magic, "version": version, "flags": flags, "memory_size": size,
            "memory_id": mem_id, "daemon_pid": pid, "node": node.rstrip(b"\0").decode(),
            "socket": sock.rstrip(b"\0").decode()}


def socket_address(name: str) -> str | bytes:
    """The bind/connect address of a socket name ('@x' is abstract)."""
    return b"\0" + name[1:].encode() if name.startswith("@") else name
