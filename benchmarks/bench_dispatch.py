#!/usr/bin/env python3
"""The V4L2 core's own cost: ioctls on a capture node's handle in-process, no transport.

    PYTHONPATH=<tree> .venv/bin/python benchmarks/bench_dispatch.py [--n 20000] [--json]

Opens the sim main node and runs each command --n times through ``handle.ioctl`` (the entry
the transports call), best of 3 rounds.  Prints µs per call per command.  Run it once per tree
(e.g. before and after a core change) on the same machine, interleaved, and compare ratios:
FUSE round trips in bench_fuzz/bench_transport are bimodal on these VMs, this is not.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import sys
import time

sys.path.insert(0, os.environ.get("PYTHONPATH", "").split(":")[0] or
                os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from impv4l2.driver import load_backend  # noqa: E402
from impv4l2.fileops import Caller  # noqa: E402
from impv4l2.v4l2 import abi  # noqa: E402
from impv4l2.v4l2.capture import CaptureNode  # noqa: E402

CAP, OUT = abi.BufType.VIDEO_CAPTURE, abi.BufType.VIDEO_OUTPUT


def _arg(struct, **fields) -> bytearray:
    a = bytearray(ctypes.sizeof(struct))
    s = struct.from_buffer(a)
    for k, v in fields.items():
        setattr(s, k, v)
    del s
    return a


CASES = {  # name -> (ioctl, struct, fields, errno expected or 0)
    "QUERYCAP": ("QUERYCAP", abi.v4l2_capability, {}, 0),
    "G_FMT": ("G_FMT", abi.v4l2_format, {"type": CAP}, 0),
    "ENUM_FMT": ("ENUM_FMT", abi.v4l2_fmtdesc, {"type": CAP, "index": 0}, 0),
    "ENUM_FMT wrong type": ("ENUM_FMT", abi.v4l2_fmtdesc, {"type": OUT}, errno.EINVAL),
    "QUERYCTRL": ("QUERYCTRL", abi.v4l2_queryctrl, {"id": abi.CID.BRIGHTNESS}, 0),
    "G_CTRL": ("G_CTRL", abi.v4l2_control, {"id": abi.CID.BRIGHTNESS}, 0),
    "unknown ioctl": (None, None, {}, errno.ENOTTY),
}


def run(h, case, n: int) -> float:
    name, struct, fields, want = case
    cmd = abi.VIDIOC[name] if name else 0xC0DE5601
    template = _arg(struct, **fields) if struct else bytearray(4)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            arg = bytearray(template)
            try:
                h.ioctl(cmd, arg, None)
                got = 0
            except OSError as e:
                got = e.errno
        best = min(best, time.perf_counter() - t0)
        assert got == want, (name, got, want)
    return best / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    backend = load_backend("sim", fps=5)
    node = CaptureNode("video10", backend, backend.channels[0])
    h = node.open(Caller(os.getpid(), 0, 0))
    try:
        res = {k: run(h, c, args.n) for k, c in CASES.items()}
    finally:
        h.release()
        node.close()
        backend.close()
    if args.json:
        print(json.dumps(res))
        return
    print("| ioctl | µs/call |\n|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:.2f} |")


if __name__ == "__main__":
    main()
