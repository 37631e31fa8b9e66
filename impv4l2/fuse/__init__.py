"""Transports: the FUSE/CUSE kernel protocol spoken directly on /dev/fuse and /dev/cuse.

* :class:`CuseServer` — one real character device /dev/<name> per Device
  (unrestricted ioctls through FUSE_IOCTL_RETRY; no mmap).
* :class:`FuseMount` — a FUSE mount with one regular file per Device
  (restricted ioctls, pointers followed with process_vm; mmap of Device.memory).

Both serve :class:`impv4l2.fileops.Device` objects and know nothing of V4L2.
"""

from .cuse import CuseServer, cuse_available
from .mount import MODES, FuseMount, cleanup_stale, stale_mounts

__all__ = ["CuseServer", "FuseMount", "MODES", "cleanup_stale", "cuse_available", "stale_mounts"]
