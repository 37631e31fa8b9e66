"""Fuzz the real daemon: tests/clients/fuzz.py against every node of `impv4l2 serve` (FUSE door).

    python benchmarks/bench_fuzz.py [--calls 1000000] [--seed 7]

Starts `impv4l2 serve --cuse off` on a temporary mount, fuzzes each node in turn from a client
process, then checks the daemon is alive and logged no exception, and that each capture node
still streams.  Prints a table: calls, calls/s, successes, the top errnos, out-of-spec errnos,
daemon RSS before/after.  (In the VM, the CUSE door: tests/vm/test_vm_fuzz.py.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import rss_bytes  # noqa: E402

CLIENTS = ROOT / "tests" / "clients"
NODE_RE = re.compile(r"(video\d+): FUSE file (\S+) \((\w+),")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1_000_000, help="ioctls per node")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="impv4l2-bench-fuzz-"))
    cfg, log = tmp / "impv4l2.toml", tmp / "daemon.log"
    cfg.write_text(textwrap.dedent(f"""
        [transport]
        cuse = "off"
        mount = "{tmp / 'mnt'}"
        dev_links = false
    """))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    daemon = subprocess.Popen([sys.executable, "-m", "impv4l2.cli", "--config", str(cfg), "serve"],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while "serving " not in log.read_text():
            if daemon.poll() is not None or time.monotonic() > deadline:
                print(log.read_text())
                return 1
            time.sleep(0.1)
        nodes = {role: path for _, path, role in NODE_RE.findall(log.read_text())}
        print("| node | calls | calls/s | ok | top errnos | out of spec | daemon RSS MiB before/after | streams after |")
        print("|---|---|---|---|---|---|---|---|")
        for role, path in nodes.items():
            rss0 = rss_bytes(daemon.pid)
            t0 = time.monotonic()
            r = subprocess.run([sys.executable, str(CLIENTS / "fuzz.py"), path, str(args.calls), str(args.seed),
                                str(daemon.pid)], capture_output=True, text=True, env=env)
            dt = time.monotonic() - t0
            if r.returncode != 0 or daemon.poll() is not None:
                print(f"| {role} | fuzz client failed ({r.returncode}); daemon {daemon.poll()} | {r.stderr[-500:]}")
                return 1
            out = json.loads(r.stdout)
            top = ", ".join(f"{k} {v}" for k, v in list(out["errnos"].items())[:4])
            streams = "-"
            if role != "encoder":
                s = subprocess.run([sys.executable, str(CLIENTS / "stream.py"), "userptr", path, "10", "640", "360"],
                                   capture_output=True, text=True, env=env, timeout=120)
                streams = "yes" if s.stdout.startswith("OK 10") else f"NO: {s.stdout.strip()} {s.stderr[-200:]}"
            print(f"| {role} | {args.calls:,} | {args.calls / dt:,.0f} | {out['ok']:,} | {top} | "
                  f"{sum(out['bad'].values())} {out['bad'] or ''} | {rss0 / 2**20:.1f} / "
                  f"{rss_bytes(daemon.pid) / 2**20:.1f} | {streams} |")
        text = log.read_text()
        print(f"\ndaemon alive: {daemon.poll() is None}; exceptions logged: {text.count('Traceback')}")
        return 0 if daemon.poll() is None and "Traceback" not in text else 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)


if __name__ == "__main__":
    sys.exit(main())
