"""The daemon's life and death with clients attached (host, FUSE door).

After kill -9 the next start removes its own stale mount and /dev/videoN links, never
another program's, and serves the same node numbers; SIGTERM while an encoder client waits
in a drain ends that client's call (LAST or an error), never a hang."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import json
import textwrap
import time
from pathlib import Path

import pytest

from impv4l2.daemon import remove_stale_links

from support.daemon import free_base, serving, start_daemon
from support.paths import CLIENTS, ROOT

pytestmark = pytest.mark.root


def test_remove_stale_links_only_ours(tmp_path):
    dev, mount = tmp_path / "dev", "/run/impv4l2-test"
    dev.mkdir()
    (dev / "video12").symlink_to(f"{mount}/video12")        # ours
    (dev / "video13").symlink_to("/elsewhere/video13")       # another program's link
    (dev / "video14").symlink_to(f"{mount}/video15")         # not the shape we make
    (dev / "video16").write_text("")                         # not a link
    assert remove_stale_links(mount, str(dev)) == [str(dev / "video12")]
    assert sorted(p.name for p in dev.iterdir()) == ["video13", "video14", "video16"]
    assert remove_stale_links("", str(dev)) == []


def test_kill9_then_restart_keeps_node_numbers(tmp_path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    base, mount = free_base(), tmp_path / "mnt"
    cfg, log = tmp_path / "impv4l2.toml", tmp_path / "daemon.log"
    cfg.write_text(textwrap.dedent(f"""
        [main]
        width = 640
        height = 360
        [nodes]
        base = {base}
        [transport]
        cuse = "off"
        mount = "{mount}"
    """))
    first = start_daemon(cfg, log)
    try:
        nodes = serving(first, log, 1)
        link = f"/dev/video{base + 2}"
        assert "(encoder)" in nodes and f"video{base + 2} (encoder)" in nodes, nodes
        assert os.readlink(link) == f"{mount}/video{base + 2}"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert os.path.islink(link)  # left behind by the dead run
        second = start_daemon(cfg, log)
        try:
            assert serving(second, log, 2) == nodes  # the same numbers
            assert "removed stale link" in log.read_text()
            assert os.readlink(link) == f"{mount}/video{base + 2}"
            assert (mount / f"video{base}").exists()  # the new mount serves
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(20)
        assert not os.path.lexists(link), "SIGTERM removes the link"
    finally:
        if first.poll() is None:
            first.kill()


def _fuse_daemon(tmp_path: Path) -> tuple[Path, Path, subprocess.Popen]:
    """A daemon on the FUSE door only: (mount, log, process)."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    mount, cfg, log = tmp_path / "mnt", tmp_path / "impv4l2.toml", tmp_path / "daemon.log"
    cfg.write_text(textwrap.dedent(f"""
        [transport]
        cuse = "off"
        mount = "{mount}"
        dev_links = false
    """))
    return mount, log, start_daemon(cfg, log)


def test_sigterm_during_an_encoder_drain_ends_the_wait(tmp_path):
    mount, log, daemon = _fuse_daemon(tmp_path)
    client = None
    try:
        nodes = serving(daemon, log, 1)
        enc = re.search(r"(video\d+) \(encoder\)", nodes).group(1)
        client = subprocess.Popen([sys.executable, str(CLIENTS / "soak_client.py"),
                                   "drain-parked", str(mount / enc), "0", "320", "240"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert client.stdout.readline().strip() == "draining", client.stderr.read()
        time.sleep(0.5)  # the DQBUF is parked in the daemon now
        assert client.poll() is None, "the drain ended by itself: nothing to test"
        t0 = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        out, err = client.communicate(timeout=10)  # a hang fails here
        res = json.loads(out)
        assert res["result"] in ("LAST", "ENODEV"), (res, err)
        assert time.monotonic() - t0 < 5
        assert daemon.wait(20) == 0, log.read_text()
    finally:
        for p in (client, daemon):
            if p is not None and p.poll() is None:
                p.kill()


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """Signal one thread of ``pid`` (what kill(2) does when the kernel picks a busy process's
    other thread; Python has no tgkill)."""
    import ctypes
    import platform

    nr = {"x86_64": 234, "i686": 270, "aarch64": 131, "mips": 4217}.get(platform.machine())
    if nr is None:
        pytest.skip(f"tgkill syscall number for {platform.machine()} not known here")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(nr, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")


def test_signals_caught_by_a_worker_thread_are_handled(tmp_path):
    """SIGUSR2 then SIGTERM, each delivered to a thread that is not the main one, are acted on
    (the soak once waited 10 s for a stats line that never came)."""
    mount, log, daemon = _fuse_daemon(tmp_path)
    try:
        serving(daemon, log, 1)
        workers = [int(t) for t in os.listdir(f"/proc/{daemon.pid}/task") if int(t) != daemon.pid]
        assert workers, "the daemon has no other thread: nothing to test"
        _tgkill(daemon.pid, workers[-1], signal.SIGUSR2)
        deadline = time.monotonic() + 5
        while "stats: {" not in log.read_text():
            assert time.monotonic() < deadline, "SIGUSR2 on a worker thread was not handled:\n" + log.read_text()
            time.sleep(0.05)
        _tgkill(daemon.pid, workers[0], signal.SIGTERM)
        assert daemon.wait(10) == 0, log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
