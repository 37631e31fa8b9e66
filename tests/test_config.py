"""Configuration file, command line, node numbering: native, no hardware, no kernel help."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from impv4l2 import __version__, config, daemon

from support.daemon import IMPV4L2



def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "impv4l2.toml"
    p.write_text(textwrap.dedent(text).lstrip())
    return str(p)


# ---------------------------------------------------------------- load

def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    cfg = config.load()
    assert cfg == config.Config()
    assert (cfg.backend, cfg.nodes.base, cfg.hotplug.enable, cfg.hotplug.devices) == ("sim", 10, "auto", [])


def test_backend_options_follow_a_command_line_backend(tmp_path):
    """serve --backend overrides the file's backend after loading: options follow it."""
    cfg = config.load(write(tmp_path, """
        backend = "t31"
        [t31]
        sensor = "gc2053"
        [sim]
        source = "clip.mp4"
    """))
    assert cfg.backend_options == {"sensor": "gc2053"}
    cfg.backend = "sim"
    assert cfg.backend_options == {"source": "clip.mp4"}


def test_full_file_is_read(tmp_path):
    cfg = config.load(write(tmp_path, """
        backend = "t31"
        log_level = "debug"
        [t31]
        sensor = "gc2053"
        [main]
        width = 1280
        height = 720
        fps = 30
        [nodes]
        base = 40
        sub = "video7"
        buffer_mb = 8
        [encoder]
        bitrate = 500000
        rc_mode = "cbr"
        [transport]
        cuse = "off"
        mount = ""
        [hotplug]
        enable = true
        devices = ["loop7", "framechan*"]
    """))
    assert cfg.backend == "t31" and cfg.log_level == "debug"
    assert cfg.backend_options == {"sensor": "gc2053"}
    assert (cfg.main.width, cfg.main.height, cfg.main.fps) == (1280, 720, 30)
    assert (cfg.sub.width, cfg.sub.height) == (640, 360)  # untouched section keeps defaults
    assert (cfg.nodes.base, cfg.nodes.sub, cfg.nodes.buffer_mb, cfg.nodes.total_buffer_mb) == (40, "video7", 8, 0)
    assert (cfg.encoder.bitrate, cfg.encoder.rc_mode) == (500000, "cbr")
    assert (cfg.transport.cuse, cfg.transport.mount) == ("off", "")
    assert cfg.hotplug.enable == "on"  # TOML true is "on"
    assert cfg.hotplug.devices == ["loop7", "framechan*"]


# Each bad file: (text, line the error must name, words the message must contain).
BAD = [
    ("backend = \"sim\"\n[main]\nwidth = = 3\n", 3, "Invalid"),
    ("[main]\nwidth = 1280\nheight = 721\n", 3, "even"),
    ("backend = \"sim\"\n\n[transport]\ncuse = \"maybe\"\n", 4, "not one of auto, on, off"),
    ("[nodes]\nbase = 10\nbogus = 1\n", 3, "unknown key"),
    ("[encoder]\nbitrate = \"fast\"\n", 2, "integer"),
    ("[hotplug]\nenable = 3\n", 2, "string"),
    ("[hotplug]\ndevices = \"avpu\"\n", 2, "list of non-empty strings"),
    ("[hotplug]\ndevices = [\"avpu\", 3]\n", 2, "list of non-empty strings"),
    ("\n\n[nodes]\nmain = \"cam0\"\n", 4, "not a videoN name"),
    ("[nodes]\nmain = \"video3\"\nsub = \"video3\"\n", 3, "already used by nodes.main"),
    ("log_level = \"loud\"\n", 1, "not one of debug"),
    ("# a comment\n[colour]\nx = 1\n", 2, "unknown key"),
    ("[sub]\nfps = 0\n", 2, "outside 1..60"),
    ("[nodes]\nbuffer_mb = -4\n", 2, "non-negative integer"),
]


@pytest.mark.parametrize("text,line,words", BAD, ids=[b[2] for b in BAD])
def test_bad_file_names_its_line(tmp_path, text, line, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(path))
    msg = str(exc.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert words in msg, msg
    assert "\n" not in msg


def test_missing_explicit_file(tmp_path):
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(str(tmp_path / "nope.toml"))


def test_not_utf8(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes(b"backend = \"s\xe9m\"\n")
    with pytest.raises(config.ConfigError, match=str(p)):
        config.load(str(p))


# ---------------------------------------------------------------- command line

def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*IMPV4L2, *args], capture_output=True, text=True, timeout=timeout)


def test_version_and_help():
    assert run_cli("--version").stdout.strip() == f"impv4l2 {__version__}"
    top = run_cli("--help")
    assert top.returncode == 0
    for sub in ("serve", "list", "install", "uninstall", "udev-info"):
        assert sub in top.stdout
    serve = run_cli("serve", "--help")
    assert serve.returncode == 0 and "--backend" in serve.stdout and "--config" in serve.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_serve_with_bad_config_exits_2_before_opening_anything(tmp_path, where):
    bad = write(tmp_path, """
        [transport]
        mount = "%s"
        [main]
        fps = 999
    """ % (tmp_path / "mnt"))
    args = ["--config", bad, "serve"] if where == "before" else ["serve", "--config", bad]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, proc.stderr
    assert f"{bad}:4: main.fps: 999 is outside 1..60" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mnt").exists()  # the mount point was never created
    with open("/proc/mounts") as f:
        assert str(tmp_path) not in f.read()


# ---------------------------------------------------------------- node numbering

@pytest.fixture
def taken(monkeypatch):
    """Pretend these /dev/videoN numbers exist."""
    numbers: set[int] = set()
    monkeypatch.setattr(daemon, "taken_video_numbers", lambda: set(numbers))
    return numbers


def test_names_start_at_base(taken):
    names = daemon.allocate_names(["main", "sub", "encoder"], config.NodeConfig(base=10))
    assert names == {"main": "video10", "sub": "video11", "encoder": "video12"}


def test_names_skip_taken_numbers(taken):
    taken.update({0, 1, 10, 12, 13})
    names = daemon.allocate_names(["main", "sub", "encoder"], config.NodeConfig(base=10))
    assert names == {"main": "video11", "sub": "video14", "encoder": "video15"}
    assert not {int(n[5:]) for n in names.values()} & taken


def test_explicit_names_are_kept_and_reserved(taken):
    taken.update({10})
    names = daemon.allocate_names(["main", "sub", "encoder"],
                                  config.NodeConfig(base=10, sub="video11"))
    assert names == {"main": "video12", "sub": "video11", "encoder": "video13"}


def test_taken_numbers_are_read_from_dev(tmp_path, monkeypatch):
    real_glob = daemon.glob.glob
    fake = tmp_path / "dev"
    fake.mkdir()
    for n in ("video0", "video3", "video-bogus", "vbi1"):
        (fake / n).touch()
    monkeypatch.setattr(daemon.glob, "glob", lambda pat: real_glob(str(fake / os.path.basename(pat)))
                        if pat.startswith("/dev/") else [])
    assert daemon.taken_video_numbers() == {0, 3}
    names = daemon.allocate_names(["main", "sub"], config.NodeConfig(base=0))
    assert names == {"main": "video1", "sub": "video2"}
