"""``python -m impv4l2.shim build [DEST]``: build the preload library (setup.sh uses this)."""

from __future__ import annotations

import argparse
import sys

from . import build, default_library_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impv4l2.shim")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile libimpv4l2-preload.so if the source is newer")
    b.add_argument("dest", nargs="?", default=str(default_library_path()))
    b.add_argument("--force", action="store_true")
    b.add_argument("--cc", help="C compiler (default $CC, cc, gcc)")
    args = p.parse_args(argv)
    try:
        print(build(args.dest, cc=args.cc, force=args.force))
    except RuntimeError as e:
        print(f"impv4l2.shim: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
