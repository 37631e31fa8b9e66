"""The driver process: a backend, its V4L2 nodes, and the transports serving them."""

from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import logging
import os
import queue
import signal
import threading
from typing import TYPE_CHECKING, Any, Callable

from . import config as config_mod
from .fileops import Device

if TYPE_CHECKING:
    from .hotplug import HotplugMonitor
    from .v4l2.budget import BufferBudget

log = logging.getLogger("impv4l2.daemon")


DEV = "/dev"  # where desktop apps look for video4linux nodes


def taken_video_numbers() -> set[int]:
    """/dev/videoN numbers in use by the kernel or another driver."""
    used = set()
    for path in glob.glob(os.path.join(DEV, "video*")) + glob.glob("/sys/class/video4linux/video*"):
        tail = os.path.basename(path)[5:]
        if tail.isdigit():
            used.add(int(tail))
    return used


def link_target(mount: str, name: str) -> str:
    """What /dev/<name> points at when the daemon links it to its FUSE file."""
    return os.path.join(os.path.abspath(mount), name)


def is_our_link(path: str, mount: str) -> bool:
    """``path`` is a symlink to ``<mount>/<its own name>``, exactly what :meth:`Daemon._link`
    makes; anything else at a /dev/videoN name is another program's."""
    try:
        return os.readlink(path) == link_target(mount, os.path.basename(path))
    except OSError:  # not a link, or gone
        return False


def remove_stale_links(mount: str, dev: str = DEV) -> list[str]:
    """Remove ``/dev/videoN`` links of ours left by a run that died (kill -9).

    Only links :func:`is_our_link` recognises go; another program's link or
    node is left alone (and its number skipped by :func:`allocate_names`).
    Called before the names are chosen, so a restart gets the same numbers back.
    """
    removed = []
    if not mount:
        return removed
    for path in glob.glob(os.path.join(dev, "video*")):
        if not is_our_link(path, mount):
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        log.warning("%s: removed stale link to %s (a previous run died?)", path, mount)
        removed.append(path)
    return removed


def allocate_names(roles: list[str], nodes: config_mod.NodeConfig) -> dict[str, str]:
    """A videoN name per role: configured names, else free numbers from nodes.base."""
    used = taken_video_numbers()
    names: dict[str, str] = {}
    for role in roles:
        explicit = nodes.name_of(role)
        if explicit:
            if explicit[5:].isdigit() and int(explicit[5:]) in used:
                log.warning("nodes.%s = %s: /dev/%s already exists", role, explicit, explicit)
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


# kill(2) may hand a signal to any thread; Python runs the handler only in the main thread, and
# only once it executes bytecode, which a blocking SimpleQueue.get() never does (sem_wait is not
# interrupted in a thread that did not receive the signal). So the main thread wakes this often.
SIGNAL_POLL = 0.5


class Daemon:
    """Owns the backend, builds the nodes and serves them until stopped.

    One supervisor thread (the one in :meth:`run`) does every start, stop,
    hot-plug teardown/rebuild and reload, in the order the events were queued
    by signal handlers, the hot-plug monitor and the backend's lost callback.
    Transport threads never wait for any of it.
    """

    def __init__(self, cfg: config_mod.Config,
                 loader: Callable[[], config_mod.Config] | None = None):
        self.cfg = cfg
        # What SIGHUP re-reads; the CLI passes one that re-applies its options.
        self._loader = loader or (lambda: config_mod.load(cfg.path))
        self.backend: Any = None
        self.nodes: dict[str, Device] = {}  # role -> device
        self.names: dict[str, str] = {}  # role -> videoN; kept across hot-plug cycles
        self.cuse: list[Any] = []
        self.mount: Any = None
        self.links: list[str] = []
        self.hotplug: HotplugMonitor | None = None
        self.shim: Any = None  # hands node memory to `impv4l2 run` clients of CUSE nodes
        self._use_cuse = False
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # put() is signal-handler safe
        self.exit_status = 0

    @property
    def up(self) -> bool:
        """The hardware is open and the nodes are served."""
        return self.backend is not None

    # ------------------------------------------------------------ build
    def _build_nodes(self) -> None:
        from .driver.base import ChannelMode
        from .v4l2.capture import CaptureNode

        channels = {ch.role: ch for ch in self.backend.channels}
        # main, main-2 .. main-N, sub, ...: more nodes of a channel share it (fan-out)
        roles = [r for r in config_mod.node_roles(self.cfg) if config_mod.channel_of(r) in channels]
        try:
            from .v4l2.encoder import EncoderNode
        except ImportError:
            EncoderNode = None  # type: ignore[assignment]
        if EncoderNode is not None and not getattr(self.backend.encoder, "m2m", True):
            log.info("no M2M encoder node: backend %s cannot encode frames from memory",
                     self.backend.name)
        elif EncoderNode is not None:
            roles.append("encoder")
        if not all(r in self.names for r in roles):
            self.names = allocate_names(roles, self.cfg.nodes)
        names = self.names
        budget = self._budget()
        for role in roles:
            if role == "encoder":
                self.nodes[role] = EncoderNode(names[role], self.backend, defaults=self.cfg.encoder,
                                               budget=budget)
                continue
            ch_role = config_mod.channel_of(role)
            ch = channels[ch_role]
            if role == ch_role:
                want: config_mod.ChannelConfig = getattr(self.cfg, role)
                try:
                    ch.configure(ChannelMode(want.width, want.height, want.fps))
                except (ValueError, OSError) as e:
                    log.warning("%s channel: cannot use %dx%d@%d (%s); keeping %s", role,
                                want.width, want.height, want.fps, e, ch.mode)
            node_class = CaptureNode
            if self.cfg.nodes.options(role).readers == "shared":
                from .v4l2.readers import SharedReadersNode as node_class  # noqa: N813
            self.nodes[role] = node_class(names[role], self.backend, ch, role=role,
                                          encoder_defaults=self.cfg.encoder, budget=budget,
                                          daynight=self.cfg.daynight)

    def _budget(self) -> BufferBudget:
        """The buffer memory the nodes share: configuration, else the backend's default."""
        from .v4l2.budget import MiB, BufferBudget

        n = self.cfg.nodes
        budget = BufferBudget(per_node=n.buffer_mb * MiB or self.backend.buffer_memory,
                              total=n.total_buffer_mb * MiB or self.backend.total_buffer_memory)
        log.info("buffer memory: %s", budget.describe())
        return budget

    def _open_transports(self) -> None:
        """What outlives hot-plug cycles: the choice of CUSE and the FUSE mount."""
        from . import fuse

        t = self.cfg.transport
        # Our links from a run that died would otherwise hold their numbers.
        remove_stale_links(t.mount)
        if t.cuse == "on" and not fuse.cuse_available():
            raise RuntimeError("transport.cuse = on but /dev/cuse is missing (modprobe cuse)")
        self._use_cuse = t.cuse == "on" or (t.cuse == "auto" and fuse.cuse_available())
        if self._use_cuse:
            from .shim import ShimServer

            self.shim = ShimServer()
            self.shim.start()
        if t.mount:
            self.mount = fuse.FuseMount(t.mount, mmap_mode=t.mmap_mode)
            self.mount.start()

    def _publish(self) -> None:
        from . import fuse

        t = self.cfg.transport
        if self._use_cuse:
            for role, dev in self.nodes.items():
                srv = fuse.CuseServer(dev)
                srv.start()
                self.cuse.append(srv)
                if self.shim is not None:
                    self.shim.attach(dev, rdev=os.makedev(*srv.devnum))
                log.info("%s: CUSE node /dev/%s (%s)", dev.name, srv.devname, role)
        if self.mount is not None:
            for role, dev in self.nodes.items():
                self.mount.add(dev)
                log.info("%s: FUSE file %s/%s (%s, mmap %s)", dev.name, t.mount, dev.name,
                         role, self.mount.mmap_mode)
            # Desktop apps (Chromium, ffmpeg looking for an M2M encoder) find nodes only by
            # scanning /dev for video*; a CUSE node is there already.
            if not self._use_cuse and t.dev_links:
                for dev in self.nodes.values():
                    self._link(dev.name)

    def _link(self, name: str) -> None:
        """Link /dev/<name> to its FUSE file; never over another program's entry."""
        link, mount = os.path.join(DEV, name), self.cfg.transport.mount
        target = link_target(mount, name)
        try:
            if is_our_link(link, mount):
                os.unlink(link)  # ours from a crashed run (a configured name, or a race)
            os.symlink(target, link)
        except OSError as e:  # EEXIST: a configured name another program holds
            log.warning("%s: cannot create %s: %s", name, link, e)
            return
        self.links.append(link)
        log.info("%s: symlink %s -> %s", name, link, target)

    def _unlink(self, link: str) -> None:
        """Remove a link made by :meth:`_link`, unless something else replaced it since."""
        if is_our_link(link, self.cfg.transport.mount):
            os.unlink(link)
        else:
            log.warning("%s: no longer our link, left alone", link)

    # ------------------------------------------------------------ hardware up/down
    def _bring_up(self) -> None:
        """Open the backend, build the nodes and serve them (all or nothing)."""
        from .driver import load_backend

        options = dict(self.cfg.backend_options)
        # The sensor runs at the fastest channel's rate; channels decimate from it.
        options.setdefault("fps", max(self.cfg.main.fps, self.cfg.sub.fps))
        self.backend = load_backend(self.cfg.backend, **options)
        try:
            self.backend.set_lost_callback(lambda reason: self._events.put(("lost", reason)))
            self._build_nodes()
            self._publish()
        except BaseException:
            self._tear_down()
            raise
        log.info("serving %s with backend %s",
                 ", ".join(f"{d.name} ({r})" for r, d in self.nodes.items()) or "no nodes",
                 self.cfg.backend)

    def _tear_down(self) -> None:
        """Remove the nodes and close the backend; each step runs even if one fails.

        Nodes go first: the transports answer their clients ENODEV from then
        on (parked requests included), so no client waits on a closed backend.
        """
        steps: list[tuple[str, Callable[[], None]]] = []
        steps += [(link, lambda link=link: self._unlink(link)) for link in self.links]
        steps += [(f"CUSE {srv.devname}", srv.stop) for srv in self.cuse]
        if self.shim is not None:
            steps += [(f"shim {d.name}", lambda d=d: self.shim.unregister(d.name)) for d in self.nodes.values()]
        if self.mount is not None:
            steps += [(f"FUSE file {d.name}", lambda d=d: self.mount.remove(d.name))
                      for d in self.nodes.values()]
        steps += [(f"node {d.name}", d.close) for d in self.nodes.values()]
        # The buffer memory goes with the node (a memfd per node per hot-plug cycle otherwise).
        steps += [(f"memory of {d.name}", d.memory.close) for d in self.nodes.values() if d.memory is not None]
        if self.backend is not None:
            steps.append((f"backend {self.cfg.backend}", self.backend.close))
        for what, step in steps:
            try:
                step()
            except Exception as e:
                log.warning("removing %s: %s", what, e, exc_info=log.isEnabledFor(logging.DEBUG))
        self.links.clear()
        self.cuse.clear()
        self.nodes.clear()
        self.backend = None

    def _start_hotplug(self) -> bool:
        """Watch the hardware if configured; returns whether it is present."""
        from . import hotplug

        patterns = hotplug.resolve(self.cfg)
        if not patterns:
            return True
        self.hotplug = hotplug.HotplugMonitor(
            patterns, lambda present, detail: self._events.put(("hardware", present, detail)))
        return self.hotplug.start()

    def _stop_hotplug(self) -> None:
        if self.hotplug is not None:
            self.hotplug.stop()
            self.hotplug = None

    def _follow_hardware(self, why: str, present: bool | None = None) -> None:
        """Bring the nodes up or down: to ``present`` (a reported transition, so
        a remove+add bounce reopens the backend), or to the presence now."""
        now = self.hotplug is None or self.hotplug.present
        if present is None:
            present = now
        if present and now and not self.up:
            log.info("hardware present (%s): starting", why)
            try:
                self._bring_up()
            except Exception as e:
                log.error("cannot start on the hardware: %s; waiting for it to come back", e,
                          exc_info=log.isEnabledFor(logging.DEBUG))
        elif not present and self.up:
            log.warning("hardware gone (%s): removing %s", why,
                        ", ".join(d.name for d in self.nodes.values()) or "no nodes")
            self._tear_down()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._apply_log_level()
        try:
            self._open_transports()
            if self._start_hotplug():
                self._bring_up()
            else:
                assert self.hotplug is not None
                from .driver import check_backend
                check_backend(self.cfg.backend, **self.cfg.backend_options)  # no libimp: fail now
                self._preload()
                log.info("waiting for the hardware: %s", ", ".join(self.hotplug.hw.missing))
        except BaseException:
            self.stop()
            raise

    def _preload(self) -> None:
        """Import the backend and node modules now: when the hardware appears the
        nodes should follow in milliseconds, not after seconds of imports."""
        from . import driver

        modules = [driver.BACKENDS.get(self.cfg.backend, ":").split(":")[0],
                   "impv4l2.v4l2.capture", "impv4l2.v4l2.encoder"]
        for name in filter(None, modules):
            try:
                importlib.import_module(name)
            except ImportError as e:  # reported by the real bring-up, if it matters
                log.debug("preload %s: %s", name, e)

    def stop(self) -> None:
        self._stop_hotplug()
        self._tear_down()
        if self.mount is not None:
            try:
                self.mount.stop()
            except Exception as e:
                log.warning("unmounting %s: %s", self.cfg.transport.mount, e)
            self.mount = None
        if self.shim is not None:
            self.shim.stop()
            self.shim = None

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "hardware":
            self._follow_hardware(event[2], event[1])
        elif kind == "lost":
            if not self.up:
                return
            if self.hotplug is None:
                # Nothing will tell us it is back: exit non-zero (systemd restarts us).
                log.error("hardware lost: %s; exiting", event[1])
                self.exit_status = 1
                self._events.put(("stop", "hardware lost"))
                return
            log.warning("hardware lost: %s; removing the nodes until it comes back", event[1])
            self._tear_down()
        elif kind == "reload":
            self.reload()
        elif kind == "stats":
            log.info("stats: %s", json.dumps(self.stats(), sort_keys=True))

    def stats(self) -> dict:
        """Counters a soak watches for leaks (SIGUSR2 logs them as one JSON line)."""
        servers = [*self.cuse, *([self.mount] if self.mount is not None else [])]
        return {
            "parked": sum(s.parked_count for s in servers),
            "open_files": sum(s.open_files for s in servers),
            "handles": sum(len(getattr(d, "handles", ())) for d in self.nodes.values()),
            "memfd_bytes": {d.name: d.memory.size for d in self.nodes.values() if d.memory is not None},
            "threads": threading.active_count(),
            "fds": len(os.listdir("/proc/self/fd")),
            "channels": self._channel_stats(),
            "sensor_overruns": self.backend.overruns if self.backend is not None else 0,
        }

    def _channel_stats(self) -> dict:
        """Per frame channel: its consumers and the encoder channels running on it (fan-out)."""
        from .v4l2.capture import CaptureNode

        hubs = {id(d.hub): d.hub for d in self.nodes.values() if isinstance(d, CaptureNode)}
        return {h.channel.role: {"consumers": h.consumers(), "encoders_opened": h.encoders_opened,
                                 "encoders": {c.value: n for c, n in h.encoders.items()}}
                for h in hubs.values()}

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM; SIGHUP reloads the configuration."""
        handlers = {
            signal.SIGINT: lambda *_: self._events.put(("stop", "SIGINT")),
            signal.SIGTERM: lambda *_: self._events.put(("stop", "SIGTERM")),
            signal.SIGHUP: lambda *_: self._events.put(("reload",)),
            signal.SIGUSR2: lambda *_: self._events.put(("stats",)),
        }
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        self.start()
        try:
            while True:
                try:
                    event = self._events.get(timeout=SIGNAL_POLL)
                except queue.Empty:
                    continue  # back in bytecode: a signal another thread caught runs its handler now
                if event[0] == "stop":
                    log.info("stopping (%s)", event[1])
                    break
                self._handle(event)
        finally:
            self.stop()
            log.info("stopped")
        return self.exit_status

    def request_stop(self, why: str = "request") -> None:
        """Make :meth:`run` return (from any thread)."""
        self._events.put(("stop", why))

    # ------------------------------------------------------------ reload
    def _apply_log_level(self) -> None:
        logging.getLogger("impv4l2").setLevel(self.cfg.log_level.upper())

    def reload(self) -> None:
        """Apply what can change safely; log what needs a restart (or no nodes)."""
        try:
            new = self._loader()
        except config_mod.ConfigError as e:
            log.error("reload: %s; keeping the running configuration", e)
            return
        cur = self.cfg
        applied: list[str] = []
        refused: list[str] = []
        if new.log_level != cur.log_level:
            applied.append(f"log_level {cur.log_level} -> {new.log_level}")
            cur.log_level = new.log_level
            self._apply_log_level()
        # Encoder defaults are updated in place: nodes hold this object and
        # read it when a client starts a new encoding session.
        for f in dataclasses.fields(config_mod.EncoderDefaults):
            old, value = getattr(cur.encoder, f.name), getattr(new.encoder, f.name)
            if old != value:
                applied.append(f"encoder.{f.name} {old} -> {value}")
                setattr(cur.encoder, f.name, value)
        for role in ("main", "sub"):  # channel modes are set when the nodes are built
            old, value = getattr(cur, role), getattr(new, role)
            if old != value:
                if self.nodes:
                    refused.append(f"[{role}] (while its node exists)")
                else:
                    applied.append(f"[{role}] {old.width}x{old.height}@{old.fps} -> "
                                   f"{value.width}x{value.height}@{value.fps}")
                    setattr(cur, role, value)
        for key in ("backend", "backend_options", "nodes", "transport"):
            if getattr(new, key) != getattr(cur, key):
                refused.append(key)
        hotplug_changed = new.hotplug != cur.hotplug
        if hotplug_changed:
            applied.append(f"hotplug {dataclasses.asdict(cur.hotplug)} -> "
                           f"{dataclasses.asdict(new.hotplug)}")
            cur.hotplug = new.hotplug
        for what in applied:
            log.info("reload: %s", what)
        if refused:
            log.warning("reload: not applied (restart impv4l2 to change): %s", ", ".join(refused))
        if not applied and not refused:
            log.info("reload: no changes")
        if hotplug_changed:
            self._stop_hotplug()
            try:
                self._start_hotplug()
            except Exception as e:
                log.error("reload: cannot watch the hardware: %s; hot-plug off", e)
                self._stop_hotplug()
            self._follow_hardware("hot-plug settings changed")
