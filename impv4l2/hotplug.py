"""Hot-plug: watch the kernel devices that make up a backend's hardware.

The daemon serves its nodes only while the hardware is there.  A
:class:`HotplugMonitor` follows uevents (pyudev) for a set of kernel device
names — fnmatch patterns such as ``framechan*`` — and reports, from its own
thread, each change of "all of them present".  It never acts itself: the
daemon queues the report and tears down or rebuilds on its supervisor thread,
so no transport thread ever waits for a backend to close or open.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import select
import threading
from typing import Callable, Iterable

from . import config as config_mod

log = logging.getLogger("impv4l2.hotplug")

# The kernel devices of each backend's hardware (all must be present), as data.
# t31: the ISP, the encoder and at least one frame channel (vendor modules).
# sim: a stand-in device a test (or user) creates, e.g. a CUSE device of that
# name; with it the sim backend can rehearse the real hardware's comings and goings.
DEFAULT_DEVICES: dict[str, tuple[str, ...]] = {
    "t31": ("tx-isp", "avpu", "framechan*"),
    "sim": ("impv4l2-sim-hw",),
}
# hotplug.enable = "auto": on for backends whose hardware comes and goes.
DEFAULT_ENABLED: dict[str, bool] = {"t31": True, "sim": False}


def resolve(cfg: config_mod.Config) -> tuple[str, ...]:
    """The device patterns to watch, or () when hot-plug is off for ``cfg``."""
    hp = cfg.hotplug
    devices = tuple(hp.devices) or DEFAULT_DEVICES.get(cfg.backend, ())
    if hp.enable == "off":
        return ()
    if hp.enable == "auto" and not (hp.devices or DEFAULT_ENABLED.get(cfg.backend, False)):
        return ()
    return devices


class HardwareSet:
    """Which of the wanted devices exist; pure bookkeeping, fed with uevents."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = tuple(patterns)
        self._seen: dict[str, set[str]] = {p: set() for p in self.patterns}

    @property
    def present(self) -> bool:
        return bool(self.patterns) and all(self._seen.values())

    @property
    def missing(self) -> list[str]:
        return [p for p, names in self._seen.items() if not names]

    def update(self, action: str, sys_name: str) -> bool:
        """Apply one uevent; True when it concerned a wanted device."""
        hit = False
        for pattern, names in self._seen.items():
            if fnmatch.fnmatchcase(sys_name, pattern):
                hit = True
                if action == "remove":
                    names.discard(sys_name)
                elif action in ("add", "change", "bind", "online", "move"):
                    names.add(sys_name)
        return hit


class HotplugMonitor:
    """A thread following uevents; calls ``on_change(present, detail)`` on each change.

    ``source``: "kernel" (raw uevents, the default) or "udev" (events after
    udev's rules ran).  Kernel events because udev's queue is no place to wait
    in: udev serialises events, and its workers open our own nodes (udev-info)
    — a busy or stalled udevd must not delay the hardware's comings and goings.
    The daemon runs as root, so the device nodes' permissions do not matter.
    Call :meth:`start` before looking at :attr:`present`; it enumerates the
    devices that already exist.
    """

    def __init__(self, patterns: Iterable[str], on_change: Callable[[bool, str], None],
                 source: str = "kernel"):
        self.hw = HardwareSet(patterns)
        self.on_change = on_change
        self.source = source
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._monitor = None

    @property
    def present(self) -> bool:
        return self.hw.present

    def start(self) -> bool:
        """Start watching; returns whether the hardware is present now."""
        import pyudev

        source = self.source
        ctx = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(ctx, source=source)
        monitor.start()  # before enumerating: an add between the two is not lost
        self._monitor = monitor
        for dev in ctx.list_devices():
            self.hw.update("add", dev.sys_name)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="impv4l2-hotplug", daemon=True)
        self._thread.start()
        log.info("hot-plug: watching %s (%s uevents): %s", ", ".join(self.hw.patterns), source,
                 "present" if self.present else "missing " + ", ".join(self.hw.missing))
        return self.present

    def _run(self) -> None:
        monitor = self._monitor
        assert monitor is not None
        fd = monitor.fileno()
        while True:
            ready, _, _ = select.select([fd, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            # Every transition is reported, even a remove+add burst: hardware
            # that went away and came back must be reopened.
            while True:
                dev = monitor.poll(timeout=0)
                if dev is None:
                    break
                before = self.hw.present
                if not self.hw.update(dev.action, dev.sys_name):
                    continue
                log.debug("hot-plug: %s %s (%s)", dev.action, dev.sys_name, dev.subsystem)
                if self.hw.present != before:
                    try:
                        self.on_change(self.hw.present, f"{dev.action} {dev.sys_name}")
                    except Exception:  # the watcher must survive a bad callback
                        log.exception("hot-plug callback failed")

    def stop(self) -> None:
        """Stop the thread and release the netlink socket and pipe."""
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(2)
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._monitor = None  # libudev closes its socket when the monitor is freed
