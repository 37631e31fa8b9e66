"""Daemon memory: `impv4l2 serve --backend t31` on the fake libimp, as the x86 tree runs it
and as the camera runs it (numpy, PyAV, pyudev unimportable: tests/clients/camera_runtime.py),
side by side.  Idle, then while ffmpeg streams main NV12 (REQBUFS 256 under the default
budget).  Columns from /proc/PID/status: RssAnon + RssFile is the process without buffer
memory; RssShmem is the memfd buffers it touched.

Run (root, FUSE): .venv/bin/python benchmarks/bench_rss.py [width height]
"""

from __future__ import annotations

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
sys.path.insert(0, str(ROOT / "tests"))
from fakes.build import build_fake  # noqa: E402

TREE = [str(ROOT / ".venv" / "bin" / "impv4l2")]
CAMERA = [sys.executable, str(ROOT / "tests" / "clients" / "camera_runtime.py")]
# (name, launcher, [nodes] lines): the first row is the baseline of the ratio column
RUNTIMES = [
    ("x86 tree", TREE, ""),
    ("camera runtime", CAMERA, ""),
    ("camera, no budget", CAMERA, "buffer_mb = 1024\ntotal_buffer_mb = 2048"),
]
FIELDS = ("RssAnon", "RssFile", "RssShmem")


def status(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in FIELDS}


def serve(argv0: list[str], tmp: Path, w: int, h: int, nodes: str) -> tuple[subprocess.Popen, Path, Path]:
    mount = tmp / "mnt"
    mount.mkdir()
    cfg = tmp / "t31.toml"
    cfg.write_text(textwrap.dedent(f"""
        backend = "t31"
        [t31]
        sensor = "gc2053"
        i2c_addr = 0x37
        sensor_width = {w}
        sensor_height = {h}
        [main]
        width = {w}
        height = {h}
        fps = 30
        [nodes]
        {nodes}
        [transport]
        dev_links = false
        [hotplug]
        enable = "off"
    """))
    log = tmp / "serve.log"
    env = dict(os.environ, IMPV4L2_LIBIMP=str(build_fake()))
    env.pop("IMPFAKE_LOG", None)
    proc = subprocess.Popen([*argv0, "serve", "--backend", "t31", "--mount", str(mount), "--cuse", "off",
                             "--config", str(cfg)], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "with backend t31" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text())
        time.sleep(0.05)
    return proc, mount, log


def measure(name: str, argv0: list[str], nodes: str, w: int, h: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        proc, mount, log = serve(argv0, Path(d), w, h, nodes)
        try:
            time.sleep(1.0)
            idle = status(proc.pid)
            node = re.search(r"FUSE file (\S+) \(main,", log.read_text()).group(1)
            ff = subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "v4l2", "-input_format",
                                   "nv12", "-video_size", f"{w}x{h}", "-i", node, "-frames:v", "150",
                                   "-f", "null", "-"])
            peak = dict(idle)
            while ff.poll() is None:
                for k, v in status(proc.pid).items():
                    peak[k] = max(peak[k], v)
                time.sleep(0.05)
            granted = re.search(r"(\d+ of \d+ buffers of \d+ bytes)", log.read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        return {"name": name, "idle": idle, "peak": peak, "granted": granted.group(1) if granted else "all",
                "ffmpeg": ff.returncode}


def main() -> None:
    w, h = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) == 3 else (1920, 1080)
    rows = [measure(name, argv0, nodes, w, h) for name, argv0, nodes in RUNTIMES]
    print(f"t31 fake, main {w}x{h} NV12 to ffmpeg (150 frames); kB from /proc/PID/status")
    print(f"{'runtime':<19}{'idle anon+file':>15}{'peak anon+file':>15}{'ratio':>7}{'peak shmem':>11}"
          "  buffers granted")
    base = rows[0]["peak"]["RssAnon"] + rows[0]["peak"]["RssFile"]
    for r in rows:
        i, p = r["idle"], r["peak"]
        print(f"{r['name']:<19}{i['RssAnon'] + i['RssFile']:>15}{p['RssAnon'] + p['RssFile']:>15}"
              f"{(p['RssAnon'] + p['RssFile']) / base:>7.2f}{p['RssShmem']:>11}  {r['granted']}"
              f"{'' if r['ffmpeg'] == 0 else '  (ffmpeg failed)'}")


if __name__ == "__main__":
    main()
