"""The MIPS stage's host side: prepare the guest's /opt and run its boots in the background.

tests/mips/test_mips.py asks :func:`stage` for a boot's results.  conftest calls :func:`start` right
after collection when mips tests are selected, so the two boots (TCG: one host core, ~7 min)
run while the host tests use the other core, not after them; the x86 VM stage boots later, on
the first vm test, by which time the MIPS boots are usually done.  Without :func:`start` (a
single test file run by hand) the first :func:`stage` call runs everything in the foreground.

What the guest gets (one 9p share at /opt: the Malta board has PCI slots for few virtio
devices): impv4l2/ (``impv4l2 bundle --arch mipsel``, with bytecode the host's 3.11 wrote),
fake/ (libimp.so cross-compiled from tests/fakes, stream.h264), guest.py (tests/mips/), bench/
(benchmarks/bench_cpu_per_frame.py and its helper).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("IMPV4L2_MIPS_SECONDS", "20"))
CROSS = ("mipsel-linux-gnu-gcc", "-mabi=32")
BENCH = ("bench_cpu_per_frame.py", "_common.py")
# name -> (guest memory MB, guest.py arguments, timeout s)
BOOTS: dict[str, tuple[int, str, float]] = {
    "main": (128, "--set main", 1500),
    "small": (64, f"--set small --seconds {SECONDS} --budget-mb 8", SECONDS * 6 + 600),
}

_lock = threading.Lock()
_thread: threading.Thread | None = None
_results: dict[str, dict] = {}
_done = threading.Event()


def _mips():
    return sys.modules["impv4l2_tests_vm_mips"]  # tests/vm/mips.py, loaded by conftest


def h264_stream(path: Path, w: int = 640, h: int = 360, frames: int = 60) -> None:
    """What the fake's AVPU serves: real H.264, one slice a frame, SPS+PPS before each IDR."""
    import av
    import numpy as np

    out = av.open(str(path), "w", format="h264")
    st = out.add_stream("libx264", rate=15)
    st.width, st.height, st.pix_fmt = w, h, "yuv420p"
    st.options = {"g": "15", "bf": "0", "preset": "ultrafast", "tune": "zerolatency", "threads": "1",
                  "x264-params": "repeat-headers=1"}
    yy, xx = np.mgrid[0:h * 3 // 2, 0:w]
    for i in range(frames):
        img = ((xx + yy + 8 * i) % 220 + 16).astype(np.uint8)
        for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="yuv420p")):
            out.mux(pkt)
    for pkt in st.encode():
        out.mux(pkt)
    out.close()


def _run(cmd: list[str], **kw) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)[:200]}: {res.stdout[-2000:]}{res.stderr[-2000:]}")


def prepare(opt: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from fakes.build import build_fake

    _run([sys.executable, "-m", "impv4l2.cli", "bundle", "--arch", "mipsel", str(opt / "impv4l2")], cwd=ROOT)
    # The share is read-only: without bytecode Python compiles every module at every start
    # (~70 s under TCG).  The host's 3.11 writes the guest 3.11's, as the camera's first start
    # would on its SD card; checked-hash: valid whatever mtimes the copy has.
    _run([sys.executable, "-m", "compileall", "-q", "-j0", "--invalidation-mode", "checked-hash",
          str(opt / "impv4l2" / "lib" / "python")])
    (opt / "fake").mkdir()
    shutil.copy(build_fake(cc=CROSS[0], cflags=CROSS[1:]), opt / "fake" / "libimp.so")
    h264_stream(opt / "fake" / "stream.h264")
    shutil.copy(ROOT / "tests" / "mips" / "guest.py", opt / "guest.py")
    (opt / "bench").mkdir()  # the guest runs this benchmark beside the daemon (not in the bundle)
    for name in BENCH:
        shutil.copy(ROOT / "benchmarks" / name, opt / "bench" / name)


def _boot(top: Path, opt: Path, name: str, out: Path) -> dict:
    mips = _mips()
    memory_mb, args, timeout = BOOTS[name]
    timings: dict[str, float] = {}
    rc, console = mips.boot(top, f"python3 /opt/guest.py {args} --bundle /opt/impv4l2 --fake /opt/fake "
                            f"--out {mips.OUT}", memory_mb=memory_mb, shares={"/opt": opt}, out=out,
                            timeout=timeout, timings=timings)
    (out / "console.log").write_text(console)
    checks = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    error = "" if rc == 0 and checks else f"guest exit {rc}, checks {sorted(checks)}:\n{console[-5000:]}"
    return {"checks": checks, "out": out, "timings": timings, "error": error, "memory_mb": memory_mb}


def _stage() -> None:
    t0 = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="impv4l2-mips-stage-"))
    try:
        top = _mips().ensure_root()
        if isinstance(top, str):
            raise RuntimeError(f"no mipsel guest: {top}")
        built = time.monotonic() - t0
        opt = base / "opt"
        opt.mkdir()
        prepare(opt)
        for name in BOOTS:
            out = base / name
            out.mkdir()
            _results[name] = _boot(top, opt, name, out) | {"root_seconds": built,
                                                             "stage_seconds": time.monotonic() - t0}
    except Exception:
        for name in BOOTS:
            _results.setdefault(name, {"checks": {}, "error": traceback.format_exc(), "out": base})
    finally:
        _done.set()


def start() -> None:
    """Begin the stage in a background thread (once)."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_stage, name="impv4l2-mips-stage", daemon=True)
            _thread.start()


def stage(name: str) -> dict:
    """The results of boot ``name`` ("main" or "small"), waiting for them."""
    start()
    _done.wait()
    return _results[name]


def summary() -> list[str]:
    """Lines for the terminal summary (empty if the stage did not run)."""
    lines = []
    for name, r in _results.items():
        t = r.get("timings", {})
        lines.append(f"mips {name} ({r.get('memory_mb', '?')} MB): boot to command {t.get('boot_to_command', -1):.1f} s, "
                     f"boot total {t.get('total', -1):.1f} s" + (" — FAILED to run" if r.get("error") else ""))
        for check, v in r.get("checks", {}).items():
            lines.append(f"  {v['seconds']:7.1f} s  {'ok    ' if v['ok'] else 'FAILED'}  {check}: "
                         f"{json.dumps(v['numbers'], sort_keys=True)[:300]}")
    return lines
