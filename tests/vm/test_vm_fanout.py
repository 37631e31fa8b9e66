"""v4l2-compliance on a fan-out node (VM): `impv4l2 serve` with ``[main] nodes = 2``.

``main-2`` is a second capture node on the main frame channel, with the vb2 rules of every
node (a second file taking its queue gets EBUSY).  v4l2-compliance 1.22 ``-s`` must give it
the totals it gives ``main`` of the same daemon (run one after the other: the channel has one
size at a time), failing only the MMAP streaming tests a CUSE node cannot serve without the
shim; v4l2-compliance 1.30 through the preload shim must pass every test on it.  Reports go
to ``$IMPV4L2_VM_OUT/compliance-fanout-*.txt``.
"""

from __future__ import annotations

import re

import impv4l2_tests_vm_chroots as chroots
import impv4l2_tests_vm_served as served
import pytest

pytestmark = pytest.mark.vm

TOTAL_RE = re.compile(r"^Total for (\S+) device (\S+): (\d+), Succeeded: (\d+), Failed: (\d+), "
                      r"Warnings: (\d+)$", re.M)
RESULT_RE = re.compile(r"^\s*(test .+?): (OK|FAIL)(?: \(Not Supported\))?$", re.M)
CUSE_MMAP_RE = re.compile(r"^test MMAP\b")
ROLES = ("main", "main-2", "sub", "encoder")


class FanoutDaemon(served.ServedDaemon):
    """Plain `impv4l2 serve` (CUSE + the FUSE mount) with a configuration of two main nodes."""

    def __init__(self) -> None:
        super().__init__("default", "fanout", ROLES)
        cfg = served.outdir() / "impv4l2-fanout.toml"
        cfg.write_text("[main]\nnodes = 2\n")
        self.args = ["--config", str(cfg)]


@pytest.fixture(scope="module")
def daemon():
    served.stop_shared()  # one daemon at a time: the names and the mount are the same
    d = FanoutDaemon().start()
    served.CURRENT = d
    try:
        yield d
    finally:
        served.CURRENT = None
        d.stop()


def compliance(cmd: list[str], tag: str) -> tuple[str, tuple[int, int, int, int], list[str]]:
    r = served.run(*cmd, timeout=600, check=False)
    out = r.stdout + r.stderr
    (served.outdir() / f"compliance-fanout-{tag}.txt").write_text(out)
    m = TOTAL_RE.search(r.stdout)
    assert m, out[-4000:]
    totals = tuple(map(int, m.group(3, 4, 5, 6)))
    fails = [name for name, res in RESULT_RE.findall(out) if res == "FAIL"]
    print(f"v4l2-compliance {tag}: {m.group(0)}; failing: {fails}")
    assert len(fails) == totals[2], (fails, out[-3000:])
    return out, totals, fails


def test_main_2_has_the_totals_of_main(daemon, record_property):
    results = {}
    for role in ("main", "main-2"):
        out, totals, fails = compliance(["v4l2-compliance", "-d", daemon.nodes[role],
                                         *served.COMPLIANCE_STREAMING], f"{role}-122")
        record_property(f"compliance_fanout_{role}", f"{totals}: {fails}")
        others = [f for f in fails if not CUSE_MMAP_RE.match(f)]
        assert not others, "\n".join(line for line in out.splitlines() if "fail:" in line)
        _, warnings = served.compliance_warnings(out)
        assert not warnings, "\n".join(warnings)
        results[role] = (totals[0], totals[1], totals[2], fails)
    assert results["main-2"] == results["main"], results  # tests, successes, failures, by name


def test_main_2_compliance_130_via_the_shim(daemon, record_property):
    cmd = [*served.RUN, *chroots.chroot_cmd(served.ROOT, "v4l2-compliance"), "-d", daemon.nodes["main-2"],
           *served.COMPLIANCE_STREAMING]
    out, (total, ok, failed, warns), fails = compliance(cmd, "main-2-130-shim")
    record_property("compliance130_fanout_main-2", f"{total} tests, {failed} failed, {warns} warnings")
    assert total > 40 and failed == 0, "\n".join(line for line in out.splitlines() if "fail:" in line)
    assert any(line.strip().startswith("test MMAP") and line.strip().endswith("OK")
               for line in out.splitlines()), out[-3000:]  # mmap streaming really ran
    gaps, others = served.compliance_warnings(out)
    assert not others, "\n".join(others)
    assert warns <= len(gaps)


def test_a_second_handle_on_main_2_gets_ebusy_while_main_streams(daemon):
    """vb2 on every node: v4l2-ctl streaming main-2 keeps its queue; a second v4l2-ctl on
    main-2 cannot take it, while main streams beside them from the same channel."""
    import subprocess
    import time

    names = {role: daemon.nodes[role].rsplit("/", 1)[1] for role in ("main", "main-2")}
    before = {n: daemon.text().count(f"{n}: streaming") for n in names.values()}
    clients = [subprocess.Popen([*served.RUN, "v4l2-ctl", "-d", daemon.nodes[role], "--stream-mmap",
                                 "--stream-count=100000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True) for role in ("main", "main-2")]
    try:
        # `impv4l2 run` + v4l2-ctl take ~10 s to start in the emulated guest: wait for both
        deadline = time.monotonic() + 180
        while not all(daemon.text().count(f"{n}: streaming") > before[n] for n in names.values()):
            assert time.monotonic() < deadline and all(c.poll() is None for c in clients), daemon.text()[-3000:]
            time.sleep(0.5)
        second = served.run("v4l2-ctl", "-d", daemon.nodes["main-2"], "--stream-user", "--stream-count=3",
                            check=False, timeout=120)
        assert all(c.poll() is None for c in clients)  # both still streaming
        assert "Device or resource busy" in second.stderr + second.stdout, second  # REQBUFS: EBUSY
    finally:
        for c in clients:
            c.terminate()
            c.communicate(timeout=60)
