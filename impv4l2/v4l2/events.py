"""V4L2 events of one open handle: SUBSCRIBE/UNSUBSCRIBE_EVENT, DQEVENT, POLLPRI.

Which event types a node offers is data (``Node.event_types``); controls post
V4L2_EVENT_CTRL through :meth:`EventQueue.post_ctrl`, a capture node posts
SOURCE_CHANGE and MOTION_DET (:func:`motion_event`), the encoder EOS.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import threading
import time

from . import abi

MAX_PENDING = 64


class EventQueue:
    """Subscriptions and pending events of one handle (thread safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.subs: dict[tuple[int, int], int] = {}  # (type, id) -> flags
        self._pending: collections.deque[abi.v4l2_event] = collections.deque()
        self._sequence = 0
        # CUSE never tells us about fcntl(F_SETFL, O_NONBLOCK): a client that polls is taken as
        # non-blocking for DQEVENT, or its "DQEVENT until ENOENT" loop would hang forever.
        self.polled = False

    def subscribed(self, type_: int, id_: int) -> int | None:
        return self.subs.get((type_, id_))

    def subscribe(self, type_: int, id_: int, flags: int) -> None:
        with self._lock:
            self.subs[(type_, id_)] = flags

    def unsubscribe(self, type_: int, id_: int) -> None:
        with self._lock:
            if type_ == abi.EventType.ALL:
                self.subs.clear()
                self._pending.clear()
                return
            self.subs.pop((type_, id_), None)
            self._pending = collections.deque(e for e in self._pending
                                              if (e.type, e.id) != (type_, id_))

    def post(self, ev: abi.v4l2_event) -> bool:
        """Queue an event if subscribed; True if queued (caller wakes the transport)."""
        with self._lock:
            if (ev.type, ev.id) not in self.subs:
                return False
            if ev.type == abi.EventType.CTRL:
                # Like the kernel's ctrl event merge: a newer state replaces an
                # undelivered one of the same control, keeping its change bits.
                for old in self._pending:
                    if old.type == ev.type and old.id == ev.id:
                        changes = old.u.ctrl.changes | ev.u.ctrl.changes
                        ctypes.memmove(ctypes.addressof(old.u), ctypes.addressof(ev.u), ctypes.sizeof(ev.u))
                        old.u.ctrl.changes = changes
                        return True
            if len(self._pending) >= MAX_PENDING:
                self._pending.popleft()
            ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            ev.timestamp.secs, ev.timestamp.nsecs = divmod(ns, 1_000_000_000)
            ev.sequence = self._sequence
            self._sequence += 1
            self._pending.append(ev)
            return True

    def has_pending(self) -> bool:
        """Asked by the handle's poll(): also marks the handle as a polling one (see
        :attr:`polled`)."""
        self.polled = True
        return bool(self._pending)

    def dequeue(self, out: abi.v4l2_event) -> bool:
        with self._lock:
            if not self._pending:
                return False
            ev = self._pending.popleft()
            ctypes.memmove(ctypes.addressof(out), ctypes.addressof(ev), ctypes.sizeof(ev))
            out.pending = len(self._pending)
            return True


def ctrl_event(ctrl, value: int, changes: int) -> abi.v4l2_event:
    """A V4L2_EVENT_CTRL event describing ``ctrl`` (a controls.Control)."""
    ev = abi.v4l2_event()
    ev.type = abi.EventType.CTRL
    ev.id = ctrl.id
    c = ev.u.ctrl
    c.changes = changes
    c.type = ctrl.type
    c.value = 0 if getattr(ctrl, "is_array", False) else value  # arrays: no value in the event
    c.flags = ctrl.flags
    c.minimum = ctrl.minimum
    c.maximum = ctrl.maximum
    c.step = ctrl.step
    c.default_value = ctrl.default
    return ev


def motion_event(region_mask: int, sequence: int | None) -> abi.v4l2_event:
    """A V4L2_EVENT_MOTION_DET event; ``sequence`` None: no frame of the handle's stream."""
    ev = abi.v4l2_event()
    ev.type = abi.EventType.MOTION_DET
    m = ev.u.motion_det
    m.region_mask = region_mask
    if sequence is not None:
        m.flags = abi.EventType.MD_FL_HAVE_FRAME_SEQ
        m.frame_sequence = sequence & 0xFFFFFFFF
    return ev


def einval(msg: str) -> OSError:
    return OSError(errno.EINVAL, msg)
