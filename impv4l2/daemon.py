"""The driver process: a backend, its V4L2 nodes, and the transports serving them."""

from __future__ import annotations

import glob
import logging
import os
import signal
import threading
from typing import Any

from . import config as config_mod
from .fileops import Device

log = logging.getLogger("impv4l2.daemon")


def taken_video_numbers() -> set[int]:
    """/dev/videoN numbers in use by the kernel or another driver."""
    used = set()
    for path in glob.glob("/dev/video*") + glob.glob("/sys/class/video4linux/video*"):
        tail = os.path.basename(path)[5:]
        if tail.isdigit():
            used.add(int(tail))
    return used


def allocate_names(roles: list[str], nodes: config_mod.NodeConfig) -> dict[str, str]:
    """A videoN name per role: configured names, else free numbers from nodes.base."""
    used = taken_video_numbers()
    names: dict[str, str] = {}
    for role in roles:
        explicit = getattr(nodes, role, "")
        if explicit:
            names[role] = explicit
            if explicit[5:].isdigit():
                used.add(int(explicit[5:]))
    n = nodes.base
    for role in roles:
        if role in names:
            continue
        while n in used:
            n += 1
        names[role] = f"video{n}"
        used.add(n)
    return names


class Daemon:
    """Owns the backend, builds the nodes and serves them until stopped."""

    def __init__(self, cfg: config_mod.Config):
        self.cfg = cfg
        self.backend: Any = None
        self.nodes: dict[str, Device] = {}  # role -> device
        self.cuse: list[Any] = []
        self.mount: Any = None
        self.links: list[str] = []
        self._stop = threading.Event()

    # ------------------------------------------------------------ build
    def _build_nodes(self) -> None:
        from .driver.base import ChannelMode
        from .v4l2.capture import CaptureNode

        channels = {ch.role: ch for ch in self.backend.channels}
        roles = [r for r in ("main", "sub") if r in channels]
        try:
            from .v4l2.encoder import EncoderNode
        except ImportError:
            EncoderNode = None  # type: ignore[assignment]
        if EncoderNode is not None:
            roles.append("encoder")
        names = allocate_names(roles, self.cfg.nodes)
        for role in roles:
            if role == "encoder":
                self.nodes[role] = EncoderNode(names[role], self.backend, defaults=self.cfg.encoder)
                continue
            ch = channels[role]
            want: config_mod.ChannelConfig = getattr(self.cfg, role)
            try:
                ch.configure(ChannelMode(want.width, want.height, want.fps))
            except (ValueError, OSError) as e:
                log.warning("%s channel: cannot use %dx%d@%d (%s); keeping %s", role,
                            want.width, want.height, want.fps, e, ch.mode)
            self.nodes[role] = CaptureNode(names[role], self.backend, ch)

    def _serve(self) -> None:
        from . import fuse

        t = self.cfg.transport
        use_cuse = t.cuse == "on" or (t.cuse == "auto" and fuse.cuse_available())
        if t.cuse == "on" and not fuse.cuse_available():
            raise RuntimeError("transport.cuse = on but /dev/cuse is missing (modprobe cuse)")
        if use_cuse:
            for role, dev in self.nodes.items():
                srv = fuse.CuseServer(dev)
                srv.start()
                self.cuse.append(srv)
                log.info("%s: CUSE node /dev/%s (%s)", dev.name, srv.devname, role)
        if t.mount:
            self.mount = fuse.FuseMount(t.mount, mmap_mode=t.mmap_mode)
            self.mount.start()
            for role, dev in self.nodes.items():
                self.mount.add(dev)
                log.info("%s: FUSE file %s/%s (%s, mmap %s)", dev.name, t.mount, dev.name,
                         role, self.mount.mmap_mode)
            # ffmpeg finds M2M encoders only by scanning /dev for video*.
            if not use_cuse and t.dev_links and "encoder" in self.nodes:
                self._link(self.nodes["encoder"].name)

    def _link(self, name: str) -> None:
        link = f"/dev/{name}"
        target = os.path.join(self.cfg.transport.mount, name)
        try:
            if os.path.islink(link):
                os.unlink(link)  # ours from a crashed run
            os.symlink(target, link)
            self.links.append(link)
            log.info("%s: symlink %s -> %s", name, link, target)
        except OSError as e:
            log.warning("%s: cannot create %s: %s", name, link, e)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        from .driver import load_backend

        self.backend = load_backend(self.cfg.backend, **self.cfg.backend_options)
        try:
            self._build_nodes()
            self._serve()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for link in self.links:
            try:
                os.unlink(link)
            except OSError:
                pass
        self.links.clear()
        for srv in self.cuse:
            srv.stop()
        self.cuse.clear()
        if self.mount is not None:
            self.mount.stop()
            self.mount = None
        for dev in self.nodes.values():
            close = getattr(dev, "close", None)
            if close:
                close()
        self.nodes.clear()
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        log.info("serving %d nodes with backend %s", len(self.nodes), self.cfg.backend)
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            log.info("stopping")
            self.stop()
        return 0
