"""The MIPS stage's checks, run INSIDE the mipsel guest (tests/vm/mips.py boots it).

Standard library only: the guest is shaped like a T31 camera (32-bit MIPS LE, Python without
numpy, PyAV or pyudev).  The driver comes from the camera bundle mounted at ``--bundle``
(``impv4l2 bundle --arch mipsel``), never from the source tree; libimp is the project's fake
cross-compiled for mipsel.  Each check is one row of CHECKS; its result (ok, detail, numbers,
seconds) goes to ``<out>/results.json`` as soon as it ends, so a guest that dies midway still
reports what ran.  tests/mips/test_mips.py turns the rows into pytest results on the host.

    python3 guest.py --set main|small --bundle /opt/impv4l2 --fake /opt/fake --out /out
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
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
# A stream of the daemon's log: "videoN: streaming <fmt> WxH@F" ... "videoN: stopped (F frames, D dropped)"
STREAM_RE = re.compile(r"^(\S+ \S+) INFO impv4l2\.v4l2: (video\d+): (?:streaming .*@(\d+)|stopped \((\d+) frames, (\d+) dropped\))$", re.M)
MAIN = (1920, 1080)
SUB = (640, 360)
# The sensor's rate per set (its max_fps and both channels').  Under TCG the daemon needs
# ~90-110 ms of the one emulated CPU per frame (cpu_per_frame), so at the T31's 15 fps the
# guest is over-committed and drops most frames; at 5 fps it delivers every frame to a simple
# client.  v4l2-compliance's select/USERPTR loops still see a few sequence gaps at 5 fps: the
# compliance numbers' CPU split shows the daemon, not the client, using most of the guest then
# (the open gap of issue 14: CPU per frame vs the floor), so they are counted, not hidden.
# The 64 MB set streams H.264 at 15.
SET_FPS = {"main": 5, "small": 15}
NOT_ON_A_CAMERA = ("numpy", "av", "pyudev")


class CheckFailed(Exception):
    """A check's verdict: the message is the detail the host shows; ``numbers`` what was measured."""

    def __init__(self, detail: str, numbers: dict | None = None) -> None:
        super().__init__(detail)
        self.numbers = numbers or {}


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
        self.names: dict[str, str] = {}  # role -> videoN (the daemon log's name)
        self.start_seconds = 0.0
        self.fps = SET_FPS[args.set]
        self.hw: dict[str, subprocess.Popen] = {}  # hot-plug stand-ins: "name,name" -> their server

    def save(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
        tmp.rename(self.out / "results.json")

    def run(self, name: str, check: Callable[["Guest"], dict | None]) -> None:
        t0 = time.monotonic()
        try:
            numbers, ok, detail = check(self) or {}, True, ""
        except CheckFailed as e:
            numbers, ok, detail = e.numbers, False, str(e)
        except Exception as e:  # a bug in the check itself: still a result, not a lost guest
            numbers, ok, detail = {}, False, f"{type(e).__name__}: {e}"
        self.results[name] = {"ok": ok, "detail": detail[-6000:], "numbers": numbers,
                              "seconds": round(time.monotonic() - t0, 1)}
        print(f"MIPS-CHECK {name} {'ok' if ok else 'FAILED'} {time.monotonic() - t0:.1f} s", flush=True)
        self.save()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # ------------------------------------------------------------ the daemon
    def write_config(self, total_mb: int = 0, hotplug: bool = False) -> Path:
        cfg = Path("/tmp/impv4l2.toml")
        # the sensor as thingino's sensor-info module describes it, detected from there
        proc = Path("/tmp/proc-jz-sensor")
        proc.mkdir(exist_ok=True)
        for name, value in (("name", "gc2053"), ("i2c_addr", "0x37"), ("width", MAIN[0]),
                            ("height", MAIN[1]), ("max_fps", self.fps)):
            (proc / name).write_text(f"{value}\n")
        budget = f"total_buffer_mb = {total_mb}\n" if total_mb else ""
        cfg.write_text(
            f'backend = "t31"\n[t31]\nproc_root = "{proc}"\n'
            f"[main]\nwidth = {MAIN[0]}\nheight = {MAIN[1]}\nfps = {self.fps}\n"
            f"[sub]\nwidth = {SUB[0]}\nheight = {SUB[1]}\nfps = {self.fps}\n"
            f'[nodes]\n{budget}[transport]\ncuse = "on"\n[hotplug]\nenable = "{"on" if hotplug else "off"}"\n')
        return cfg

    def start(self, total_mb: int = 0, importtime: bool = False, hotplug: bool = False) -> float:
        """Start the daemon; seconds until it serves main and sub (with ``hotplug``: until it
        waits for the hardware, the T31 default devices tx-isp, avpu, framechan*)."""
        fake = Path(self.args.fake)
        env = dict(os.environ, IMPV4L2_LIBIMP=str(fake / "libimp.so"), IMPFAKE_H264=str(fake / "stream.h264"),
                   IMPFAKE_LOG=str(self.out / f"imp-{self.args.set}.log"))
        if importtime:
            env["PYTHONPROFILEIMPORTTIME"] = "1"
        t0 = time.monotonic()
        self.proc = subprocess.Popen([self.bin, "--config", str(self.write_config(total_mb, hotplug)), "serve"],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env)
        if hotplug:
            self.wait_log("waiting for the hardware: ", 1, 300)
        else:
            self.wait_nodes(1, 300)
        self.start_seconds = time.monotonic() - t0
        return self.start_seconds

    def wait_log(self, text: str, count: int, timeout: float) -> None:
        """Until the daemon's log holds ``text`` ``count`` times (it must stay alive meanwhile)."""
        assert self.proc is not None
        t0 = time.monotonic()
        while self.text().count(text) < count:
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise CheckFailed(f"no {count} x {text!r} in the daemon's log:\n" + self.text()[-4000:])
            time.sleep(0.2)

    def wait_nodes(self, count: int, timeout: float) -> None:
        """Until the daemon served its nodes the ``count``-th time; their names from its log."""
        self.wait_log("serving ", count, timeout)
        found = CUSE_RE.findall(self.text())
        self.nodes = {role: dev for _, dev, role in found}
        self.names = {role: name for name, _, role in found}
        if not {"main", "sub"} <= set(self.nodes):
            raise CheckFailed(f"no main and sub CUSE nodes: {self.nodes}\n" + self.text()[-3000:])

    def hardware(self, names: str) -> subprocess.Popen:
        """CUSE devices named as the T31's vendor modules' (/dev/tx-isp, ...): the kernel sends
        their add uevents, and remove ones when the process ends (the benchmark's raw CUSE
        server, which answers nothing the daemon would ask: it asks nothing)."""
        p = subprocess.Popen([sys.executable, str(Path(self.args.bench) / "bench_cpu_per_frame.py"),
                              "--floor", names], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             env=dict(os.environ, PYTHONPATH=str(Path(self.args.bundle) / "lib" / "python"),
                                      PYTHONDONTWRITEBYTECODE="1"))
        self.hw[names] = p
        return p

    def unplug(self) -> None:
        for p in self.hw.values():
            if p.poll() is None:
                p.kill()
                p.wait()

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
# The hot-plug stand-ins, one process each: framechan0 goes and comes back on its own.
HARDWARE = ("tx-isp,avpu", "framechan0")


def check_hotplug(g: Guest) -> dict:
    """Hot-plug without udev (kernel uevents from netlink): the daemon, started with hot-plug on
    before the T31's devices exist, serves nothing; they appear (add uevents) and the nodes
    come up; framechan0 goes (remove) and they go; it comes back and they are back."""
    try:
        return _hotplug(g)
    except BaseException:
        g.stop()  # the checks after this one start a daemon without hot-plug
        g.unplug()
        raise


def _hotplug(g: Guest) -> dict:
    if g.stop() != 0:  # the daemon of the checks before, started without hot-plug
        raise CheckFailed("the daemon before hot-plug did not exit 0:\n" + g.text()[-3000:])
    seconds = g.start(importtime=True, hotplug=True)
    if CUSE_RE.search(g.text()):
        raise CheckFailed("nodes served before the hardware existed:\n" + g.text()[-3000:])
    times = {"start_seconds": round(seconds, 1)}
    steps: list[tuple[str, Callable[[], object], str, int]] = [
        ("up_after_add_s", lambda: [g.hardware(n) for n in HARDWARE], "serving ", 1),
        ("down_after_remove_s", lambda: (g.hw["framechan0"].kill(), g.hw["framechan0"].wait()), "hardware gone", 1),
        ("up_after_add_again_s", lambda: g.hardware("framechan0"), "serving ", 2)]
    for name, act, text, count in steps:
        t0 = time.monotonic()
        act()
        g.wait_log(text, count, 120)
        times[name] = round(time.monotonic() - t0, 1)
    g.wait_nodes(2, 60)
    if any(Path(dev).exists() is False for dev in g.nodes.values()):
        raise CheckFailed(f"nodes {g.nodes} missing after the hardware came back")
    return times


def check_runtime(g: Guest) -> dict:
    """The guest has no numpy, av or pyudev; the running daemon imported none of them."""
    present = [m for m in NOT_ON_A_CAMERA if importlib.util.find_spec(m) is not None]
    if present:
        raise CheckFailed(f"installed in the guest: {present}")
    if g.proc is None or g.proc.poll() is not None:
        g.start(importtime=True)
    imported = re.findall(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$", g.text(), re.M)
    names = {m[3] for m in imported}
    bad = sorted(n for n in names if n.split(".")[0] in NOT_ON_A_CAMERA)
    if not imported or bad:
        raise CheckFailed(f"-X importtime: {len(imported)} modules, forbidden {bad}")
    top = sum(int(m[1]) for m in imported if not m[2].strip(" ") and len(m[2]) == 1)
    return {"start_seconds": round(g.start_seconds, 1), "modules_imported": len(names),
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
    total = path.stat().st_size
    if total != 20 * size:
        path.unlink()
        raise CheckFailed(f"{total} bytes, expected 20 x {size}")
    with open(path, "rb") as f:  # a frame at a time: 62 MB at once does not fit beside the rest
        counters = [nv12_counter(f.read(size), w, h) for _ in range(20)]
    path.unlink()
    increasing(counters, 20, "v4l2-ctl --stream-user")
    return {"frames": 20, "bytes": total, "first_last": [counters[0], counters[-1]]}


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


def cpu_seconds(pid: int) -> float:
    """utime + stime of all of ``pid``'s threads (/proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_seconds() -> float:
    """The guest's idle time so far (/proc/stat cpu line: idle + iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def log_time(stamp: str) -> float:
    """Seconds of a logging timestamp ("2026-12-04 23:09:33,821")."""
    day, ms = stamp.split(",")
    return time.mktime(time.strptime(day, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def streams(text: str, name: str) -> list[dict]:
    """The streams of node ``name`` in a log excerpt: rate, frames delivered and dropped (the
    sink's counts are cumulative), seconds, and the client's cycle per delivered frame."""
    out: list[dict] = []
    last: tuple[int, int] | None = None
    start: tuple[float, int] | None = None
    for stamp, node, fps, frames, dropped in STREAM_RE.findall(text):
        if node != name:
            continue
        if fps:
            start = (log_time(stamp), int(fps))
            continue
        counts = (int(frames), int(dropped))
        if last is not None and start is not None:
            n, d = counts[0] - last[0], counts[1] - last[1]
            secs = log_time(stamp) - start[0]
            out.append({"fps": start[1], "frames": n, "dropped": d, "seconds": round(secs, 2),
                        "client_ms_per_frame": round(secs / n * 1000) if n else None})
        last, start = counts, None
    return out


def run_compliance(g: Guest, role: str) -> tuple[str, dict]:
    """v4l2-compliance -s20 on ``role`` through the shim; its output and what the guest's CPU
    did meanwhile (client: the launcher's Python start and v4l2-compliance)."""
    assert g.proc is not None
    mark = len(g.text())
    t0, d0, c0, i0 = time.monotonic(), cpu_seconds(g.proc.pid), children_cpu(), idle_seconds()
    r = sh([g.bin, "run", "--", "v4l2-compliance", "-d", g.nodes[role], "-s20"], timeout=900)
    wall = time.monotonic() - t0
    cpu = {"wall_s": round(wall, 1), "daemon_cpu_s": round(cpu_seconds(g.proc.pid) - d0, 1),
           "client_cpu_s": round(children_cpu() - c0, 1), "idle_s": round(idle_seconds() - i0, 1)}
    # the last "stopped" comes with the RELEASE, which the kernel sends after the client's exit
    name, deadline = g.names[role], time.monotonic() + 15
    while time.monotonic() < deadline and \
            g.text()[mark:].count(f"{name}: streaming ") > g.text()[mark:].count(f"{name}: stopped ("):
        time.sleep(0.2)
    return r.stdout.decode(errors="replace"), {"cpu": cpu, "streams": streams(g.text()[mark:], g.names[role])}


def compliance(role: str) -> Callable[[Guest], dict]:
    def check(g: Guest) -> dict:
        """mipsel v4l2-compliance -s through the shim: 0 failures but the TCG timing one, no
        warnings but sequence gaps; the numbers show each stream's drops, the client's cycle
        per frame and how the guest's CPU was shared (daemon, client, idle)."""
        out, seen = run_compliance(g, role)
        (g.out / f"compliance-{role}.txt").write_text(out)
        m = TOTAL_RE.search(out)
        if not m:
            raise CheckFailed(out[-3000:])
        total, ok, failed, warnings = map(int, m.groups())
        all_fails = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("fail:")]
        fails = [f for f in all_fails if not TCG_TIMING_FAIL.search(f)]
        ws = re.findall(r"warn: (.*)", out)
        other = [w for w in ws if not SEQ_GAP.search(w)]
        numbers = {"total": total, "succeeded": ok, "failed": failed, "warnings": warnings,
                   "sequence_gap_warnings": sum(1 for w in ws if SEQ_GAP.search(w)),
                   "tcg_event_timing_failures": len(all_fails) - len(fails), "fps": g.fps,
                   "dropped": sum(s["dropped"] for s in seen["streams"]), **seen}
        if failed > len(all_fails) - len(fails) or fails or other:
            raise CheckFailed(f"{m.group(0)}\n" + "\n".join(fails + other) + "\n" + out[-2500:], numbers)
        return numbers
    return check


def check_cpu_per_frame(g: Guest) -> dict:
    """benchmarks/bench_cpu_per_frame.py: the daemon's CPU per delivered frame (main NV12 1080p,
    sub H.264) beside a raw CUSE server's that does no frame work, in this guest."""
    assert g.proc is not None
    bench = Path(g.args.bench) / "bench_cpu_per_frame.py"
    res = g.out / "cpu-per-frame.json"
    env = dict(os.environ, PYTHONPATH=str(Path(g.args.bundle) / "lib" / "python"), PYTHONDONTWRITEBYTECODE="1")
    r = sh([sys.executable, str(bench), "--pid", str(g.proc.pid), "--main", g.nodes["main"],
            "--sub", g.nodes["sub"], "--frames", "30", "--fps", str(g.fps), "--json", str(res)], env=env, timeout=600)
    table = r.stdout.decode(errors="replace")
    print(table, flush=True)
    if r.returncode != 0 or not res.exists():
        raise CheckFailed(f"exit {r.returncode}: {table[-2000:]}{r.stderr.decode()[-2000:]}\n{g.text()[-2000:]}")
    return {"table": table.splitlines(), **json.loads(res.read_text())}


def check_clean_exit(g: Guest) -> dict:
    """SIGTERM: exit 0, and the fake saw every stream closed and no violation."""
    rc = g.stop()
    g.unplug()
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
    frames = g.args.seconds * g.fps
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
    # hot-plug last: its stand-ins (two Python CUSE servers) would otherwise share the 128 MB
    # with the two ffmpeg clients, and one `impv4l2 run` met ENOMEM that way.
    "main": [("runtime", check_runtime), ("v4l2_ctl_user", check_v4l2_ctl_user),
             ("ffmpeg_streams", check_ffmpeg_streams), ("cpu_per_frame", check_cpu_per_frame),
             ("compliance_main", compliance("main")), ("compliance_sub", compliance("sub")),
             ("hotplug", check_hotplug), ("clean_exit", check_clean_exit)],
    "small": [("small_h264", check_small_h264)],
}
NEEDS_DAEMON = {"v4l2_ctl_user", "ffmpeg_streams", "cpu_per_frame", "compliance_main", "compliance_sub", "clean_exit"}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--set", choices=sorted(CHECKS), required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--fake", required=True)
    p.add_argument("--bench", default="/opt/bench", help="benchmarks/ of the tree (bench_cpu_per_frame.py)")
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
        g.unplug()
    return 0


if __name__ == "__main__":
    sys.exit(main())
