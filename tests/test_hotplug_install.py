"""`impv4l2 install/uninstall` into a temporary root, and the udev-info helper, natively."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from impv4l2 import install

from support.daemon import IMPV4L2

RULES = "etc/udev/rules.d/70-impv4l2.rules"
UNIT = "etc/systemd/system/impv4l2.service"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*IMPV4L2, *args], capture_output=True, text=True, timeout=60)


def test_install_writes_rules_and_unit_with_this_venv(tmp_path):
    proc = cli("install", "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rules, unit = (tmp_path / RULES).read_text(), (tmp_path / UNIT).read_text()
    exe = install.command()
    assert exe.startswith(sys.prefix)
    for text in (rules, unit):
        assert not re.search(r"@[A-Z_]+@", text), text
    assert f'IMPORT{{program}}="{sys.executable} -I -S {install.__file__} udev-info $devnode"' in rules
    assert 'SUBSYSTEM!="cuse"' in rules and 'GROUP="video", MODE="0660", TAG+="uaccess"' in rules
    assert 'SYMLINK+="v4l/by-id/impv4l2-$env{ID_IMPV4L2_ROLE}-video-index0"' in rules
    assert 'ENV{SYSTEMD_WANTS}+="impv4l2.service"' in rules
    assert f"ExecStart={exe} serve" in unit
    for line in ("Restart=on-failure", "KillSignal=SIGTERM", "TimeoutStopSec=5",
                 "RestartPreventExitStatus=2"):
        assert line in unit.splitlines()
    assert oct((tmp_path / RULES).stat().st_mode & 0o777) == "0o644"
    # a temp root is not the live system: no udevadm/systemctl reload
    assert "ran " not in proc.stdout


def test_install_is_idempotent_and_uninstall_cleans(tmp_path):
    install.install(str(tmp_path), log=lambda m: None)
    mtimes = {p: (tmp_path / p).stat().st_mtime_ns for p in (RULES, UNIT)}
    again = cli("install", "--root", str(tmp_path))
    assert again.returncode == 0 and again.stdout.count("unchanged") == 2, again.stdout
    assert {p: (tmp_path / p).stat().st_mtime_ns for p in (RULES, UNIT)} == mtimes
    # a changed file is rewritten
    (tmp_path / UNIT).write_text("# impv4l2 edited\n")
    assert install.install(str(tmp_path), log=lambda m: None) == [tmp_path / UNIT]
    assert "ExecStart=" in (tmp_path / UNIT).read_text()

    out = cli("uninstall", "--root", str(tmp_path))
    assert out.returncode == 0 and out.stdout.count("removed") == 2
    assert not (tmp_path / RULES).exists() and not (tmp_path / UNIT).exists()
    assert cli("uninstall", "--root", str(tmp_path)).returncode == 0  # nothing left: fine


def test_uninstall_leaves_foreign_files(tmp_path):
    (tmp_path / UNIT).parent.mkdir(parents=True)
    (tmp_path / UNIT).write_text("[Service]\nExecStart=/bin/true\n")
    out = cli("uninstall", "--root", str(tmp_path))
    assert out.returncode == 0 and "not ours" in out.stdout
    assert (tmp_path / UNIT).exists()


def test_runtime_install_goes_to_run(tmp_path):
    assert cli("install", "--root", str(tmp_path), "--runtime").returncode == 0
    assert (tmp_path / "run/udev/rules.d/70-impv4l2.rules").exists()
    assert (tmp_path / "run/systemd/system/impv4l2.service").exists()
    assert not (tmp_path / "etc").exists()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_unit_passes_systemd_analyze(tmp_path):
    install.install(str(tmp_path), log=lambda m: None)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / UNIT)], capture_output=True,
                          text=True, timeout=60)
    bad = [line for line in proc.stderr.splitlines() if "impv4l2.service" in line]
    assert proc.returncode == 0 and not bad, proc.stderr


# ---------------------------------------------------------------- udev-info

@pytest.mark.parametrize("card,bus,caps,role,words", [
    ("impv4l2 main (sim)", "platform:impv4l2-main", 0x04000001 | 0x80000000, "main", ":capture:"),
    ("impv4l2 sub (t31)", "platform:impv4l2-sub", 0x1, "sub", ":capture:"),
    ("impv4l2 encoder", "platform:impv4l2-encoder", 0x4000, "encoder", ":capture:video_output:"),
    ("impv4l2 x", "platform:x", 0x1000, "main", ":capture:"),  # unknown: main
])
def test_udev_properties(card, bus, caps, role, words):
    props = install.udev_properties(install.NodeInfo("impv4l2", card, bus, caps))
    assert props == {"ID_V4L_VERSION": "2", "ID_V4L_PRODUCT": card, "ID_V4L_CAPABILITIES": words,
                     "ID_IMPV4L2_ROLE": role, "ID_PATH": f"platform-impv4l2-{role}"}


# udev runs the helper as a plain script, without site-packages; the CLI runs the same function.
SCRIPT = [sys.executable, "-I", "-S", install.__file__, "udev-info"]


@pytest.mark.parametrize("argv", [SCRIPT, [*IMPV4L2, "udev-info"]], ids=["script", "cli"])
def test_udev_info_refuses_what_is_not_a_v4l2_node(argv):
    for path in ("/dev/null", "/nonexistent/video0"):  # ENOTTY, ENOENT
        proc = subprocess.run([*argv, path], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and proc.stdout == "", proc.stderr
        assert path in proc.stderr


@pytest.mark.root
def test_udev_info_on_a_fuse_node(tmp_path):
    """The helper against a real node of a running driver (FUSE mount)."""
    mnt = tmp_path / "mnt"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[transport]\ncuse = "off"\nmount = "{mnt}"\ndev_links = false\n'
                   '[main]\nwidth = 640\nheight = 360\n[sub]\nwidth = 320\nheight = 180\n')
    log = open(tmp_path / "log", "wb")
    d = subprocess.Popen([*IMPV4L2, "--config", str(cfg), "serve"], stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while not (mnt / "video10").exists() and d.poll() is None and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        nodes = sorted(n for n in os.listdir(mnt) if n.startswith("video"))
        assert nodes, (tmp_path / "log").read_text()
        roles = {}
        for name in nodes:
            proc = subprocess.run([*SCRIPT, str(mnt / name)], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr + (tmp_path / "log").read_text()
            props = dict(line.split("=", 1) for line in proc.stdout.splitlines())
            assert props["ID_V4L_VERSION"] == "2" and props["ID_V4L_PRODUCT"].startswith("impv4l2 ")
            roles[props["ID_IMPV4L2_ROLE"]] = props["ID_V4L_CAPABILITIES"]
        assert roles["main"] == roles["sub"] == ":capture:"
        assert roles.get("encoder", ":capture:video_output:") == ":capture:video_output:"
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(10)
        log.close()
