"""Real-kernel VM stage of the test suite.

The host kernel has no CUSE and no V4L2, so tests marked ``@pytest.mark.vm`` run inside Debian's
6.1 kernel booted with virtme-ng (QEMU, no KVM). One host pytest session boots ONE VM that runs all
selected vm tests; each test's host item (a :class:`VMProxyItem`) then reports the guest's outcome
under the same node id, so the host's summary line counts them.

Host side: :class:`VMRun` (boot, timeout, log) and :class:`VMProxyItem`.
Guest side: :class:`GuestReporter`, a pytest plugin writing every outcome to ``results.json`` in
the shared output directory after each test (so a VM that dies or times out still leaves the
outcomes it produced).

Environment:
  IMPV4L2_IN_VM=1        set by guest.sh inside the VM: vm tests run for real, others deselected
  IMPV4L2_SKIP_VM=1      host: do not boot; vm tests are reported as skipped (otherwise a VM that
                         cannot boot FAILS every vm test with the reason)
  IMPV4L2_VM_KERNEL      host: kernel image to boot (default: newest /boot/vmlinuz-6.1.0-*-amd64)
  IMPV4L2_VM_TIMEOUT     host: seconds for the whole VM run (default 1500)
  IMPV4L2_VM_KVM=1       host: let QEMU use KVM (default off: nested KVM does not work here)
Every other IMPV4L2_* variable of the host (e.g. IMPV4L2_TEST_TIMEOUT) is passed into the guest.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

IN_VM = os.environ.get("IMPV4L2_IN_VM") == "1"
SKIP_VM = os.environ.get("IMPV4L2_SKIP_VM") == "1"
GUEST_SCRIPT = Path(__file__).resolve().with_name("guest.sh")
RESULTS = "results.json"
SELECT = "select.txt"
LOG_TAIL_LINES = 80


# ---------------------------------------------------------------------------------------------
# guest side


class GuestReporter:
    """Pytest plugin (guest only): folds setup/call/teardown reports into one outcome per node id
    and rewrites ``<outdir>/results.json`` after every report."""

    def __init__(self, outdir: str) -> None:
        self.path = Path(outdir) / RESULTS
        self.data: dict[str, Any] = {
            "kernel": os.uname().release,
            "in_vm": IN_VM,
            "tests": {},
            "collect_errors": {},
            "exitstatus": None,
        }
        self._dump()

    def _dump(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    @staticmethod
    def _text(report: pytest.TestReport) -> str:
        parts = [f"[{report.when}] {report.longreprtext}"]
        parts += [f"----- {name} -----\n{content}" for name, content in report.sections]
        return "\n".join(parts)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.data["collect_errors"][report.nodeid] = report.longreprtext
            self._dump()

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        # "running" until the teardown report: a VM killed mid-test must not read as a pass
        self.data["tests"][nodeid] = {"outcome": "running", "text": ""}
        self.data["running"] = nodeid
        self._dump()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.data["tests"].setdefault(report.nodeid, {"outcome": "running", "text": ""})
        entry["seconds"] = round(entry.get("seconds", 0.0) + report.duration, 2)  # setup+call+teardown
        wasxfail = getattr(report, "wasxfail", None)
        if report.failed:
            if entry["outcome"] != "failed":  # the first failure names the test's problem
                crash = getattr(report.longrepr, "reprcrash", None)
                lines = report.longreprtext.strip().splitlines() or ["failed"]
                where = "" if report.when == "call" else f"[{report.when}] "
                entry["head"] = where + (crash.message if crash else lines[-1])
            entry["outcome"] = "failed"
            entry["text"] += self._text(report) + "\n"
        elif report.skipped and entry["outcome"] == "running":
            if wasxfail is not None:
                entry.update(outcome="xfailed", text=wasxfail)
            else:
                lr = report.longrepr
                reason = lr[2] if isinstance(lr, tuple) else str(lr)
                entry.update(outcome="skipped", text=reason.removeprefix("Skipped: "))
        elif report.when == "call" and report.passed and wasxfail is not None:
            entry.update(outcome="xpassed", text=wasxfail)
        if report.when == "teardown":
            if entry["outcome"] == "running":
                entry["outcome"] = "passed"
            self.data["running"] = None
        self._dump()

    def pytest_sessionfinish(self, exitstatus: int) -> None:
        self.data["exitstatus"] = int(exitstatus)
        self._dump()


def guest_deselect(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In the guest keep only vm tests (and, when the host sent a selection, only those)."""
    select_file = Path(os.environ.get("IMPV4L2_VM_OUT", "/nonexistent")) / SELECT
    wanted = set(select_file.read_text().split("\n")) if select_file.exists() else None
    keep, drop = [], []
    for item in items:
        ok = item.get_closest_marker("vm") is not None and (wanted is None or item.nodeid in wanted)
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# ---------------------------------------------------------------------------------------------
# host side


@contextlib.contextmanager
def machine_lock(kind: str):
    """One guest of ``kind`` boots at a time on this machine: parallel test runs (several
    worktrees) would otherwise share the 2 cores between TCG guests and time each other out."""
    with open(f"/tmp/impv4l2-vm-{kind}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"impv4l2: waiting for another {kind} guest to finish", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def find_kernel() -> tuple[str, str] | str:
    """(image, release) of the kernel to boot, or a reason why there is none."""
    if image := os.environ.get("IMPV4L2_VM_KERNEL"):
        candidates = [image]
    else:
        candidates = sorted(glob.glob("/boot/vmlinuz-6.1.0-*-amd64"),
                            key=lambda p: [int(n) for n in re.findall(r"\d+", Path(p).name)])
    for image in reversed(candidates):
        release = Path(image).name.removeprefix("vmlinuz-")
        if not os.access(image, os.R_OK):
            continue
        if glob.glob(f"/lib/modules/{release}/kernel/fs/fuse/cuse.ko*"):
            return image, release
    return ("no bootable kernel with cuse.ko: looked for "
            f"{candidates or '/boot/vmlinuz-6.1.0-*-amd64'} with /lib/modules/<release>/"
            "kernel/fs/fuse/cuse.ko (apt-get install linux-image-amd64, or scripts/setup.sh --test)")


def find_vng() -> str | None:
    """virtme-ng from the running venv first (it calls virtme-run through PATH, see run())."""
    local = Path(sys.executable).parent / "vng"
    return str(local) if local.exists() else shutil.which("vng")


class VMRun:
    """One boot of the test VM running the given vm test node ids; outcomes via :meth:`outcome`."""

    def __init__(self, rootdir: Path, nodeids: list[str]) -> None:
        self.rootdir = rootdir
        self.nodeids = nodeids
        self.outdir: Path | None = None
        self.log: Path | None = None
        self.error: str | None = None  # set when there are no usable results at all
        self.results: dict[str, Any] = {}
        self.exit_status: int | None = None
        self.seconds = 0.0
        self.release = ""
        self.timeout = float(os.environ.get("IMPV4L2_VM_TIMEOUT", "1500"))
        self.done = False

    def command(self, vng: str, image: str, extra_env: dict[str, str] | None = None) -> list[str]:
        files = sorted({nid.split("::", 1)[0] for nid in self.nodeids})
        guest_pytest = ["-m", "vm", "-p", "no:cacheprovider", "-v", "-rfEsx", "--color=no",
                        f"--rootdir={self.rootdir}", *files]
        # the guest starts with a bare environment: hand over the project's own knobs
        knobs = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("IMPV4L2_")
                 and k not in ("IMPV4L2_IN_VM", "IMPV4L2_SKIP_VM") and not k.startswith("IMPV4L2_VM_")]
        knobs += [f"{k}={v}" for k, v in sorted((extra_env or {}).items())]
        guest_cmd = shlex.join(["env", *knobs, "bash", str(GUEST_SCRIPT), str(self.outdir),
                                sys.executable, *guest_pytest])
        cmd = [vng, "--run", image, "--memory", "2G", "--cpus", "2",
               "--rwdir", str(self.outdir),
               # the project tree is writable in the guest (caches, build outputs), not on the host
               "--overlay-rwdir", str(self.rootdir),
               "--cwd", str(self.rootdir), "--exec", guest_cmd]
        if os.environ.get("IMPV4L2_VM_KVM") != "1":
            cmd.insert(3, "--disable-kvm")
        return cmd

    def run(self) -> None:
        self.done = True
        kernel = find_kernel()
        vng = find_vng()
        if isinstance(kernel, str):
            self.error = kernel
            return
        image, self.release = kernel
        if vng is None:
            self.error = "virtme-ng (vng) not found: pip install virtme-ng (scripts/setup.sh --test)"
            return
        if shutil.which("qemu-system-x86_64") is None:
            self.error = "qemu-system-x86_64 not found: apt-get install qemu-system-x86"
            return
        self.outdir = Path(tempfile.mkdtemp(prefix="impv4l2-vm-"))
        self.log = self.outdir / "vm.log"
        (self.outdir / SELECT).write_text("\n".join(self.nodeids) + "\n")
        # v4l-utils 1.30 for the guest (tests/vm/chroots.py), built once per machine
        chroots = sys.modules["impv4l2_tests_vm_chroots"]
        trixie = chroots.ensure_trixie(self.rootdir)
        extra = {chroots.TRIXIE_ENV: str(trixie)} if isinstance(trixie, Path) else {}
        if not extra:
            print(f"impv4l2 VM stage: no v4l-utils 1.30 chroot: {trixie}", file=sys.stderr)
        cmd = self.command(vng, image, extra)
        env = dict(os.environ, PATH=f"{Path(vng).parent}:{os.environ.get('PATH', '')}")
        with machine_lock("x86"):
            self._boot(cmd, env)

    def _boot(self, cmd: list[str], env: dict[str, str]) -> None:
        assert self.log is not None
        start = time.monotonic()
        with open(self.log, "wb") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            # A pipe, not the file: QEMU reopens its stdout and would truncate a log file.
            # Own session: on timeout the whole tree (vng -> qemu) is killed by its group id.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env, cwd=self.rootdir,
                                    start_new_session=True)
            pump = threading.Thread(target=shutil.copyfileobj, args=(proc.stdout, log, 4096),
                                    daemon=True)
            pump.start()
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                self.error = f"VM run killed after the {self.timeout:.0f} s timeout " \
                             "(IMPV4L2_VM_TIMEOUT)"
            pump.join(timeout=10)
        self.seconds = time.monotonic() - start
        self._load(proc.returncode)

    def _load(self, returncode: int) -> None:
        assert self.outdir is not None
        status = self.outdir / "exit-status"
        if status.exists():
            self.exit_status = int(status.read_text().strip() or -1)
        path = self.outdir / RESULTS
        if not path.exists():
            self.error = (self.error or f"vng exited with status {returncode}") + \
                ": the guest wrote no results (VM did not boot or pytest did not start)"
            return
        data = json.loads(path.read_text())
        # results must come from the kernel we booted, not from a run on the host
        if not data.get("in_vm") or data.get("kernel") != self.release \
                or data.get("kernel") == os.uname().release:
            self.error = (f"results came from kernel {data.get('kernel')!r} (in_vm="
                          f"{data.get('in_vm')}), expected the VM kernel {self.release!r}")
            return
        self.results = data

    def outcome(self, nodeid: str) -> tuple[str, str]:
        """(outcome, text) of one vm test: passed/failed/skipped/xfailed/xpassed/unavailable.
        A failure's text starts with the guest's one-line reason (what the summary line shows)."""
        if not self.done:
            self.run()
        if self.error and not self.results:
            return "unavailable", self.error
        if nodeid in self.results["tests"]:
            entry = self.results["tests"][nodeid]
            if entry["outcome"] == "failed":
                return "failed", f"{entry['head']}\n(failed inside the VM, kernel {self.release})\n\n" \
                                 f"{entry['text']}"
            if entry["outcome"] == "running":
                why = self.error or f"guest pytest exit status {self.exit_status}"
                return "failed", f"did not finish inside the VM ({why})\n" \
                                 f"last {LOG_TAIL_LINES} lines of the VM log:\n{self.log_tail()}"
            return entry["outcome"], entry["text"]
        errors = self.results.get("collect_errors", {})
        mine = {k: v for k, v in errors.items() if nodeid.startswith(k.split("::")[0])}
        why = self.error or f"guest pytest exit status {self.exit_status}"
        detail = "\n".join(f"collect error in {k}:\n{v}" for k, v in mine.items())
        return "failed", f"the guest did not report this test ({why})\n{detail}"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log is None or not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").replace("\r\n", "\n")
        return "\n".join(text.splitlines()[-lines:])

    def module_seconds(self) -> list[tuple[str, float, int]]:
        """(module, guest seconds, tests) slowest first: where the VM stage's budget goes."""
        per: dict[str, list[float]] = {}
        for nodeid, entry in (self.results or {}).get("tests", {}).items():
            per.setdefault(nodeid.split("::")[0], []).append(entry.get("seconds", 0.0))
        return sorted(((m, sum(v), len(v)) for m, v in per.items()), key=lambda r: -r[1])

    def summary(self, keep_log: bool) -> str:
        """One line for the host log; the output directory is removed unless keep_log."""
        where = f"log {self.log}"
        if not keep_log and self.outdir is not None:
            shutil.rmtree(self.outdir, ignore_errors=True)
            where = "log removed (all passed)"
        return (f"VM stage: kernel {self.release or '?'}, {len(self.nodeids)} vm tests, "
                f"boot+run {self.seconds:.1f} s, guest pytest exit status {self.exit_status}, "
                f"{where}")


class VMGuestFailure(Exception):
    """A vm test failed inside the guest; the message is the guest's failure report."""


class VMProxyItem(pytest.Item):
    """Host stand-in for a vm test: same node id, markers and location, no fixtures; its
    runtest reports what the same test did in the guest."""

    def __init__(self, *, original: pytest.Item, vm: VMRun, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.original = original
        self.vm = vm
        self.own_markers.extend(original.own_markers)
        self.keywords.update(dict(original.keywords))

    # skip/skipif/xfail (e.g. "needs /dev/cuse") are the guest's to evaluate, not the host's.
    _GUEST_DECIDES = frozenset({"skip", "skipif", "xfail"})

    def iter_markers_with_node(self, name=None):  # type: ignore[override]
        for node, mark in super().iter_markers_with_node(name):
            if mark.name not in self._GUEST_DECIDES:
                yield node, mark

    def reportinfo(self):  # type: ignore[override]
        return self.original.reportinfo()

    def runtest(self) -> None:
        outcome, text = self.vm.outcome(self.nodeid)
        if outcome in ("passed", "xpassed"):
            return
        if outcome == "skipped":
            # reported at the test's location, not at this line
            raise pytest.skip.Exception(f"in VM: {text}", _use_item_location=True)
        if outcome == "xfailed":
            pytest.xfail(f"in VM: {text}")
        if outcome == "unavailable":
            raise VMGuestFailure(f"VM stage unavailable: {text}\n"
                                 "(set IMPV4L2_SKIP_VM=1 to skip the vm tests instead)")
        raise VMGuestFailure(text)

    def repr_failure(self, excinfo, style=None):  # type: ignore[override]
        if isinstance(excinfo.value, VMGuestFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)


def host_wrap(config: pytest.Config, items: list[pytest.Item]) -> VMRun | None:
    """Replace every selected vm test by a proxy sharing one lazily booted VMRun."""
    vm_items = [i for i in items if i.get_closest_marker("vm") is not None]
    if not vm_items:
        return None
    vm = VMRun(config.rootpath, [i.nodeid for i in vm_items])
    skip = pytest.mark.skip(reason="IMPV4L2_SKIP_VM=1: VM stage not run (real-kernel tests skipped)")
    for n, item in enumerate(items):
        if item.get_closest_marker("vm") is None:
            continue
        if SKIP_VM:
            item.add_marker(skip)
            continue
        items[n] = VMProxyItem.from_parent(item.parent, name=item.name, nodeid=item.nodeid,
                                           original=item, vm=vm)
    return None if SKIP_VM else vm
