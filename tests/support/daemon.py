"""The real daemon as a subprocess (``impv4l2 serve`` with a config the test writes), its
counters as /proc shows them, and a streaming client in a process of its own."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from .paths import CLIENTS, ROOT

IMPV4L2 = [sys.executable, "-m", "impv4l2.cli"]
SERVING = re.compile(r"serving (.*) with backend")


def wait_for(pred, timeout: float, what: str, step: float = 0.02):
    """Poll ``pred`` until truthy; fail naming ``what`` after ``timeout`` s. Returns the time taken."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(step)
    return time.monotonic() - t0


def free_base() -> int:
    for base in range(40, 90, 5):
        if not any(os.path.lexists(f"/dev/video{n}") for n in range(base, base + 5)):
            return base
    pytest.skip("no free /dev/videoN range")


def start_daemon(cfg: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([*IMPV4L2, "--config", str(cfg), "serve"], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, cwd=ROOT)


def serving(proc: subprocess.Popen, log: Path, count: int) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = SERVING.findall(log.read_text())
        if len(found) >= count:
            return found[count - 1]
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    pytest.fail("daemon not serving:\n" + log.read_text())


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def task_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def mounts_under(path: str) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(path)]


class DaemonProc:
    """``impv4l2 serve`` in a subprocess with a config file written by the test."""

    def __init__(self, tmp: Path, devices: list[str], mount: str, cuse: str = "off", extra: str = ""):
        self.tmp = tmp
        self.mount = mount
        self.config = tmp / "impv4l2.toml"
        self.log = tmp / "daemon.log"
        self.write_config(devices, cuse, extra)
        self.proc: subprocess.Popen | None = None

    def write_config(self, devices, cuse="off", extra="", log_level="info", bitrate=2000000, base=10):
        self.config.write_text(textwrap.dedent(f"""
            backend = "sim"
            log_level = "{log_level}"
            [main]
            width = 640
            height = 360
            fps = 10
            [sub]
            width = 320
            height = 180
            fps = 10
            [nodes]
            base = {base}
            [encoder]
            bitrate = {bitrate}
            [transport]
            cuse = "{cuse}"
            mount = "{self.mount}"
            dev_links = false
            [hotplug]
            enable = "on"
            devices = {list(devices)!r}
        """).replace("'", '"') + extra)

    def start(self) -> "DaemonProc":
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen([*IMPV4L2, "--config", str(self.config), "serve"],
                                     stdout=self.logf, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text()

    def wait_log(self, needle: str, timeout: float = 10, start: int = 0) -> int:
        wait_for(lambda: needle in self.text()[start:] or self.proc.poll() is not None, timeout,
                 f"log line {needle!r}")
        assert needle in self.text()[start:], self.text()
        return len(self.text())

    def wait_serving(self, timeout: float, count: int = 1) -> None:
        """Until the daemon has logged its ``count``-th complete bring-up (all nodes served)."""
        wait_for(lambda: self.text().count(" with backend ") >= count or self.proc.poll() is not None,
                 timeout, "daemon serving its nodes")
        assert self.proc.poll() is None, self.text()

    def stop(self) -> float:
        """SIGTERM; returns seconds until the process exited."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        took = sigterm(self.proc, self.text)
        self.logf.close()
        return took


def sigterm(proc: subprocess.Popen, log: Callable[[], str]) -> float:
    """SIGTERM a running daemon and wait for it (killed, and the test failed with ``log()``,
    after 10 s): the seconds it took to exit."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        pytest.fail("daemon ignored SIGTERM for 10 s:\n" + log())
    return time.monotonic() - t0


def nodes_in(mount: str) -> set[str]:
    try:
        return {n for n in os.listdir(mount) if n.startswith("video")}
    except OSError:
        return set()


class StreamingClient:
    def __init__(self, path: str):
        self.proc = subprocess.Popen([sys.executable, str(CLIENTS / "userptr_stream.py"), path],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def wait_line(self, prefix: str, timeout: float) -> str:
        wait_for(lambda: any(x.startswith(prefix) for x in self.lines) or self.proc.poll() is not None,
                 timeout, f"client output {prefix!r}")
        self._reader.join(0.2)
        hits = [x for x in self.lines if x.startswith(prefix)]
        assert hits, f"client said {self.lines}, stderr {self.proc.stderr.read() if self.proc.poll() is not None else ''}"
        return hits[0]

    def close(self) -> None:
        # A client stuck inside a FUSE request dies only when the daemon answers
        # or its connection ends (daemon teardown): do not wait for it here.
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2)
