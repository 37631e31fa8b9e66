"""Soak: 8 clients on the real daemon for a while, counters sampled, leaks and losses reported.

    python benchmarks/soak.py [--minutes 60] [--interval 10] [--json OUT]

Starts `impv4l2 serve` (CUSE when the kernel has it, the FUSE mount always; the clients use
the FUSE files, or the CUSE nodes with --door cuse), then runs, across main, sub and encoder:
  1 main keep-up      MMAP NV12 for the whole run (goal: 0 frames lost)
  2 encoder keep-up   M2M NV12 -> H.264 for the whole run, drained at the end (goal: in == out)
  3 sub rotation      one after another: NV12/YUYV/H.264/MJPEG, MMAP/USERPTR, 1-6 s each,
                      40 % of them killed with SIGKILL at a random moment
  4 encoder churn     short M2M sessions, half of them killed with SIGKILL
  5-7 openers         open/query/REQBUFS(EBUSY)/close loops on main, sub and encoder,
                      now and then killed with SIGKILL and restarted
  8 controls          ISP controls set 100 times a second on sub
Every --interval seconds the daemon's fds, threads, RSS, memfd bytes, open files, handles and
parked requests are recorded (SIGUSR2 makes it log its own counters).  At the end: the
keep-up clients' losses, each counter's first/last/min/max and its trend (least-squares
slope per hour), and the counters after every client is gone against those before the first.
Exit status 0 when the goals hold: no loss, and fds/threads/handles/parked/open files back
at their starting values.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

CLIENT = ROOT / "tests" / "clients" / "soak_client.py"
FUSE_RE = re.compile(r"(video\d+): FUSE file (\S+) \((\w+),")
CUSE_RE = re.compile(r"(video\d+): CUSE node (/dev/video\d+) \((\w+)\)")
STATS_RE = re.compile(r"stats: (\{.*\})$", re.M)
FLAT = ("fds", "threads", "handles", "parked", "open_files")
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def client(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CLIENT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


class Daemon:
    def __init__(self, tmp: Path, door: str) -> None:
        self.log = tmp / "daemon.log"
        cfg = tmp / "impv4l2.toml"
        cfg.write_text(textwrap.dedent(f"""
            [main]
            width = 1280
            height = 720
            [transport]
            mount = "{tmp / 'mnt'}"
            dev_links = false
            cuse = "{'on' if door == 'cuse' else 'auto'}"
        """))
        self.proc = subprocess.Popen([sys.executable, "-m", "impv4l2.cli", "--config", str(cfg), "serve"],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + 120
        while "serving " not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon did not start:\n{self.text()}")
            time.sleep(0.1)
        regex = CUSE_RE if door == "cuse" else FUSE_RE
        self.paths = {role: path for _, path, role in regex.findall(self.text())}

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def sample(self) -> dict:
        n = len(STATS_RE.findall(self.text()))
        os.kill(self.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while len(found := STATS_RE.findall(self.text())) <= n:
            if time.monotonic() > deadline:
                raise SystemExit("daemon did not answer SIGUSR2")
            time.sleep(0.05)
        s = json.loads(found[-1])
        s["memfd_bytes"] = sum(s["memfd_bytes"].values())
        s["rss_mib"] = round(rss_bytes(self.proc.pid) / 2**20, 1)
        return s

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


class Rotation:
    """A client role restarted whenever it ends, killed with SIGKILL at random moments."""

    def __init__(self, name: str, make, kill_p: float, rng: random.Random) -> None:
        self.name, self.make, self.kill_p, self.rng = name, make, kill_p, rng
        self.proc: subprocess.Popen | None = None
        self.kill_at = 0.0
        self.runs = self.killed = self.failed = 0
        self.errors: list[str] = []

    def tick(self, now: float, stopping: bool) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.kill_at and now >= self.kill_at:
                self.proc.kill()
                self.proc.wait()
                self.killed += 1
                self.proc = None
            return
        if self.proc is not None:  # ended by itself: it must have said something sane
            out = self.proc.stdout.read().strip()
            ended_by_us = stopping and self.proc.returncode == -signal.SIGTERM  # before its handler was set
            if (self.proc.returncode != 0 and not ended_by_us) or '"error"' in out:
                self.failed += 1
                self.errors.append(f"exit {self.proc.returncode}: {out} {self.proc.stderr.read()[-300:]}")
            self.proc = None
        if stopping:
            return
        self.proc = self.make(self.rng)
        self.runs += 1
        self.kill_at = now + self.rng.uniform(0.05, 4.0) if self.rng.random() < self.kill_p else 0.0


def trend_per_hour(points: list[tuple[float, float]]) -> float:
    if len(points) < 3:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points) or 1.0
    return sum((t - mx) * (v - my) for t, v in points) / den * 3600


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--interval", type=float, default=10)
    ap.add_argument("--door", choices=["fuse", "cuse"], default="fuse")
    ap.add_argument("--json", help="write the samples and the verdict here")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="impv4l2-soak-"))
    d = Daemon(tmp, args.door)
    p = d.paths
    seconds = args.minutes * 60
    baseline = d.sample()
    t0 = time.monotonic()
    keep_main = client("capture", p["main"], seconds, "mmap", "NV12", 1280, 720)
    keep_enc = client("m2m", p["encoder"], seconds, 320, 240)
    fmts = [("NV12", 640, 360), ("YUYV", 640, 360), ("H264", 640, 360), ("MJPG", 640, 360)]
    roles = [
        Rotation("sub rotation", lambda r: client("capture", p["sub"], r.uniform(1, 6), r.choice(["mmap", "userptr"]),
                                                  *r.choice(fmts)), 0.4, rng),
        Rotation("encoder churn", lambda r: client("m2m", p["encoder"], r.uniform(0.5, 4), 160, 120), 0.5, rng),
        *[Rotation(f"opener {role}", lambda r, role=role: client("opener", p[role], r.uniform(1, 8)), 0.3, rng)
          for role in ("main", "sub", "encoder")],
        Rotation("controls", lambda r: client("controls", p["sub"], r.uniform(2, 10)), 0.2, rng),
    ]
    samples = [{"t": 0.0, **baseline}]
    next_sample = t0 + args.interval
    print(f"soak: {args.minutes:g} min, door {args.door}, daemon pid {d.proc.pid}, log {d.log}", flush=True)
    while (now := time.monotonic()) < t0 + seconds:
        for r in roles:
            r.tick(now, False)
        if now >= next_sample:
            samples.append({"t": round(now - t0, 1), **d.sample()})
            # live, so a run cut short still leaves its trend in the output
            print("sample " + json.dumps(samples[-1]), flush=True)
            next_sample += args.interval
        time.sleep(0.05)
    for r in roles:
        if r.proc is not None and r.proc.poll() is None:
            r.proc.send_signal(signal.SIGTERM)
    for r in roles:
        if r.proc is not None:
            try:
                r.proc.wait(40)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.failed += 1
                r.errors.append("did not stop on SIGTERM")
        r.tick(time.monotonic(), True)
    results = {}
    for name, proc in (("main keep-up", keep_main), ("encoder keep-up", keep_enc)):
        try:
            out, err = proc.communicate(timeout=60)
            results[name] = json.loads(out) if out.strip() else {"error": err[-500:]}
        except (subprocess.TimeoutExpired, ValueError) as e:
            proc.kill()
            results[name] = {"error": f"no result: {e}"}
    time.sleep(1.0)  # let the releases of the last clients land
    final = d.sample()
    samples.append({"t": round(time.monotonic() - t0, 1), **final})
    d.stop()

    keys = ["fds", "threads", "rss_mib", "memfd_bytes", "open_files", "handles", "parked"]
    print("\n| t (s) | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for s in samples:
        print(f"| {s['t']:.0f} | " + " | ".join(str(s[k]) for k in keys) + " |")
    print("\n| counter | before clients | after clients | min | max | trend per hour |\n|---|---|---|---|---|---|")
    for k in keys:
        vals = [s[k] for s in samples]
        pts = [(s["t"], s[k]) for s in samples[1:-1]]  # while the clients ran
        print(f"| {k} | {baseline[k]} | {final[k]} | {min(vals)} | {max(vals)} | {trend_per_hour(pts):+.1f} |")
    print("\n| client | runs | killed -9 | failed |\n|---|---|---|---|")
    for r in roles:
        print(f"| {r.name} | {r.runs} | {r.killed} | {r.failed} |")
    print("\n| keep-up client | result |\n|---|---|")
    for name, res in results.items():
        print(f"| {name} | {json.dumps(res)} |")
    lost = results["main keep-up"].get("gaps", -1), results["encoder keep-up"].get("lost", -1)
    leaked = {k: (baseline[k], final[k]) for k in FLAT if final[k] != baseline[k]}
    failures = {r.name: r.errors[:3] for r in roles if r.failed}
    ok = lost == (0, 0) and results["encoder keep-up"].get("drained") and not leaked and not failures \
        and "Traceback" not in d.text()
    verdict = {"ok": bool(ok), "lost": lost, "leaked": leaked, "client_failures": failures,
               "exceptions": d.text().count("Traceback")}
    print(f"\nverdict: {json.dumps(verdict)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": samples, "results": results, "verdict": verdict}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
