"""Command line: ``impv4l2 serve``, ``impv4l2 list``, ``impv4l2 uvc``."""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import logging
import os
import sys

from . import __version__
from . import config as config_mod

log = logging.getLogger("impv4l2")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load_config(args: argparse.Namespace) -> config_mod.Config:
    """The config file with the command line's overrides (also what SIGHUP reloads)."""
    cfg = config_mod.load(args.config)
    if getattr(args, "backend", None):
        cfg.backend = args.backend
    if getattr(args, "mount", None) is not None:
        cfg.transport.mount = args.mount
    if getattr(args, "cuse", None):
        cfg.transport.cuse = args.cuse
    if getattr(args, "mmap_mode", None):
        cfg.transport.mmap_mode = args.mmap_mode
    if args.verbose:
        cfg.log_level = "debug"
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import Daemon

    try:
        cfg = _load_config(args)
    except config_mod.ConfigError as e:
        log.error("config: %s", e)
        return 2
    try:
        return Daemon(cfg, loader=lambda: _load_config(args)).run()
    except Exception as e:  # one clear line, not a traceback, for start-up failures
        log.error("cannot start: %s", e, exc_info=args.verbose)
        return 1


def cmd_install(args: argparse.Namespace) -> int:
    from . import install

    try:
        install.install(args.root, args.runtime)
    except OSError as e:
        log.error("install: %s", e)
        return 1
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from . import install

    try:
        install.uninstall(args.root, args.runtime)
    except OSError as e:
        log.error("uninstall: %s", e)
        return 1
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    from . import bundle

    try:
        out = bundle.bundle(args.dir, arch=args.arch, prefix=args.prefix, cc=args.cc, force=args.force)
    except bundle.BundleError as e:
        log.error("bundle: %s", e)
        return 1
    print(out)
    return 0


def cmd_udev_info(args: argparse.Namespace) -> int:
    from . import install

    return install.udev_info(args.devnode)


# ---------------------------------------------------------------- list

def _query_node(path: str) -> dict | None:
    from linuxpy.video import raw

    from .install import role_of

    def ioc(fd: int, cmd: int, st: ctypes.Structure) -> bool:
        try:
            fcntl.ioctl(fd, cmd & 0xFFFFFFFF, st)
            return True
        except OSError:
            return False

    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        cap = raw.v4l2_capability()
        if not ioc(fd, raw.IOC.QUERYCAP, cap) or cap.driver != b"impv4l2":
            return None
        caps = cap.device_caps
        card = cap.card.decode()
        role = role_of(card, cap.bus_info.decode(), caps)
        formats: dict[str, list[str]] = {}
        buftypes = {
            "capture": [raw.BufType.VIDEO_CAPTURE, raw.BufType.VIDEO_CAPTURE_MPLANE],
            "output": [raw.BufType.VIDEO_OUTPUT, raw.BufType.VIDEO_OUTPUT_MPLANE],
        }
        for direction, types in buftypes.items():
            for bt in types:
                names = []
                for i in range(64):
                    fmt = raw.v4l2_fmtdesc(index=i, type=bt)
                    if not ioc(fd, raw.IOC.ENUM_FMT, fmt):
                        break
                    names.append(fmt.pixelformat.to_bytes(4, "little").decode(errors="replace"))
                if names:
                    formats[direction] = names
                    break
        return {"card": card, "role": role, "bus_info": cap.bus_info.decode(), "formats": formats}
    finally:
        os.close(fd)


def list_nodes(mount: str) -> list[dict]:
    nodes = []
    names = sorted(os.listdir(mount)) if os.path.isdir(mount) else []
    for name in names:
        info = _query_node(os.path.join(mount, name))
        if info is None:
            continue
        paths = {"fuse": os.path.join(mount, name)}
        cuse = f"/dev/{name}"
        if os.path.exists(f"/sys/class/cuse/{name}") and os.path.exists(cuse):
            paths["cuse"] = cuse
        elif os.path.islink(cuse):
            paths["link"] = cuse
        nodes.append({"name": name, **info, "paths": paths})
    return nodes


def _mount_of(args: argparse.Namespace) -> str | None:
    """--mount, else the configuration's transport.mount; None (logged) on a bad configuration."""
    if args.mount is not None:
        return args.mount
    try:
        return config_mod.load(args.config).transport.mount
    except config_mod.ConfigError as e:
        log.error("config: %s", e)
        return None


def cmd_list(args: argparse.Namespace) -> int:
    mount = _mount_of(args)
    if mount is None:
        return 2
    nodes = list_nodes(mount)
    if args.json:
        json.dump(nodes, sys.stdout, indent=2)
        print()
        return 0 if nodes else 1
    if not nodes:
        print(f"no impv4l2 nodes under {mount} (is `impv4l2 serve` running?)", file=sys.stderr)
        return 1
    for n in nodes:
        fmts = "; ".join(f"{d}: {' '.join(f)}" for d, f in n["formats"].items())
        print(f"{n['name']:8} {n['role']:8} {' '.join(n['paths'].values()):40} {fmts}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Exec a command with the preload shim, so its mmap works on CUSE nodes."""
    from . import shim

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        log.error("run: no command (usage: impv4l2 run -- COMMAND [ARGS...])")
        return 2
    try:
        env = shim.preload_env()
    except RuntimeError as e:
        log.error("run: %s", e)
        return 1
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        log.error("run: %s: %s", cmd[0], e)
        return 127


def cmd_uvc(args: argparse.Namespace) -> int:
    """Be a USB webcam: a UVC gadget fed from one node of the running daemon."""
    from .uvc.app import main as uvc_main

    mount = _mount_of(args)
    if mount is None:
        return 2
    return uvc_main(args.node, args.udc, args.loopback, mount)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="impv4l2", description="Userspace V4L2 driver for Ingenic T31 cameras.")
    p.add_argument("--version", action="version", version=f"impv4l2 {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log every ioctl")
    p.add_argument("--config", help=f"TOML configuration (default {config_mod.DEFAULT_PATH} if present)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the driver and serve its V4L2 nodes")
    s.add_argument("--backend", choices=["sim", "t31"], help="hardware backend (default sim)")
    s.add_argument("--mount", help="FUSE mount point (default /run/impv4l2; '' for none)")
    s.add_argument("--cuse", choices=["auto", "on", "off"], help="serve /dev/videoN through CUSE")
    s.add_argument("--mmap-mode", choices=["auto", "passthrough", "direct", "cached"])
    s.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    s.add_argument("--config", default=argparse.SUPPRESS, help="TOML configuration")
    s.set_defaults(func=cmd_serve)

    for name, func, what in (("install", cmd_install, "install the udev rules and the systemd unit"),
                             ("uninstall", cmd_uninstall, "remove what install wrote")):
        i = sub.add_parser(name, help=what, description=f"{what[0].upper()}{what[1:]} "
                           "(/etc/udev/rules.d, /etc/systemd/system) and reload udevd and systemd.")
        i.add_argument("--root", default="/", help="install under this directory (default /)")
        i.add_argument("--runtime", action="store_true",
                       help="use /run/udev/rules.d and /run/systemd/system (gone after reboot)")
        i.set_defaults(func=func)

    u = sub.add_parser("udev-info", help="print udev properties of an impv4l2 node (used by the rules)")
    u.add_argument("devnode")
    u.set_defaults(func=cmd_udev_info)

    b = sub.add_parser("bundle", help="write what goes onto a camera: package, shim, init script, mdev rules",
                       description="Write a self-contained tree for PREFIX on a camera (python3 is all it "
                       "needs there); MANIFEST inside lists what it holds.")
    b.add_argument("dir", help="directory to write (absent or empty)")
    b.add_argument("--arch", help="target: mipsel (T31), x86_64, aarch64 or armhf (default: this machine's)")
    b.add_argument("--cc", help="C compiler for the shim (default: the arch's Debian cross compiler)")
    b.add_argument("--prefix", default="/opt/impv4l2", help="where the tree goes on the camera (default %(default)s)")
    b.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    b.set_defaults(func=cmd_bundle)

    ls = sub.add_parser("list", help="list the nodes of a running driver")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--mount", help="FUSE mount point to look in")
    ls.set_defaults(func=cmd_list)

    w = sub.add_parser("uvc", help="be a USB webcam: a UVC gadget (configfs) fed from a node of the driver",
                       description="Build a configfs UVC gadget from a capture node's formats, bind it to a "
                       "USB device controller and answer the host; undone at exit (SIGTERM/SIGINT).")
    w.add_argument("--node", default="main", help="main, sub, or the path of a node (default main)")
    w.add_argument("--udc", help="USB device controller (default: the only one; usbip-vudc.0 with --loopback)")
    w.add_argument("--loopback", action="store_true",
                   help="attach the gadget to this machine over USB/IP (usbip-vudc + vhci-hcd + usbipd)")
    w.add_argument("--mount", help="FUSE mount of the driver, to find --node main/sub")
    w.set_defaults(func=cmd_uvc)

    r = sub.add_parser("run", help="run a command with the mmap shim for CUSE nodes (LD_PRELOAD)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
