"""The real daemon for VM tests, started the way users start it.

``TOPOLOGIES`` names the command lines under test: ``default`` is plain
``impv4l2 serve`` (CUSE nodes when /dev/cuse exists *and* the FUSE mount at
its default place, which on Debian's 6.1 kernel runs in cached mode);
``cuse-only`` is ``serve --mount ""``.  Both start the shim server, so
``impv4l2 run`` clients can mmap the CUSE nodes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `impv4l2 serve` as the console script runs it, plus a faulthandler: SIGUSR1 dumps every
# thread's stack into the daemon log (used when a client hangs).
SERVE = [sys.executable, "-c", "import faulthandler, signal, sys; "
         "faulthandler.register(signal.SIGUSR1, all_threads=True); "
         "from impv4l2.cli import main; sys.exit(main())", "serve"]
RUN = [sys.executable, "-m", "impv4l2.cli", "run", "--"]
TOPOLOGIES = {"default": [], "cuse-only": ["--mount", ""]}
NODE_RE = re.compile(r"(\S+): CUSE node /dev/(video\d+) \(([\w-]+)\)")  # roles: main, main-2, ...
START_TIMEOUT = 120  # generous: the guest runs without KVM
# Frames per v4l2-compliance streaming test (its default is 60): every -s test still runs,
# each shorter, so the emulated guest's VM stage stays within the suite's time budget.
COMPLIANCE_STREAMING = ["--streaming=" + os.environ.get("IMPV4L2_VM_COMPLIANCE_FRAMES", "20")]


SEQ_GAP = re.compile(r"got sequence number \d+, expected \d+")


def compliance_warnings(out: str) -> tuple[list[str], list[str]]:
    """v4l2-compliance's warnings (printed mid-line after a frame counter while streaming):
    (sequence gaps, the others).  The gaps are frames the sim sensor produced while the slow,
    emulated client held every buffer; the spec wants them counted, and they are tolerated."""
    ws = re.findall(r"warn: (.*)", out)
    return [w for w in ws if SEQ_GAP.search(w)], [w for w in ws if not SEQ_GAP.search(w)]


def outdir() -> Path:
    d = Path(os.environ.get("IMPV4L2_VM_OUT") or os.environ.get("TMPDIR", "/tmp"))
    d.mkdir(parents=True, exist_ok=True)
    return d


class ServedDaemon:
    """``impv4l2 serve`` in its own process; ``nodes`` maps role -> /dev/videoN."""

    def __init__(self, topology: str, tag: str, roles=("main", "sub", "encoder")) -> None:
        self.topology = topology
        self.args = TOPOLOGIES[topology]
        self.roles = roles
        self.log_path = outdir() / f"daemon-{tag}-{topology}.log"
        self.proc: subprocess.Popen | None = None
        self.nodes: dict[str, str] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> "ServedDaemon":
        if not os.path.exists("/dev/cuse"):
            raise AssertionError("/dev/cuse missing (modprobe cuse failed in the guest?)")
        verbose = ["-v"] if os.environ.get("IMPV4L2_VM_VERBOSE") == "1" else []
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*SERVE, "--backend", "sim", *self.args, *verbose],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = self.text()
            self.nodes = {role: f"/dev/{dev}" for _, dev, role in NODE_RE.findall(text)}
            if all(r in self.nodes for r in self.roles) and "serving " in text:
                break
            if self.proc.poll() is not None:
                raise AssertionError(f"impv4l2 serve exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.2)
        else:
            self.stop()
            raise AssertionError(f"no CUSE nodes after {START_TIMEOUT} s:\n{self.text()}")
        subprocess.run(["udevadm", "settle", "--timeout=30"], check=False)
        for r in self.roles:  # udev creates the node: a character device of ours, not vivid's
            dev = self.nodes[r]
            assert Path(f"/sys/class/cuse/{Path(dev).name}").exists(), dev
            while not (os.path.exists(dev) and stat.S_ISCHR(os.stat(dev).st_mode)):
                assert time.monotonic() < deadline, dev
                time.sleep(0.1)
        return self

    def dump_threads(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGUSR1)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.dump_threads()
                time.sleep(0.5)
                self.proc.kill()
                self.proc.wait()
        print(f"daemon log: {self.log_path}")
        return self.proc.returncode


CURRENT: ServedDaemon | None = None  # the daemon of the running test module (for hang reports)
ALL_ROLES = ("main", "sub", "encoder")
_SHARED: dict[str, ServedDaemon] = {}


def stop_shared() -> None:
    """Stop the shared daemons (before a test that brings up its own nodes)."""
    for d in _SHARED.values():
        d.stop()
    _SHARED.clear()


atexit.register(stop_shared)


@contextlib.contextmanager
def serving(topology: str, tag: str, roles=ALL_ROLES, shared: bool = True):
    """A module fixture's body: the daemon of ``topology``, made CURRENT.

    ``shared``: one daemon per topology for every module of the session (as users run it:
    one daemon, many clients one after another; each start costs seconds in the emulated
    guest), stopped when the guest's pytest exits; otherwise a daemon of the module's own
    (for tests that leave it in odd states, like the fuzzer), stopped after the module.
    """
    global CURRENT
    for other in [t for t in _SHARED if t != topology or not shared]:
        _SHARED.pop(other).stop()  # one daemon at a time: they would share names and the mount
    if shared:
        d = _SHARED.get(topology)
        if d is None or d.proc.poll() is not None:
            d = _SHARED[topology] = ServedDaemon(topology, "shared", ALL_ROLES).start()
    else:
        d = ServedDaemon(topology, tag, roles).start()
    CURRENT = d
    try:
        yield d
    finally:
        CURRENT = None
        if not shared:
            d.stop()


def run(*cmd: str, timeout: float = 300, check: bool = True, daemon: ServedDaemon | None = None,
        cwd: Path | None = ROOT) -> subprocess.CompletedProcess:
    """Run a client; on timeout record where it and the daemon (default CURRENT) hang, then fail."""
    daemon = daemon or CURRENT
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            stack = Path(f"/proc/{p.pid}/stack").read_text()
        except OSError as e:
            stack = str(e)
        if daemon is not None:
            daemon.dump_threads()  # thread dump into the daemon log
        p.kill()
        out, err = p.communicate()
        tail = daemon.text()[-3000:] if daemon is not None else ""
        raise AssertionError(f"{' '.join(cmd)}: no exit after {timeout} s; kernel stack:\n{stack}\n"
                             f"{out[-4000:]}\n{err[-2000:]}\n--- daemon log ---\n{tail}") from None
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc
