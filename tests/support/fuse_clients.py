"""Clients of a served file, as separate processes (the kernel sees real callers)."""

from __future__ import annotations

import os
import subprocess
import sys

from .paths import CLIENTS, ROOT, TESTS

ECHO_CLIENT = TESTS / "support" / "fuse_echo_device.py"  # its __main__ is the echo client


def client(*args: object) -> subprocess.Popen:
    """Run the echo device's client side (``fuse_echo_device.py <command> <path> ...``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(ECHO_CLIENT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(p: subprocess.Popen, timeout: float = 30) -> str:
    """Wait for a client; its stdout (it must have exited 0)."""
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"client failed: {err}"
    return out


def open_as(path: str, uid: int, gids: list[int]) -> str:
    """open(path) in a child running as uid with exactly these groups: 'ok' or the errno name."""
    def drop():
        os.setgroups(gids)
        os.setgid(gids[0])
        os.setuid(uid)
    # the system python: the venv's interpreter may live under root's 0700 home; the program
    # comes on stdin, since the other uid may not read the checkout either
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    return subprocess.run([py, "-I", "-", path], input=(CLIENTS / "open_as.py").read_text(),
                          capture_output=True, text=True, preexec_fn=drop, timeout=30).stdout.strip()
