"""The MIPS stage's checks, run INSIDE the mipsel guest (tests/vm/mips.py boots it).

Standard library only: the guest is shaped like a T31 camera (32-bit MIPS LE, Python without
numpy, PyAV or pyudev).  The driver comes from the camera bundle mounted at ``--bundle``
(``impv4l2 bundle --arch mipsel``), never from the source tree; libimp is the project's fake
cross-compiled for mipsel.  Each check is one row of CHECKS; its result (ok, detail, numbers,
seconds) goes to ``<out>/results.json`` as soon as it ends, so a guest that dies midway still
reports what ran.  tests/test_mips.py turns the rows into pytest results on the host.

    python3 guest.py --set main|small --bundle /opt/impv4l2 --fake /opt/fake --out /out
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

CUSE_RE = re.compile(r"(video\d+): CUSE node (/dev/video\d+) \((\w+)\)")
GRANT_RE = re.compile(r"(video\d+).*?(\d+ of \d+ buffers of \d+ bytes granted \(buffer budget: [^)]*\))")
TOTAL_RE = re.compile(r"Total(?: for \S+ device \S+)?: (\d+), Succeeded: (\d+), Failed: (\d+), Warnings: (\d+)")
SEQ_GAP = re.compile(r"got sequence number \d+, expected \d+")
# v4l2-compliance's time32/64 test subscribes three times with SEND_INITIAL and fails when the
# initial events' timestamps lie > 10 ms apart: three CUSE round trips under TCG take longer
# (each ~5-10 ms here; the x86 VM, where they take ~1 ms, passes it with the same code).
TCG_TIMING_FAIL = re.compile(r"v4l2-test-time32-64\.cpp\(\d+\): delta_ms > 10$")
MAIN = (1920, 1080)
SUB = (640, 360)
FPS = 15
NOT_ON_A_CAMERA = ("numpy", "av", "pyudev")


class CheckFailed(Exception):
    """A check's verdict: the message is the detail the host shows."""


class Guest:
    """The daemon from the bundle and the results file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.bin = str(Path(args.bundle) / "bin" / "impv4l2")
        self.results: dict[str, dict] = {}
        self.proc: subprocess.Popen | None = None
        self.log = self.out / f"daemon-{args.set}.log"
        self.nodes: dict[str, str] = {}  # role -> /dev/videoN

    def save(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
        tmp.rename(self.out / "results.json")

    def run(self, name: str, check: Callable[["Guest"], dict | None]) -> None:
        t0 = time.monotonic()
        try:
            numbers, ok, detail = check(self) or {}, True, ""
        except CheckFailed as e:
            numbers, ok, detail = {}, False, str(e)
        except Exception as e:  # a bug in the check itself: still a result, not a lost guest
            numbers, ok, detail = {}, False, f"{type(e).__name__}: {e}"
        self.results[name] = {"ok": ok, "detail": detail[-6000:], "numbers": numbers,
                              "seconds": round(time.monotonic() - t0, 1)}
        print(f"MIPS-CHECK {name} {'ok' if ok else 'FAILED'} {time.monotonic() - t0:.1f} s", flush=True)
        self.save()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # ------------------------------------------------------------ the daemon
    def write_config(self, total_mb: int = 0) -> Path:
        cfg = Path("/tmp/impv4l2.toml")
        # the sensor as thingino's sensor-info module describes it, detected from there
        proc = Path("/tmp/proc-jz-sensor")
        proc.mkdir(exist_ok=True)
        for name, value in (("name", "gc2053"), ("i2c_addr", "0x37"), ("width", MAIN[0]),
                            ("height", MAIN[1]), ("max_fps", FPS)):
            (proc / name).write_text(f"{value}\n")
        budget = f"total_buffer_mb = {total_mb}\n" if total_mb else ""
        cfg.write_text(
            f'backend = "t31"\n[t31]\nproc_root = "{proc}"\n'
            f"[main]\nwidth = {MAIN[0]}\nheight = {MAIN[1]}\nfps = {FPS}\n"
            f"[sub]\nwidth = {SUB[0]}\nheight = {SUB[1]}\nfps = {FPS}\n"
            f'[nodes]\n{budget}[transport]\ncuse = "on"\n[hotplug]\nenable = "off"\n')
        return cfg

    def start(self, total_mb: int = 0, importtime: bool = False) -> float:
        fake = Path(self.args.fake)
        env = dict(os.environ, IMPV4L2_LIBIMP=str(fake / "libimp.so"), IMPFAKE_H264=str(fake / "stream.h264"),
                   IMPFAKE_LOG=str(self.out / f"imp-{self.args.set}.log"))
        if importtime:
            env["PYTHONPROFILEIMPORTTIME"] = "1"
        t0 = time.monotonic()
        self.proc = subprocess.Popen([self.bin, "--config", str(self.write_config(total_mb)), "serve"],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env)
        while "serving " not in self.text():
            if self.proc.poll() is not None or time.monotonic() - t0 > 300:
                raise CheckFailed("the daemon did not come up:\n" + self.text()[-4000:])
            time.sleep(0.2)
        self.nodes = {role: dev for _, dev, role in CUSE_RE.findall(self.text())}
        if not {"main", "sub"} <= set(self.nodes):
            raise CheckFailed(f"no main and sub CUSE nodes: {self.nodes}\n" + self.text()[-3000:])
        return time.monotonic() - t0

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9

    def rss(self) -> dict[str, int]:
        """The daemon's memory in kB (VmRSS = RssAnon + RssFile + RssShmem; shmem is the buffers)."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM|RssAnon|RssFile|RssShmem):\s+(\d+)", status, re.M)}


def sh(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=timeout, **kw)


def nv12_counter(frame: bytes | memoryview, w: int, h: int) -> int:
    """The fake's frame: its sequence number in the first 8 bytes, the rest of Y that number's low byte."""
    seq = struct.unpack_from("<Q", frame)[0]
    ysize = w * h
    if bytes(frame[8:ysize]).count(bytes([seq & 0xFF])) != ysize - 8:
        raise CheckFailed(f"frame {seq}: Y plane is not the fake's pattern")
    return seq


def increasing(counters: list[int], n: int, what: str) -> None:
    if len(counters) != n or any(b <= a for a, b in zip(counters, counters[1:])):
        raise CheckFailed(f"{what}: {len(counters)} frames, counters not strictly increasing: {counters[:40]}")


# ------------------------------------------------------------ checks (main set, 128 MB)
def check_runtime(g: Guest) -> dict:
    """The guest has no numpy, av or pyudev; the running daemon imported none of them."""
    present = [m for m in NOT_ON_A_CAMERA if importlib.util.find_spec(m) is not None]
    if present:
        raise CheckFailed(f"installed in the guest: {present}")
    seconds = g.start(importtime=True)
    imported = re.findall(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$", g.text(), re.M)
    names = {m[3] for m in imported}
    bad = sorted(n for n in names if n.split(".")[0] in NOT_ON_A_CAMERA)
    if not imported or bad:
        raise CheckFailed(f"-X importtime: {len(imported)} modules, forbidden {bad}")
    top = sum(int(m[1]) for m in imported if not m[2].strip(" ") and len(m[2]) == 1)
    return {"start_seconds": round(seconds, 1), "modules_imported": len(names),
            "import_seconds": round(top / 1e6, 1), "machine": os.uname().machine,
            "pointer_bits": struct.calcsize("P") * 8}


def check_v4l2_ctl_user(g: Guest) -> dict:
    """v4l2-ctl --stream-user: 20 frames at 1080p, each byte as the fake made it."""
    w, h = MAIN
    path, size = g.out / "main-user.nv12", w * h * 3 // 2
    r = sh(["v4l2-ctl", "-d", g.nodes["main"], f"--set-fmt-video=width={w},height={h},pixelformat=NV12",
            "--stream-user=4", "--stream-count=20", f"--stream-to={path}"])
    if r.returncode != 0:
        raise CheckFailed(r.stderr.decode()[-2000:] + g.text()[-2000:])
    data = path.read_bytes()
    path.unlink()
    if len(data) != 20 * size:
        raise CheckFailed(f"{len(data)} bytes, expected 20 x {size}")
    view = memoryview(data)
    counters = [nv12_counter(view[i * size:(i + 1) * size], w, h) for i in range(20)]
    increasing(counters, 20, "v4l2-ctl --stream-user")
    return {"frames": 20, "bytes": len(data), "first_last": [counters[0], counters[-1]]}


def ffmpeg(*args: str) -> list[str]:
    return ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]


def check_ffmpeg_streams(g: Guest) -> dict:
    """mipsel ffmpeg through the shim, main NV12 1080p and sub H.264 at once: 100 frames each;
    the daemon's memory sampled meanwhile."""
    w, h = MAIN
    size = w * h * 3 // 2
    run = [g.bin, "run", "--"]
    nv12 = subprocess.Popen(run + ffmpeg("-f", "v4l2", "-input_format", "nv12", "-video_size", f"{w}x{h}",
                                         "-i", g.nodes["main"], "-frames:v", "100", "-fps_mode", "passthrough",
                                         "-f", "rawvideo", "pipe:1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    h264 = subprocess.Popen(run + ffmpeg("-f", "v4l2", "-input_format", "h264", "-video_size", f"{SUB[0]}x{SUB[1]}",
                                         "-i", g.nodes["sub"], "-frames:v", "100", "-c", "copy", "-f", "h264",
                                         str(g.out / "sub.h264")), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    counters, peak = [], {}
    assert nv12.stdout is not None
    while True:
        frame = nv12.stdout.read(size)
        if len(frame) < size:
            break
        counters.append(nv12_counter(frame, w, h))
        rss = g.rss()
        peak = rss if rss.get("VmRSS", 0) > peak.get("VmRSS", 0) else peak
    errs = nv12.stderr.read().decode() if nv12.stderr else ""
    rc_nv12, rc_h264 = nv12.wait(60), h264.wait(600)
    h264_err = h264.stderr.read().decode() if h264.stderr else ""
    if rc_nv12 or rc_h264:
        raise CheckFailed(f"ffmpeg exit {rc_nv12}/{rc_h264}: {errs[-1500:]} {h264_err[-1500:]}\n{g.text()[-2000:]}")
    increasing(counters, 100, "ffmpeg main NV12")
    grants = sorted(set(GRANT_RE.findall(g.text())))
    return {"nv12_frames": len(counters), "nv12_first_last": [counters[0], counters[-1]],
            "h264_bytes": (g.out / "sub.h264").stat().st_size, "rss_kb_at_peak": peak,
            "rss_kb_without_buffers": peak.get("VmRSS", 0) - peak.get("RssShmem", 0),
            "grants": [f"{n}: {t}" for n, t in grants]}


def compliance(role: str) -> Callable[[Guest], dict]:
    def check(g: Guest) -> dict:
        """mipsel v4l2-compliance -s through the shim: 0 failures, warnings only sequence gaps."""
        r = sh([g.bin, "run", "--", "v4l2-compliance", "-d", g.nodes[role], "-s20"], timeout=900)
        out = r.stdout.decode(errors="replace")
        (g.out / f"compliance-{role}.txt").write_text(out)
        m = TOTAL_RE.search(out)
        if not m:
            raise CheckFailed(out[-3000:] + r.stderr.decode()[-1500:])
        total, ok, failed, warnings = map(int, m.groups())
        all_fails = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("fail:")]
        fails = [f for f in all_fails if not TCG_TIMING_FAIL.search(f)]
        ws = re.findall(r"warn: (.*)", out)
        other = [w for w in ws if not SEQ_GAP.search(w)]
        numbers = {"total": total, "succeeded": ok, "failed": failed, "warnings": warnings,
                   "sequence_gap_warnings": len(ws) - len(other),
                   "tcg_event_timing_failures": len(all_fails) - len(fails)}
        if failed > len(all_fails) - len(fails) or fails or other:
            raise CheckFailed(f"{m.group(0)}\n" + "\n".join(fails + other) + "\n" + out[-2500:])
        return numbers
    return check


def check_clean_exit(g: Guest) -> dict:
    """SIGTERM: exit 0, and the fake saw every stream closed and no violation."""
    rc = g.stop()
    log = (g.out / f"imp-{g.args.set}.log").read_text(errors="replace")
    exits = [ln for ln in log.splitlines() if ln.startswith("EXIT ")]
    summary = {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", exits[-1])} if exits else {}
    if rc != 0 or not summary or summary.get("open") or summary.get("errors"):
        raise CheckFailed(f"exit {rc}, fake: {exits}\n{g.text()[-3000:]}")
    return {"exit": rc, **summary}


# ------------------------------------------------------------ the small T31 (64 MB)
def check_small_h264(g: Guest) -> dict:
    """64 MB: main and sub H.264 streaming together for --seconds, no OOM, every frame intact."""
    mem = {k: int(v) for k, v in re.findall(r"^(MemTotal|MemAvailable):\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)}
    g.start(total_mb=g.args.budget_mb)
    frames = g.args.seconds * FPS
    clients = {role: subprocess.Popen(
        ["v4l2-ctl", "-d", g.nodes[role], f"--set-fmt-video=width={w},height={h},pixelformat=H264",
         "--stream-user=4", f"--stream-count={frames}", f"--stream-to={g.out / (role + '.h264')}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for role, (w, h) in (("main", MAIN), ("sub", SUB))}
    peak: dict[str, int] = {}
    t0 = time.monotonic()
    while any(p.poll() is None for p in clients.values()) and time.monotonic() - t0 < g.args.seconds * 4 + 120:
        rss = g.rss()
        peak = rss if rss.get("VmRSS", 0) > peak.get("VmRSS", 0) else peak
        time.sleep(1)
    elapsed = time.monotonic() - t0
    rcs = {role: (p.poll(), p.stderr.read().decode()[-800:] if p.stderr else "") for role, p in clients.items()}
    for p in clients.values():
        if p.poll() is None:
            p.kill()
    dmesg = sh(["dmesg"]).stdout.decode(errors="replace")
    oom = [ln for ln in dmesg.splitlines() if re.search(r"out of memory|oom-kill|invoked oom", ln, re.I)]
    rc = g.stop()
    if oom or rc != 0 or any(code != 0 for code, _ in rcs.values()):
        raise CheckFailed(f"clients {rcs}, daemon exit {rc}, OOM: {oom}\n{g.text()[-3000:]}")
    return {"mem_kb": mem, "frames_each": frames, "seconds": round(elapsed, 1), "rss_kb_at_peak": peak,
            "grants": [f"{n}: {t}" for n, t in sorted(set(GRANT_RE.findall(g.text())))]}


CHECKS: dict[str, list[tuple[str, Callable[[Guest], dict | None]]]] = {
    "main": [("runtime", check_runtime), ("v4l2_ctl_user", check_v4l2_ctl_user),
             ("ffmpeg_streams", check_ffmpeg_streams), ("compliance_main", compliance("main")),
             ("compliance_sub", compliance("sub")), ("clean_exit", check_clean_exit)],
    "small": [("small_h264", check_small_h264)],
}
NEEDS_DAEMON = {"v4l2_ctl_user", "ffmpeg_streams", "compliance_main", "compliance_sub", "clean_exit"}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--set", choices=sorted(CHECKS), required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--fake", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=int, default=60)
    p.add_argument("--budget-mb", type=int, default=0)
    args = p.parse_args()
    g = Guest(args)
    try:
        for name, check in CHECKS[args.set]:
            if name in NEEDS_DAEMON and (g.proc is None or g.proc.poll() is not None):
                g.results[name] = {"ok": False, "detail": "no daemon running (an earlier check failed)",
                                   "numbers": {}, "seconds": 0}
                g.save()
                continue
            g.run(name, check)
    finally:
        if g.proc is not None and g.proc.poll() is None:
            g.proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
