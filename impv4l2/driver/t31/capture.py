"""What every t31 channel shares: undo lists, the capture thread, the sink buffer address.

A bring-up step that succeeded pushes its undo; :func:`undo_all` unwinds
them in reverse and logs (never raises) what fails, so teardown always goes
on.  A :class:`Capture` thread calls ``step`` until stopped; a step that
raises TimeoutError becomes an error buffer for the client, never a hang.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

if TYPE_CHECKING:
    from ..base import FrameSink
    from .libimp import LibImp

log = logging.getLogger("impv4l2.t31")

__all__ = ["Capture", "ChannelHost", "Step", "dest", "run_steps", "undo_all"]

Step = tuple[str, Callable[[], "int | None"]]  # (name for the log, call returning the IMP result)


class ChannelHost(Protocol):
    """What a raw or stream capture needs of its frame channel."""

    lib: "LibImp"
    index: int

    def to_monotonic_ns(self, imp_us: int) -> int: ...
    def deliver_error(self, sink: "FrameSink | None", seq: int) -> None: ...


def undo_all(undo: list[Step], what: str) -> None:
    """Run undo steps in reverse (emptying the list); failures are logged, never raised."""
    while undo:
        name, fn = undo.pop()
        try:
            ret = fn()
            if ret is not None and ret < 0:
                log.error("%s: %s failed (%d)", what, name, ret)
        except Exception:  # noqa: BLE001 - teardown must go on
            log.exception("%s: %s raised", what, name)


def run_steps(steps: Sequence[Step], what: str) -> None:
    """Run teardown steps in the given order (errors logged)."""
    undo_all(list(reversed(steps)), what)


def dest(buf: memoryview):
    """(keep-alive array, address, capacity) of a writable sink buffer."""
    arr = (ctypes.c_char * len(buf)).from_buffer(buf)
    return arr, ctypes.addressof(arr), len(buf)


class Capture:
    """One capture thread: ``step()`` delivers one frame or raises TimeoutError."""

    def __init__(self, name: str, step: Callable[[], None], on_timeout: Callable[[], None]):
        self.stop_event = threading.Event()
        self._step, self._on_timeout = step, on_timeout
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try:
                self._step()
            except TimeoutError:
                self._on_timeout()
                if time.monotonic() - t0 < 0.01:  # a failing call returning at once must not spin
                    self.stop_event.wait(0.05)
            except Exception:  # noqa: BLE001 - keep capturing; the sink or library misbehaved once
                log.exception("%s: capture step failed", self.thread.name)
                self.stop_event.wait(0.05)

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not threading.current_thread():
            self.thread.join()
