"""Hot-plug: watch the kernel devices that make up a backend's hardware.

The daemon serves its nodes only while the hardware is there.  A
:class:`HotplugMonitor` follows uevents for a set of kernel device
names — fnmatch patterns such as ``framechan*`` — and reports, from its own
thread, each change of "all of them present".  It never acts itself: the
daemon queues the report and tears down or rebuilds on its supervisor thread,
so no transport thread ever waits for a backend to close or open.

Kernel uevents come from the standard library (:mod:`impv4l2.uevent`: a netlink
socket and sysfs), so a camera without udev or pyudev has hot-plug; pyudev is
imported only for ``source="udev"``.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import select
import threading
from typing import Callable, Iterable, Protocol

from . import config as config_mod
from . import uevent

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

    def reset(self, sys_names: Iterable[str]) -> None:
        """Replace what is known by the devices that exist (``sys_names``, from sysfs)."""
        names = set(sys_names)
        # one assignment: readers on other threads see the old or the new state
        self._seen = {p: {n for n in names if fnmatch.fnmatchcase(n, p)} for p in self.patterns}

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


class EventSource(Protocol):
    """Where uevents come from: a pollable fd, one event at a time (None: none
    queued; :class:`uevent.Overrun` when some were lost), and close."""

    def fileno(self) -> int: ...
    def receive(self) -> uevent.Uevent | None: ...
    def close(self) -> None: ...


class UdevSource:
    """Events after udevd's rules ran, through pyudev (not on a camera: no udev there)."""

    def __init__(self) -> None:
        import pyudev  # only on this path: the kernel source is the standard library

        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        self._monitor.start()

    def fileno(self) -> int:
        return self._monitor.fileno()

    def receive(self) -> uevent.Uevent | None:
        try:
            dev = self._monitor.poll(timeout=0)
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                raise uevent.Overrun("udev events lost: receive buffer overrun") from None
            raise
        if dev is None:
            return None
        return uevent.Uevent(dev.action or "", dev.device_path, dict(dev.properties))

    def close(self) -> None:
        self._monitor = None  # libudev closes its socket when the monitor is freed


def open_source(source: str) -> EventSource:
    """The event source named by ``source``: "kernel" or "udev"."""
    if source == "kernel":
        return uevent.UeventSocket()
    if source == "udev":
        return UdevSource()
    raise ValueError(f"hot-plug source {source!r}: 'kernel' or 'udev'")


class HotplugMonitor:
    """A thread following uevents; calls ``on_change(present, detail)`` on each change.

    ``source``: "kernel" (raw uevents, the default) or "udev" (events after
    udev's rules ran).  Kernel events because udev's queue is no place to wait
    in: udev serialises events, and its workers open our own nodes (udev-info)
    — a busy or stalled udevd must not delay the hardware's comings and goings;
    and a camera has no udev at all.  The daemon runs as root, so the device
    nodes' permissions do not matter.  Call :meth:`start` before looking at
    :attr:`present`; it enumerates the devices that already exist (sysfs).
    When the kernel dropped events (receive buffer overrun) the monitor reads
    sysfs again and reports the transition, if presence changed meanwhile.
    """

    def __init__(self, patterns: Iterable[str], on_change: Callable[[bool, str], None],
                 source: str = "kernel", open_source: Callable[[str], EventSource] = open_source,
                 sysfs: str = "/sys"):
        self.hw = HardwareSet(patterns)
        self.on_change = on_change
        self.source = source
        self._open_source = open_source
        self._sysfs = sysfs
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._events: EventSource | None = None
        self.overruns = 0  # resyncs after lost events, for logs and tests

    @property
    def present(self) -> bool:
        return self.hw.present

    def start(self) -> bool:
        """Start watching; returns whether the hardware is present now."""
        self._events = self._open_source(self.source)
        try:
            # the socket is open before enumerating: an add between the two is not lost
            self.hw.reset(uevent.enumerate_sys_names(self._sysfs))
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._thread = threading.Thread(target=self._run, name="impv4l2-hotplug", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        log.info("hot-plug: watching %s (%s uevents): %s", ", ".join(self.hw.patterns), self.source,
                 "present" if self.present else "missing " + ", ".join(self.hw.missing))
        return self.present

    def _run(self) -> None:
        events = self._events
        assert events is not None
        fd = events.fileno()
        while True:
            ready, _, _ = select.select([fd, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            while True:
                try:
                    ev = events.receive()
                except uevent.Overrun:
                    self._resync()
                    continue
                except OSError as e:  # not expected from netlink; do not spin on it
                    log.error("hot-plug: reading uevents: %s; hot-plug stopped", e)
                    return
                if ev is None:
                    break
                self._apply(ev)

    def _apply(self, ev: uevent.Uevent) -> None:
        before = self.hw.present
        hit = False
        if ev.action == "move" and ev.old_sys_name:  # a rename: the old name is gone
            hit = self.hw.update("remove", ev.old_sys_name)
        if not self.hw.update(ev.action, ev.sys_name) and not hit:
            return
        log.debug("hot-plug: %s %s (%s)", ev.action, ev.sys_name, ev.subsystem)
        # Every transition is reported, even a remove+add burst: hardware
        # that went away and came back must be reopened.
        if self.hw.present != before:
            self._report(f"{ev.action} {ev.sys_name}")

    def _resync(self) -> None:
        # Events were lost: sysfs is the truth.  A bounce hidden in the loss
        # (remove+add) cannot be seen; the backend's own loss report covers that.
        self.overruns += 1
        before = self.hw.present
        self.hw.reset(uevent.enumerate_sys_names(self._sysfs))
        log.warning("hot-plug: uevents lost (receive buffer overrun); re-read sysfs: %s",
                    "present" if self.hw.present else "missing " + ", ".join(self.hw.missing))
        if self.hw.present != before:
            self._report("uevents lost, sysfs says " + ("present" if self.hw.present else "missing"))

    def _report(self, detail: str) -> None:
        try:
            self.on_change(self.hw.present, detail)
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
        if self._events is not None:
            self._events.close()
            self._events = None
