"""Helpers shared by the benchmark scripts: what /proc says about a process.

Importable from the scripts (``sys.path`` has the repo root) and from their
``python -c`` clients run with ``cwd`` = the repo root.
"""

from __future__ import annotations

import os
import threading

_TICK = os.sysconf("SC_CLK_TCK")


def io_bytes(pid: int | str = "self") -> int:
    """Bytes moved by read/write-family syscalls so far (/proc/<pid>/io rchar + wchar).

    A frame pushed through a pipe, /dev/fuse (NOTIFY_STORE) or read(2) counts
    once per side; page faults on a shared mapping and process_vm_writev do not.
    """
    d = dict(line.split(": ") for line in open(f"/proc/{pid}/io").read().splitlines())
    return int(d["rchar"]) + int(d["wchar"])


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of all threads of ``pid`` (/proc/<pid>/stat utime + stime)."""
    stat = open(f"/proc/{pid}/stat").read()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size now (VmRSS of /proc/<pid>/status)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values, p: float) -> float:
    """The ``p``-th percentile (0..100) by nearest rank; NaN for no values."""
    v = sorted(values)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, max(0, int(round(p / 100 * len(v) + 0.5)) - 1))]


class RssSampler:
    """Samples a process's VmRSS every ``period`` seconds in a thread; ``max`` is the peak seen."""

    def __init__(self, pid: int, period: float = 0.25):
        self.pid, self.period, self.max = pid, period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max = max(self.max, rss_bytes(self.pid))
            except OSError:
                return
            self._stop.wait(self.period)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
