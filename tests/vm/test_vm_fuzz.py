"""The ioctl fuzzer on the CUSE door (VM): the unrestricted-ioctl path (FUSE_IOCTL_RETRY with
the regions the daemon asks for, process_vm past the kernel's limits) of plain `impv4l2 serve`.

A CUSE round trip costs milliseconds in the emulated guest, so the VM runs
IMPV4L2_VM_FUZZ_CALLS (default 1,000) per node; the FUSE door gets 50,000 per node on the
host (tests/test_fuzz.py) and 10^6 in benchmarks/bench_fuzz.py.  Afterwards the daemon is
alive, logged no exception, answered only errnos the spec names, and the nodes still work.
"""

from __future__ import annotations

import json
import os
import sys

import impv4l2_tests_vm_served as served
import pytest
from support.paths import CLIENTS

pytestmark = pytest.mark.vm

CALLS = int(os.environ.get("IMPV4L2_VM_FUZZ_CALLS", "1000"))
SEEDS = {"main": 11, "sub": 12, "encoder": 13}


@pytest.fixture(scope="module")
def daemon():
    with served.serving("default", "fuzz", shared=False) as d:  # it leaves odd formats and controls
        yield d


@pytest.mark.parametrize("role", ["main", "sub", "encoder"])
def test_fuzz_cuse_node_then_it_still_works(daemon, role):
    dev = daemon.nodes[role]
    r = served.run(sys.executable, str(CLIENTS / "fuzz.py"), dev, str(CALLS), str(SEEDS[role]), str(daemon.pid),
                   timeout=900)
    out = json.loads(r.stdout)
    print(f"CUSE {role}: {out['calls']} calls, {out['ok']} succeeded, errnos {out['errnos']}")
    assert out["bad"] == {}, out["bad"]
    assert daemon.proc.poll() is None, daemon.text()[-3000:]
    assert "Traceback" not in daemon.text(), daemon.text()[-5000:]
    if role == "encoder":
        served.run("v4l2-ctl", "-d", dev, "--all")
    else:
        w, h = (640, 360) if role == "sub" else (1280, 720)
        s = served.run(sys.executable, str(CLIENTS / "stream.py"), "userptr", dev, "10", str(w), str(h))
        assert s.stdout.split()[:2] == ["OK", "10"], s.stdout
