"""Newer conformance tools for the VM stage: Debian trixie's v4l-utils (1.30) in a chroot.

Host side (:func:`ensure_trixie`, called by the harness before the boot): build the chroot once
with ``mmdebstrap --variant=apt --include=v4l-utils trixie`` (about 20 s) and keep it under
``$IMPV4L2_CACHE`` (default ``~/.cache/impv4l2``); a fresh machine builds it itself.  The guest
sees the host's filesystem read-only, so the mount points it needs inside the chroot (the
project tree, for the preload shim) are made here.

Guest side (:func:`chroot_cmd`): bind /dev, /proc, /sys and the project tree into it, and
return the command line that runs a tool there, e.g. ``chroot ROOT v4l2-compliance``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

TRIXIE_ENV = "IMPV4L2_TRIXIE_ROOT"  # handed to the guest by the harness
MIRROR = "http://deb.debian.org/debian"
BINDS = ("/dev", "/proc", "/sys")


def cache_dir() -> Path:
    return Path(os.environ.get("IMPV4L2_CACHE") or Path.home() / ".cache" / "impv4l2")


def ensure_trixie(project: Path) -> Path | str:
    """The trixie chroot with v4l-utils (built if missing); a string says why there is none."""
    root = cache_dir() / "v4l-utils-trixie"
    if not (root / "usr/bin/v4l2-compliance").exists():
        if shutil.which("mmdebstrap") is None:
            return "mmdebstrap not found (apt-get install mmdebstrap; scripts/apt-test.txt)"
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mmdebstrap", "--variant=apt", "--include=v4l-utils", "trixie", str(tmp), MIRROR],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            return f"mmdebstrap trixie failed ({r.returncode}): {r.stderr[-1500:]}"
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    for d in (*BINDS, str(project)):
        (root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
    return root


def tool_version(root: str, tool: str = "v4l2-compliance") -> str:
    r = subprocess.run(["chroot", root, tool, "--version"], capture_output=True, text=True)
    return (r.stdout + r.stderr).strip().splitlines()[0] if r.stdout or r.stderr else ""


def chroot_cmd(project: Path, tool: str) -> list[str]:
    """Guest: ``chroot ROOT TOOL`` with /dev, /proc, /sys and the project tree bound inside."""
    root = os.environ.get(TRIXIE_ENV, "")
    if not root or not Path(root, "usr/bin", tool).exists():
        raise AssertionError(f"no trixie chroot with {tool} ({TRIXIE_ENV}={root!r}); the harness builds it")
    for d in (*BINDS, str(project)):
        target = Path(root, d.lstrip("/"))
        if not os.path.ismount(target):
            subprocess.run(["mount", "--rbind", d, str(target)], check=True)
    return ["chroot", root, tool]
