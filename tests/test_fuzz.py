"""The ioctl fuzzer (tests/clients/fuzz.py) against every node on the FUSE door (host).

50,000 random and malformed ioctls per node from a client process (IMPV4L2_FUZZ_CALLS to
change; benchmarks/bench_fuzz.py runs 10^6): the daemon side never raises (no EIO, no
logged exception), answers only errnos the V4L2 spec names for each ioctl, and every node
still works afterwards — the capture nodes stream, the encoder encodes.  The CUSE door
gets the same fuzzer in the VM (tests/vm/test_vm_fuzz.py).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from impv4l2.driver import load_backend
from impv4l2.v4l2.encoder import EncoderNode

from support.encoder_client import M2MClient, make_frame, texture
from support.mounted import capture_nodes, served_on_mount
from support.paths import CLIENTS, ROOT

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse")]

CALLS = int(os.environ.get("IMPV4L2_FUZZ_CALLS", "50000"))
SEEDS = {"main": 1, "sub": 2, "encoder": 3}  # reproducible: the same calls every run


def run_client(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLIENTS / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.fixture(scope="module")
def served():
    backend = load_backend("sim", fps=30)
    main, sub = capture_nodes(backend)
    nodes = {"main": main, "sub": sub, "encoder": EncoderNode("video12", backend)}
    with served_on_mount(list(nodes.values()), "impv4l2-fuzz-") as paths:
        yield nodes, dict(zip(nodes, paths))
    backend.close()


@pytest.mark.parametrize("role", ["main", "sub", "encoder"])
def test_fuzz_node_then_it_still_works(served, role, caplog):
    nodes, paths = served
    with caplog.at_level(logging.WARNING, "impv4l2"):
        r = run_client("fuzz.py", paths[role], str(CALLS), str(SEEDS[role]), str(os.getpid()))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    print(f"{role}: {out['calls']} calls, {out['ok']} succeeded, errnos {out['errnos']}")
    assert out["bad"] == {}, out["bad"]
    assert "EIO" not in out["errnos"], out["by_ioctl"]
    crashed = [rec for rec in caplog.records if rec.exc_info]
    assert not crashed, "\n".join(rec.getMessage() for rec in crashed[:5])
    if role == "encoder":
        c = M2MClient(nodes[role], 320, 240, n_out=2, n_cap=2, pid=4242)
        c.streamon()
        tex = texture(320, 240)
        res = c.encode([make_frame(tex, i, 320, 240) for i in range(10)])
        assert len(res) == 10 and all(len(au) for _, au in res)
        c.close()
    else:
        w, h = (640, 360) if role == "sub" else (1280, 720)
        s = run_client("stream.py", "userptr", paths[role], "10", str(w), str(h), timeout=120)
        assert s.stdout.split()[:2] == ["OK", "10"], s.stdout + s.stderr[-2000:]
