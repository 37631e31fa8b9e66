"""The soak (benchmarks/soak.py) in CI: 2 minutes of 8 clients on the real daemon (FUSE door).

The full run is an hour (`python benchmarks/soak.py`); IMPV4L2_SOAK_MINUTES sets this one.
Goals: the keep-up clients lose no frame (capture: no sequence gap; encoder: every frame in
comes out, drained with LAST), no client fails, and the daemon's fds, threads, open files,
handles and parked requests are back at their starting values once every client is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support.paths import ROOT

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse")]

MINUTES = float(os.environ.get("IMPV4L2_SOAK_MINUTES", "2"))


@pytest.mark.skipif(MINUTES <= 0, reason="IMPV4L2_SOAK_MINUTES=0")
def test_soak(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", str(MINUTES),
                        "--interval", "10", "--json", str(out)], capture_output=True, text=True,
                       timeout=MINUTES * 60 + 240, cwd=ROOT)
    print(r.stdout)
    verdict = json.loads(out.read_text())["verdict"] if out.exists() else {}
    assert r.returncode == 0 and verdict.get("ok"), f"{verdict}\n{r.stdout[-4000:]}\n{r.stderr[-3000:]}"
