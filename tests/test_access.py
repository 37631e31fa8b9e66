"""Access on the FUSE door of the real daemon (host): who may open a node, whose memory the
daemon reads and writes.

* The files are root:video 0660 and the kernel enforces it: a process outside group video
  gets EACCES at open, one in it opens (the CUSE door's udev rule: tests/test_vm_access.py).
* process_vm reads and writes (pointers inside restricted ioctls: ext-control arrays,
  USERPTR frames) go to the process that makes the call, never to the one that opened the
  file: a forked child sharing the parent's open file, with different bytes (or none) at
  the same address, sees its own memory used, EFAULT where only the parent has memory, and
  the parent's memory untouched.
"""

from __future__ import annotations

import grp
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from support.daemon import serving, start_daemon
from support.fuse_clients import open_as
from support.paths import CLIENTS, ROOT

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse")]

CLIENT = CLIENTS / "access_client.py"


@pytest.fixture(scope="module")
def daemon():
    """`serve` on the FUSE door only, its mount where any uid may look up the files."""
    tmp = Path(tempfile.mkdtemp(prefix="impv4l2-access-"))
    os.chmod(tmp, 0o755)
    mount, cfg, log = tmp / "mnt", tmp / "impv4l2.toml", tmp / "daemon.log"
    cfg.write_text(textwrap.dedent(f"""
        [transport]
        cuse = "off"
        mount = "{mount}"
        dev_links = false
    """))
    proc = start_daemon(cfg, log)
    try:
        nodes = serving(proc, log, 1)
        roles = dict((role, mount / name) for name, role in
                     (part.split(" (") for part in nodes.replace(")", "").split(", ")))
        yield roles, log
    finally:
        proc.terminate()
        proc.wait(30)
        print("----- daemon log -----\n" + log.read_text())


def run(mode: str, path: Path) -> dict:
    r = subprocess.run([sys.executable, str(CLIENT), mode, str(path)], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_outside_group_video_cannot_open(daemon):
    roles, _ = daemon
    video = grp.getgrnam("video").gr_gid
    nobody = 65534
    for role, path in roles.items():
        st = os.stat(path)
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, video), role
        assert open_as(str(path), nobody, [nobody]) == "EACCES", role
        assert open_as(str(path), nobody, [nobody, video]) == "ok", role


def test_ext_ctrl_pointers_are_read_in_the_calling_process(daemon):
    roles, log = daemon
    out = run("ctrls", roles["sub"])
    assert "exception" not in out, out
    assert (out["own"], out["after_own"]) == ("ok", 22), out  # the caller's array, not the opener's 11
    # only the opener has memory there now: EFAULT, and nothing read from (or written to) it
    assert (out["s_unmapped"], out["g_unmapped"], out["after_unmapped"]) == ("EFAULT", "EFAULT", 22), out
    assert out["parent_bytes"] == out["parent_expected"], out
    assert "Traceback" not in log.read_text()


def test_userptr_frames_go_to_the_calling_process(daemon):
    roles, log = daemon
    out = run("userptr", roles["sub"])
    assert "exception" not in out, out
    assert out["qbuf_unmapped"] == "EFAULT", out  # vb2 pins the caller's pages at QBUF
    assert out["qbuf"] == ["ok", "ok"] and out["streamon"] == "ok" and out["dqbuf"] == "ok", out
    assert out["bytesused"] > 0 and out["frame_nonzero"] > 0, out  # the frame landed in the caller
    assert out["parent_untouched"], out
    assert "Traceback" not in log.read_text()
