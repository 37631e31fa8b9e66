"""``impv4l2 bundle --arch ARCH DIR``: what goes onto a camera.

DIR is a self-contained tree meant for ``/opt/impv4l2`` (``--prefix``) on a
thingino T31 camera (or its SD card).  The camera needs python3 (standard
library and ctypes) and nothing else::

    bin/impv4l2                    launcher: PYTHONPATH=DIR/lib/python, python3 -m impv4l2.cli
    lib/python/impv4l2/            the package's .py files
    lib/python/linuxpy/            what ``linuxpy.video.raw`` imports, vendored (stdlib only)
    lib/libimpv4l2-preload.so      the mmap shim, cross-compiled for ARCH (a camera has no compiler)
    etc/init.d/S95impv4l2          init script in the style of thingino's /etc/init.d/S9x
    etc/impv4l2.toml               default configuration (t31 backend)
    etc/mdev.conf.d/impv4l2.conf   busybox mdev.conf lines equivalent to udev/70-impv4l2.rules
    libexec/impv4l2-mdev           the mdev helper: /dev/v4l/by-id and by-path links
    share/kernel/impv4l2.config    kernel config fragment: FUSE and CUSE
    MANIFEST                       arch, prefix, versions, compiler, sha256 of every file

The tree is written into a temporary sibling of DIR and renamed into place
only when complete: a missing compiler or a failed check leaves no DIR.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import __version__
from . import shim

DEFAULT_PREFIX = "/opt/impv4l2"
PACKAGE = Path(__file__).resolve().parent


class BundleError(Exception):
    """A bundle that cannot be made; the message says what to install or change."""


@dataclasses.dataclass(frozen=True)
class Arch:
    cc: str  # default compiler
    package: str  # the Debian package that provides it
    flags: tuple[str, ...]  # added to the shim's CFLAGS
    elf: tuple[int, int, int]  # EI_CLASS, EI_DATA, e_machine the shim must have


# Target architectures, as data.  The T31 (XBurst1) is MIPS32r2 little-endian,
# o32 ABI: Debian's mipsel toolchain targets exactly that (its glibc, though:
# a uClibc firmware needs its own toolchain through --cc).
ARCHES: dict[str, Arch] = {
    "mipsel": Arch("mipsel-linux-gnu-gcc", "gcc-mipsel-linux-gnu", ("-mabi=32", "-march=mips32r2"), (1, 1, 8)),
    "x86_64": Arch("gcc", "gcc", (), (2, 1, 62)),
    "aarch64": Arch("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", (), (2, 1, 183)),
    "armhf": Arch("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf", (), (1, 1, 40)),
}
# platform.machine() -> ARCHES key (the default --arch)
HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64",
             "armv7l": "armhf", "armv6l": "armhf", "mips": "mipsel"}

# Pure-Python distributions copied into lib/python: top-level package -> the
# modules impv4l2 imports from it (only their import closure is copied).
VENDORED: dict[str, tuple[str, ...]] = {"linuxpy": ("linuxpy.video.raw",)}

# ---------------------------------------------------------------- the files
# @PREFIX@ is the install prefix (--prefix); paths in these files refer to it.

LAUNCHER = r"""#!/bin/sh
# impv4l2 from a camera bundle: the bundle's package and vendored linuxpy on the
# system python3 (standard library and ctypes only).  DIR is found from this
# script's own location (through symlinks), so the tree can live anywhere.
self=$(readlink -f "$0" 2>/dev/null) || self=$0
DIR=$(cd "$(dirname "$self")/.." && pwd)
PYTHONPATH="$DIR/lib/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
exec "${IMPV4L2_PYTHON:-python3}" -m impv4l2.cli "$@"
"""

INIT_SCRIPT = r"""#!/bin/sh
# impv4l2: userspace V4L2 driver for the T31 ISP, frame channels and encoder
# (/dev/videoN through CUSE).  From an impv4l2 camera bundle (@PREFIX@): copy
# to /etc/init.d/.  Stop the stock streamer first: the ISP has one owner.

PREFIX="@PREFIX@"
DAEMON="$PREFIX/bin/impv4l2"
PIDFILE="/var/run/impv4l2.pid"
LOGFILE="/tmp/impv4l2.log"
CONFIG="/etc/impv4l2.toml"
[ -f "$CONFIG" ] || CONFIG="$PREFIX/etc/impv4l2.toml"
# Where the device nodes and sysfs are (overridable for tests only).
DEV="${IMPV4L2_DEV:-/dev}"
SYSFS="${IMPV4L2_SYSFS:-/sys}"

kernel_ready() {
	modprobe fuse 2>/dev/null
	modprobe cuse 2>/dev/null
	missing=""
	options=""
	for n in fuse cuse; do
		# mdev may not have made the node (yet): make it from sysfs.
		if [ ! -c "$DEV/$n" ] && [ -r "$SYSFS/class/misc/$n/dev" ]; then
			IFS=: read -r major minor <"$SYSFS/class/misc/$n/dev"
			mknod "$DEV/$n" c "$major" "$minor" 2>/dev/null
		fi
		if [ ! -c "$DEV/$n" ]; then
			missing="$missing $DEV/$n"
			case $n in
			fuse) options="$options CONFIG_FUSE_FS" ;;
			cuse) options="$options CONFIG_CUSE" ;;
			esac
		fi
	done
	[ -z "$missing" ] && return 0
	echo "impv4l2: missing$missing: enable$options in the kernel (=y or =m; see $PREFIX/share/kernel/impv4l2.config)" >&2
	# Without CUSE the driver still serves its FUSE mount; without FUSE, nothing.
	case "$missing" in *fuse*) return 1 ;; esac
	return 0
}

running() {
	[ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

start() {
	echo -n "Starting impv4l2: "
	if running; then
		echo "already running"
		return 0
	fi
	kernel_ready || { echo "FAIL"; return 1; }
	rm -f "$PIDFILE"
	# -p alone identifies the daemon: it is python3, not the launcher script.
	# sh -c keeps the pid (exec) and sends the log to LOGFILE (-b: stdio is /dev/null).
	if start-stop-daemon -S -b -m -p "$PIDFILE" -a /bin/sh -- \
		-c 'exec "$0" "$@" >"'"$LOGFILE"'" 2>&1' "$DAEMON" serve --backend t31 --config "$CONFIG"; then
		echo "OK"
	else
		echo "FAIL"
		return 1
	fi
}

stop() {
	echo -n "Stopping impv4l2: "
	if ! running; then
		rm -f "$PIDFILE"
		echo "not running"
		return 0
	fi
	pid=$(cat "$PIDFILE")
	start-stop-daemon -K -q -s TERM -p "$PIDFILE"
	# SIGTERM ends the streams and removes the nodes; give it 5 s, then KILL.
	n=0
	while kill -0 "$pid" 2>/dev/null && [ $n -lt 5 ]; do
		sleep 1
		n=$((n + 1))
	done
	kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
	rm -f "$PIDFILE"
	echo "OK"
}

case "$1" in
start)
	start
	;;
stop)
	stop
	;;
restart)
	stop
	sleep 1
	start
	;;
status)
	if running; then echo "impv4l2 running (pid $(cat "$PIDFILE"))"; else echo "impv4l2 stopped"; exit 1; fi
	;;
*)
	echo "Usage: $0 {start|stop|restart|status}"
	exit 1
	;;
esac
"""

CONFIG = """# impv4l2 on a T31 camera: the bundle's default.  Copy it to /etc/impv4l2.toml
# to change it (the init script prefers that file); keys: README "Configuration".
backend = "t31"
log_level = "info"

[t31]                        # the sensor comes from /proc/jz/sensor/ (thingino's sensor-info);
# without it, or to override it, name it here:
# sensor = "gc2053"
# i2c_addr = 0x37
# sensor_width = 1920
# sensor_height = 1080

[main]                       # frame channel 0
width = 1920
height = 1080
fps = 25

[sub]                        # frame channel 1
width = 640
height = 360
fps = 25

[nodes]
base = 10                    # first /dev/videoN tried
buffer_mb = 0                # 0: the t31 default, 12 MiB a node (a T31X: 128 MB)
total_buffer_mb = 0          # 0: 24 MiB for all nodes; on a 64 MB T31N/L try 8 and 12

[transport]
cuse = "auto"                # /dev/videoN when /dev/cuse exists
mount = "/run/impv4l2"

[hotplug]
# auto (on for t31): the driver waits for tx-isp, avpu and framechanN and
# follows them (kernel uevents, no udev needed); "off" opens them at start.
enable = "auto"
"""

MDEV_CONF = """# impv4l2: its CUSE nodes under busybox mdev, as udev/70-impv4l2.rules does
# under udev (group video, mode 0660, /dev/v4l/by-id and by-path links).
# Put these lines into /etc/mdev.conf above any catch-all line: mdev stops
# at the first line that matches.  Another CUSE driver's video* node gets the
# permissions but no links (the helper asks the node for driver "impv4l2").
SUBSYSTEM=cuse;video[0-9]+ root:video 0660 *@PREFIX@/libexec/impv4l2-mdev
"""

MDEV_HELPER = r"""#!/bin/sh
# impv4l2-mdev: mdev helper for impv4l2's CUSE nodes (etc/mdev.conf.d/impv4l2.conf):
# the links udev/70-impv4l2.rules makes, from `impv4l2 udev-info` (ID_IMPV4L2_ROLE).
# mdev runs it with MDEV=videoN and ACTION=add|remove (no ACTION in `mdev -s`: add).
# IMPV4L2_DEV and IMPV4L2_UDEV_INFO replace /dev and the query (tests).
umask 022 # mdev runs us with its umask 0
dev="${IMPV4L2_DEV:-/dev}"
# install.py as a plain script: udev-info in ~10 ms of imports instead of the whole CLI.
udev_info="${IMPV4L2_UDEV_INFO:-python3 -I -S @PREFIX@/lib/python/impv4l2/install.py udev-info}"
name="${MDEV:-$1}"
case "$name" in
video[0-9]*) ;;
*) exit 0 ;;
esac

remove_links() {
	for link in "$dev"/v4l/by-id/impv4l2-* "$dev"/v4l/by-path/platform-impv4l2-*; do
		[ -L "$link" ] && [ "$(readlink "$link")" = "../../$name" ] && rm -f "$link"
	done
}

case "${ACTION:-add}" in
add)
	role=$($udev_info "$dev/$name" 2>/dev/null | sed -n 's/^ID_IMPV4L2_ROLE=//p')
	case "$role" in
	"" | *[!a-z]*) exit 0 ;; # not an impv4l2 node
	esac
	mkdir -p "$dev/v4l/by-id" "$dev/v4l/by-path"
	ln -sfn "../../$name" "$dev/v4l/by-id/impv4l2-$role-video-index0"
	ln -sfn "../../$name" "$dev/v4l/by-path/platform-impv4l2-$role-video-index0"
	;;
remove)
	remove_links
	;;
esac
exit 0
"""

KERNEL_FRAGMENT = """# impv4l2: the kernel options its userspace V4L2 driver needs.  FUSE serves
# the driver's file mount (/run/impv4l2) and CUSE the /dev/videoN nodes; =m
# builds modules (the init script runs `modprobe fuse; modprobe cuse`), =y
# builds them in.  thingino builds every T31 kernel with both off.
#
# thingino: Buildroot merges kernel fragments named in
# BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES (package/thingino-developer does it
# this way).  Put this file in the source tree and add to
# user/<camera>/local.fragment (or user/common/local.fragment):
#     BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES="$(BR2_EXTERNAL)/impv4l2.config"
# or append the two lines below to the SoC's kernel config,
# board/ingenic/xburst1/kernel/<version>/t31.generic.config; then rebuild
# the kernel and the firmware (make linux-rebuild all) and flash it.
CONFIG_FUSE_FS=m
CONFIG_CUSE=m
"""

# path in DIR -> (text, mode)
FILES: dict[str, tuple[str, int]] = {
    "bin/impv4l2": (LAUNCHER, 0o755),
    "etc/init.d/S95impv4l2": (INIT_SCRIPT, 0o755),
    "etc/impv4l2.toml": (CONFIG, 0o644),
    "etc/mdev.conf.d/impv4l2.conf": (MDEV_CONF, 0o644),
    "libexec/impv4l2-mdev": (MDEV_HELPER, 0o755),
    "share/kernel/impv4l2.config": (KERNEL_FRAGMENT, 0o644),
}
SHELL_SCRIPTS = tuple(p for p, (text, _) in FILES.items() if text.startswith("#!/bin/sh"))
LIB_PYTHON = "lib/python"
SHIM = f"lib/{shim.LIBNAME}"

# Run with the bundle's python: the closure of some modules of one top-level package.
_CLOSURE = """
import json, sys
sys.path.insert(0, sys.argv[1])
for name in sys.argv[3:]:
    __import__(name)
print(json.dumps(sorted(m.__file__ for n, m in list(sys.modules.items())
                        if n.split(".")[0] == sys.argv[2] and getattr(m, "__file__", None))))
"""
# ... and the check that the bundle's lib/python imports on the standard library alone
# (run with -B: no __pycache__ in the bundle, the camera's python3 may be another version).
_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
for name in sys.argv[2:]:
    m = __import__(name, fromlist=["_"])
    assert m.__file__.startswith(sys.argv[1]), f"{name} came from {m.__file__}"
"""


def host_arch() -> str:
    return HOST_ARCH.get(platform.machine(), platform.machine())


def _run(argv: list[str], what: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise BundleError(f"{what} failed:\n{(r.stderr or r.stdout).strip()}")
    return r.stdout


def elf_ident(path: Path) -> tuple[int, int, int]:
    """(EI_CLASS, EI_DATA, e_machine) of an ELF file."""
    head = path.read_bytes()[:20]
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise BundleError(f"{path} is not an ELF file")
    return head[4], head[5], int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def compiler_for(arch: str, cc: str | None = None) -> tuple[Arch, str]:
    """The arch's table row and the compiler to use; one clear error when it is missing."""
    spec = ARCHES.get(arch)
    if spec is None:
        raise BundleError(f"unknown architecture {arch!r} (known: {', '.join(ARCHES)})")
    compiler = cc or spec.cc
    if shutil.which(compiler) is None:
        hint = (f"Debian's {spec.package} provides {spec.cc}" if cc else f"apt-get install {spec.package}")
        raise BundleError(f"C compiler {compiler!r} for {arch} not found ({hint})")
    return spec, compiler


def impv4l2_version() -> str:
    """__version__, with `git describe` when this package is a git checkout."""
    root = PACKAGE.parent
    if (root / ".git").exists() and shutil.which("git"):
        r = subprocess.run(["git", "-C", str(root), "describe", "--tags", "--always", "--dirty"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return f"{__version__} (git {r.stdout.strip()})"
    return __version__


def copy_package(lib_python: Path) -> list[Path]:
    """The package's .py files (no caches, no C source: the shim comes prebuilt)."""
    out = []
    for src in sorted(PACKAGE.rglob("*.py")):
        rel = src.relative_to(PACKAGE.parent)
        if "__pycache__" in rel.parts:
            continue
        dst = lib_python / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


def vendor(top: str, modules: tuple[str, ...], lib_python: Path) -> str:
    """Copy the installed ``top`` package's files that ``modules`` import, and
    its licence; returns its version."""
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(f"{top} is not installed here (pip install {top}): the bundle vendors it")
    site = Path(list(spec.submodule_search_locations)[0]).parent
    files = json.loads(_run([sys.executable, "-I", "-S", "-B", "-c", _CLOSURE, str(site), top, *modules],
                            f"importing {', '.join(modules)}"))
    for f in files:
        dst = lib_python / Path(f).relative_to(site)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    try:
        dist = importlib.metadata.distribution(top)
        for f in dist.files or ():
            if f.name.upper().startswith(("LICENSE", "COPYING")):
                shutil.copyfile(dist.locate_file(f), lib_python / top / f.name)
        return dist.version
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def manifest(root: Path, facts: dict[str, str]) -> str:
    lines = ["# impv4l2 camera bundle: copy this directory to the prefix on the camera.",
             "# Check it there: cd PREFIX && grep -E '^[0-9a-f]{64}  ' MANIFEST | sha256sum -c"]
    lines += [f"{k}: {v}" for k, v in facts.items()]
    files = sorted(p for p in root.rglob("*") if p.is_file())
    lines.append(f"files: {len(files)}")
    lines += [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root)}" for p in files]
    return "\n".join(lines) + "\n"


def _fill(root: Path, arch: str, prefix: str, spec: Arch, compiler: str) -> dict[str, str]:
    """Write every file of the bundle under ``root``; returns the MANIFEST facts."""
    lib_python = root / LIB_PYTHON
    copy_package(lib_python)
    versions = {top: vendor(top, mods, lib_python) for top, mods in VENDORED.items()}
    # The bundled tree must import with the standard library alone (-I -S: no site-packages).
    _run([sys.executable, "-I", "-S", "-B", "-c", _CHECK, str(lib_python),
          *(m for mods in VENDORED.values() for m in mods), "impv4l2.cli"],
         "importing the bundle with the standard library only")

    try:
        lib = shim.build(root / SHIM, cc=compiler, force=True, flags=spec.flags)
    except (RuntimeError, OSError) as e:
        raise BundleError(f"cross-compiling the shim with {compiler}: {e}") from None
    got = elf_ident(lib)
    if got != spec.elf:  # e.g. --cc pointing at another architecture's compiler
        raise BundleError(f"{compiler} built {got} (ELF class, data, machine), not {arch}'s {spec.elf}")

    for rel, (text, mode) in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("@PREFIX@", prefix))
        os.chmod(path, mode)

    cc_version = _run([compiler, "--version"], f"{compiler} --version").splitlines()[0]
    return {
        "arch": arch,
        "prefix": prefix,
        "impv4l2": impv4l2_version(),
        **{top: f"{v} ({', '.join(VENDORED[top])} and what it imports)" for top, v in versions.items()},
        "python": "python3 >= 3.11 on the camera (standard library and ctypes)",
        "compiler": f"{compiler} ({cc_version})",
        "cflags": " ".join([*shim.CFLAGS, *spec.flags, *shim.LIBS]),
    }


def bundle(dest: str | os.PathLike, arch: str | None = None, prefix: str = DEFAULT_PREFIX,
           cc: str | None = None, force: bool = False) -> Path:
    """Write the bundle to ``dest`` (which must be absent or empty unless
    ``force``); returns its path.  Raises BundleError, leaving nothing behind."""
    arch = arch or host_arch()
    spec, compiler = compiler_for(arch, cc)
    if not prefix.startswith("/"):
        raise BundleError(f"--prefix must be an absolute path on the camera, not {prefix!r}")
    prefix = prefix.rstrip("/") or "/"
    out = Path(dest).absolute()
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} exists and is not empty (--force replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        facts = _fill(tmp, arch, prefix, spec, compiler)
        (tmp / "MANIFEST").write_text(manifest(tmp, facts))
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700
        old = None
        if out.is_dir() and any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        elif out.is_dir():
            out.rmdir()
        elif out.exists():
            out.unlink()
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
