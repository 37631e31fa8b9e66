"""The LD_PRELOAD shim that gives CUSE nodes mmap, and its daemon side.

``libimpv4l2-preload.so`` (C source next to this file) is built on the target
with the system C compiler.  The one exception is a camera bundle
(``impv4l2 bundle``): a camera has no compiler, so the bundle carries the
library cross-compiled at DIR/lib/ and no C source, and it is used as is.
:func:`ensure_library` finds an up-to-date build or makes one; :func:`preload_env`
returns an environment that loads it (``impv4l2 run -- <command>`` uses both).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .protocol import VIDIOC_IMPV4L2_SHIM_INFO, VIDIOC_IMPV4L2_SHIM_MMAP
from .server import ShimServer

__all__ = ["SOURCE", "LIBNAME", "VIDIOC_IMPV4L2_SHIM_INFO", "VIDIOC_IMPV4L2_SHIM_MMAP", "ShimServer",
           "build", "ensure_library", "find_library",
           "default_library_path", "bundled_library_path", "preload_env"]

SOURCE = Path(__file__).with_name("impv4l2_preload.c")
LIBNAME = "libimpv4l2-preload.so"
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-shared", "-fPIC", "-fvisibility=hidden"]
LIBS = ["-ldl", "-lpthread"]


def default_library_path() -> Path:
    """Where setup.sh builds the library: <venv or prefix>/lib/impv4l2/."""
    return Path(sys.prefix) / "lib" / "impv4l2" / LIBNAME


def bundled_library_path() -> Path:
    """Where a camera bundle keeps the prebuilt library: DIR/lib/, beside
    DIR/lib/python/impv4l2/ (this package)."""
    return Path(__file__).resolve().parent.parent.parent.parent / LIBNAME  # shim/ impv4l2/ python/ lib/


def _candidates() -> list[Path]:
    env = os.environ.get("IMPV4L2_PRELOAD_LIB")
    paths = [Path(env)] if env else []
    # The bundle's own build first: made from this very package's source.
    paths += [bundled_library_path(), default_library_path(), Path("/usr/local/lib/impv4l2") / LIBNAME,
              Path("/usr/lib/impv4l2") / LIBNAME,
              Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "impv4l2" / LIBNAME]
    return paths


def _fresh(lib: Path) -> bool:
    try:
        return lib.stat().st_mtime >= SOURCE.stat().st_mtime
    except OSError:
        return False


def find_library() -> Path | None:
    """An existing build that is not older than the source (or $IMPV4L2_PRELOAD_LIB as is)."""
    env = os.environ.get("IMPV4L2_PRELOAD_LIB")
    if env and Path(env).is_file():
        return Path(env)
    for lib in _candidates():
        if _fresh(lib) or (lib.is_file() and not SOURCE.exists()):
            return lib
    return None


def build(dest: str | os.PathLike | None = None, cc: str | None = None, force: bool = False,
          flags: Sequence[str] = ()) -> Path:
    """Compile the shim into ``dest`` (default :func:`default_library_path`)
    unless it is already newer than the source; ``flags`` are added to CFLAGS
    (a cross compiler's -march/-mabi).  Atomic: a concurrent user never sees a
    half-written library."""
    out = Path(dest) if dest else default_library_path()
    if not force and _fresh(out):
        return out
    compiler = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc) to build the preload shim: apt-get install gcc libc6-dev")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([compiler, *CFLAGS, *flags, "-o", tmp, str(SOURCE), *LIBS], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"building {LIBNAME} failed:\n{r.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def ensure_library() -> Path:
    """An up-to-date library: found, or built into the first writable place."""
    lib = find_library()
    if lib is not None:
        return lib
    if not SOURCE.exists():  # a bundle (no source, no compiler on a camera): never build
        raise RuntimeError(f"no {LIBNAME} at {bundled_library_path()} (the bundle ships it prebuilt; "
                           "rebuild the bundle with `impv4l2 bundle`)")
    errors = []
    for dest in (default_library_path(), _candidates()[-1]):
        try:
            return build(dest)
        except OSError as e:
            errors.append(f"{dest}: {e}")
    raise RuntimeError("cannot build the preload shim: " + "; ".join(errors))


def preload_env(env: dict[str, str] | None = None, library: str | os.PathLike | None = None) -> dict[str, str]:
    """A copy of ``env`` (default os.environ) with the shim first in LD_PRELOAD
    (entries already there are kept, after it)."""
    out = dict(os.environ if env is None else env)
    lib = str(library or ensure_library())
    rest = [p for p in out.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p and p != lib]
    out["LD_PRELOAD"] = ":".join([lib, *rest])
    return out
