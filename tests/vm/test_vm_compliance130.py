"""v4l2-compliance 1.30 (Debian trixie's v4l-utils, from a chroot) on every node (VM).

1.30 runs the blocking-wait test (STREAMOFF from a second thread during a blocking DQBUF)
every time, checks MIN_BUFFERS_FOR_OUTPUT on encoders and the REMOVE_BUFS/CREATE_BUFS rules,
and wants G/S_PARM(CAPTURE) of an encoder to fail without ENC_CAP_FRAME_INTERVAL.  The daemon
runs as plain ``serve`` (CUSE + FUSE mount; the CUSE-only topology gets 1.22 in
test_vm_capture.py: the time budget); each node is tested
``-s`` plain (only the tests CUSE cannot serve without mmap may fail, by name) and through the
preload shim (no failures, no warnings but the slow VM's sequence gaps).  vivid runs beside
as the kernel's reference.  Reports go to ``$IMPV4L2_VM_OUT/compliance130-*.txt``.
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
# A CUSE node has no mmap (design.md §3): without the shim, the streaming tests that map
# buffers fail, and nothing else may.  On an M2M node the USERPTR test streams the other
# queue with MMAP (v4l2-test-buffers.cpp setupM2M), so it is one of them there.
CUSE_NO_MMAP = {"main": re.compile(r"^test MMAP\b"), "sub": re.compile(r"^test MMAP\b"),
                "encoder": re.compile(r"^test (MMAP|USERPTR)\b")}
ROLES = ("main", "sub", "encoder")


@pytest.fixture(scope="module")
def daemon():
    with served.serving("default", "compliance130", ROLES) as d:
        yield d


def compliance(dev: str, tag: str, shim: bool) -> tuple[str, tuple[int, int, int, int], list[str]]:
    cmd = [*chroots.chroot_cmd(served.ROOT, "v4l2-compliance"), "-d", dev, *served.COMPLIANCE_STREAMING]
    if shim:
        cmd = [*served.RUN, *cmd]
    r = served.run(*cmd, timeout=600, check=False)
    out = r.stdout + r.stderr
    (served.outdir() / f"compliance130-{tag}.txt").write_text(out)
    m = TOTAL_RE.search(r.stdout)
    assert m, out[-4000:]
    totals = tuple(map(int, m.group(3, 4, 5, 6)))
    print(f"v4l2-compliance 1.30 {tag} {dev}: {m.group(0)}")
    fails = [name for name, res in RESULT_RE.findall(out) if res == "FAIL"]
    assert len(fails) == totals[2], (fails, out[-3000:])
    return out, totals, fails


@pytest.mark.parametrize("via", ["plain", "shim"])
@pytest.mark.parametrize("role", ROLES)
def test_compliance_130(daemon, role, via, record_property):
    """plain: only the tests a CUSE node cannot serve without mmap fail, by name; via the shim:
    no failures, mmap streaming really ran, no warnings but the slow VM's sequence gaps."""
    tag = f"{role}-{daemon.topology}-{via}"
    out, (total, ok, failed, warns), fails = compliance(daemon.nodes[role], tag, shim=via == "shim")
    record_property(f"compliance130_{tag}", f"{total} tests, {failed} failed, {warns} warnings: {fails}")
    assert total > 40, out[-3000:]
    allowed = CUSE_NO_MMAP[role] if via == "plain" else None
    others = [f for f in fails if allowed is None or not allowed.match(f)]
    assert not others, "\n".join(line for line in out.splitlines() if "fail:" in line)
    if via == "shim":
        assert any(line.strip().startswith("test MMAP") and line.strip().endswith("OK")
                   for line in out.splitlines()), out[-3000:]  # the shim's mappings really streamed
        gaps, others = served.compliance_warnings(out)
        assert not others, "\n".join(others)
        assert warns <= len(gaps)


def test_compliance_130_vivid(vivid_device, record_property):
    """The kernel's reference driver in the same VM with the same tool (recorded, not judged)."""
    cmd = [*chroots.chroot_cmd(served.ROOT, "v4l2-compliance"), "-d", vivid_device, *served.COMPLIANCE_STREAMING]
    r = served.run(*cmd, timeout=600, check=False)
    (served.outdir() / "compliance130-vivid.txt").write_text(r.stdout + r.stderr)
    m = TOTAL_RE.search(r.stdout)
    assert m, (r.stdout + r.stderr)[-3000:]
    print(f"v4l2-compliance 1.30 vivid: {m.group(0)}")
    record_property("compliance130_vivid", m.group(0))
