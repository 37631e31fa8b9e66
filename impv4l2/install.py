"""udev and systemd integration: installing the rules and the unit, and the
``udev-info`` helper those rules run on each CUSE node.

``impv4l2 install`` copies ``udev/70-impv4l2.rules`` and ``udev/impv4l2.service``
into ``/etc`` (or ``/run`` with ``--runtime``, under ``--root`` for tests),
replacing ``@IMPV4L2@`` with this installation's command so udev and systemd
run the same venv, then asks udevd and systemd to reload — when they run.

``impv4l2 udev-info /dev/videoN`` is this project's ``v4l_id``: udev's stock
rules only look at subsystem ``video4linux`` and a CUSE node is ``cuse``.
"""

from __future__ import annotations

# Only fast stdlib modules at the top: udev runs this file as a script for
# every node (``python -I -S install.py udev-info``), and in a slow VM each
# imported module costs milliseconds times the emulation factor.
import fcntl
import os
import re
import signal
import struct
import sys

try:
    from .ioc import NATIVE
except ImportError:  # udev runs this file as a plain script (python -I -S): load the sibling by path
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "impv4l2_ioc", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ioc.py"))
    _ioc = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_ioc)
    NATIVE = _ioc.NATIVE

UDEV_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "udev")
RULES = "70-impv4l2.rules"
UNIT = "impv4l2.service"
MARK = "impv4l2"  # uninstall removes only files that mention it

# file name -> (directory under /etc, directory under /run), relative to the root
TARGETS: dict[str, tuple[str, str]] = {
    RULES: ("etc/udev/rules.d", "run/udev/rules.d"),
    UNIT: ("etc/systemd/system", "run/systemd/system"),
}

# ---------------------------------------------------------------- udev-info

# struct v4l2_capability: driver[16] card[32] bus_info[32] version capabilities device_caps reserved[3]
_CAP = struct.Struct("<16s32s32sIII12x")
VIDIOC_QUERYCAP = NATIVE.IOR("V", 0, _CAP.size)
CAP_DEVICE_CAPS = 0x80000000

# capability bits -> v4l_id's ID_V4L_CAPABILITIES words, as data (systemd's v4l_id.c order).
# An M2M node is both a capture and an output device, so it gets both words.
_CAP_WORDS: tuple[tuple[int, str], ...] = (
    (0x00000001 | 0x00001000 | 0x00008000 | 0x00004000, "capture"),  # CAPTURE(_MPLANE), M2M(_MPLANE)
    (0x00000002 | 0x00002000 | 0x00008000 | 0x00004000, "video_output"),
    (0x00000004, "video_overlay"),
    (0x00020000, "audio"),
    (0x00010000, "tuner"),
    (0x00040000, "radio"),
    (0x00800000, "meta"),
)
_M2M = 0x00008000 | 0x00004000
ROLES = ("main", "sub", "encoder")


class NodeInfo:
    """What QUERYCAP says about a node."""

    __slots__ = ("driver", "card", "bus_info", "caps")

    def __init__(self, driver: str, card: str, bus_info: str, caps: int):
        self.driver, self.card, self.bus_info = driver, card, bus_info
        self.caps = caps  # device_caps when the driver gives them, else capabilities

    @property
    def role(self) -> str:
        return role_of(self.card, self.bus_info, self.caps)


# A role in bus_info or card: main, sub, encoder, or a fan-out node's main-N / sub-N
_ROLE = re.compile(r"(?<!\w)(main|sub|encoder)(-[0-9]+)?(?![\w-])")


def role_of(card: str, bus_info: str, caps: int) -> str:
    """main | sub | encoder | main-N | sub-N: M2M is the encoder; else the role in bus_info
    ("platform:impv4l2-sub", "platform:impv4l2-main-2") or card ("impv4l2 sub (sim)"); else main."""
    if caps & _M2M:
        return "encoder"
    for text in (bus_info, card):
        for m in _ROLE.finditer(text.lower().replace(":", " ")):
            if m.group(1) in ROLES:
                return m.group(0)
    return "main"


def querycap(path: str) -> NodeInfo:
    """QUERYCAP on ``path``; raises OSError."""
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        buf = bytearray(_CAP.size)
        fcntl.ioctl(fd, VIDIOC_QUERYCAP, buf)
    finally:
        os.close(fd)
    driver, card, bus, _version, caps, dcaps = _CAP.unpack(buf)

    def text(b: bytes) -> str:
        return b.split(b"\0", 1)[0].decode("utf-8", "replace")

    return NodeInfo(text(driver), text(card), text(bus), dcaps if caps & CAP_DEVICE_CAPS else caps)


def udev_properties(info: NodeInfo) -> dict[str, str]:
    """The properties udev imports for one of our nodes (v4l_id's plus ours)."""
    words = [w for bits, w in _CAP_WORDS if info.caps & bits]
    return {
        "ID_V4L_VERSION": "2",
        "ID_V4L_PRODUCT": info.card,
        "ID_V4L_CAPABILITIES": ":" + "".join(w + ":" for w in words),
        "ID_IMPV4L2_ROLE": info.role,
        "ID_PATH": f"platform-impv4l2-{info.role}",
    }


def udev_info(devnode: str, timeout: int = 5) -> int:
    """``IMPORT{program}`` helper: print KEY=value lines for an impv4l2 node.

    Exit 1 with no output for anything else (so the rule's IMPORT fails), and
    die after ``timeout`` seconds: a driver that does not answer must not hold
    a udev worker for its full event timeout.  The alarm keeps its default,
    fatal action on purpose: FUSE waits for an answer through any signal that
    has a handler, only a fatal one ends the wait.
    """
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(timeout)
    try:
        info = querycap(devnode)
    except OSError as e:
        print(f"impv4l2 udev-info: {devnode}: {e}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    if info.driver != "impv4l2":
        return 1
    for key, value in udev_properties(info).items():
        print(f"{key}={value}")
    return 0


# ---------------------------------------------------------------- install

def command() -> str:
    """How systemd starts this installation: its venv's ``impv4l2``."""
    exe = os.path.join(sys.prefix, "bin", "impv4l2")
    if os.access(exe, os.X_OK):
        return exe
    return f"{sys.executable} -m impv4l2.install"  # same package, no console script


def udev_info_command() -> str:
    """How udev runs udev-info: this file as a script, isolated (-I) and without
    site-packages (-S): it needs only the standard library, and starts in a
    fraction of the console script's time (46 -> ~10 ms natively)."""
    return f"{sys.executable} -I -S {os.path.abspath(__file__)}"


def render(name: str, cmd: str | None = None) -> str:
    """A template from udev/ with this installation's paths filled in."""
    import shutil

    with open(os.path.join(UDEV_SRC, name)) as f:
        text = f.read()
    subst = {
        "@IMPV4L2@": cmd or command(),
        "@UDEV_INFO@": udev_info_command(),
        "@SYSTEMCTL@": shutil.which("systemctl") or "/bin/systemctl",
        "@MODPROBE@": shutil.which("modprobe") or "/sbin/modprobe",
    }
    for key, value in subst.items():
        text = text.replace(key, value)
    return text


def target_paths(root: str = "/", runtime: bool = False) -> dict:
    from pathlib import Path

    return {name: Path(root) / dirs[runtime] / name for name, dirs in TARGETS.items()}


def _live(root: str) -> bool:
    return os.path.realpath(root) == "/"


def reload_managers(log=print) -> None:
    """Tell udevd and systemd about changed files, when they are running."""
    import shutil
    import subprocess

    jobs = []
    if os.path.exists("/run/udev/control") and shutil.which("udevadm"):
        jobs.append(["udevadm", "control", "--reload"])
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        jobs.append(["systemctl", "daemon-reload"])
    for argv in jobs:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if proc.returncode:
            log(f"warning: {' '.join(argv)} failed: {proc.stderr.strip()}")
        else:
            log(f"ran {' '.join(argv)}")


def install(root: str = "/", runtime: bool = False, cmd: str | None = None, log=print) -> list:
    """Write the rules and unit (only when they differ); returns the files changed."""
    changed = []
    for name, path in target_paths(root, runtime).items():
        text = render(name, cmd)
        if path.exists() and path.read_text() == text:
            log(f"unchanged {path}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        tmp.replace(path)  # udevd may read the rules at any moment: never a half file
        log(f"wrote {path}")
        changed.append(path)
    if changed and _live(root):
        reload_managers(log)
    return changed


def uninstall(root: str = "/", runtime: bool = False, log=print) -> list:
    """Remove the rules and unit this command installed; returns the files removed."""
    removed = []
    for path in target_paths(root, runtime).values():
        try:
            if MARK not in path.read_text():
                log(f"left alone {path}: not ours")
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        log(f"removed {path}")
        removed.append(path)
    if removed and _live(root):
        reload_managers(log)
    return removed


if __name__ == "__main__":
    if sys.argv[1:2] == ["udev-info"] and len(sys.argv) == 3:  # the udev rule, as a plain script
        sys.exit(udev_info(sys.argv[2]))
    from impv4l2.cli import main  # python -m impv4l2.install: the fallback command()

    sys.exit(main())
