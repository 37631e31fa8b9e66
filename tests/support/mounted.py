"""Device-model nodes served in-process on a FUSE mount of their own (the kernel's FUSE door
without the daemon): what the end-to-end tests of one area need."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Sequence

from impv4l2.driver.base import Backend
from impv4l2.v4l2.capture import CaptureNode


def capture_nodes(backend: Backend, base: int = 10) -> list[CaptureNode]:
    """One capture node per frame channel, named video<base + channel index>."""
    return [CaptureNode(f"video{base + ch.index}", backend, ch) for ch in backend.channels]


@contextlib.contextmanager
def served_on_mount(nodes: Sequence, prefix: str) -> Iterator[list[str]]:
    """Serve ``nodes`` on a fresh FUSE mount: their file paths, in order.  At exit the mount
    goes and the nodes are closed (the backend stays the caller's)."""
    from impv4l2.fuse.mount import FuseMount

    d = tempfile.mkdtemp(prefix=prefix)
    mount = FuseMount(os.path.join(d, "mnt"))
    mount.start()
    try:
        yield [mount.add(n) for n in nodes]
    finally:
        mount.stop()
        for n in nodes:
            n.close()
        os.rmdir(os.path.join(d, "mnt"))
        os.rmdir(d)
