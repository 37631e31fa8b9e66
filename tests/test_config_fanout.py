"""Configuration of fan-out nodes: [main]/[sub] nodes = N, [nodes.<role>] name and readers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from impv4l2 import config, daemon


def load(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "impv4l2.toml"
    p.write_text(textwrap.dedent(text).lstrip())
    return config.load(str(p))


def test_nodes_per_channel_make_roles(tmp_path):
    cfg = load(tmp_path, """
        [main]
        nodes = 3
        [sub]
        nodes = 2
        [nodes]
        sub = "video30"
        [nodes.main-3]
        readers = "shared"
        name = "video31"
    """)
    assert config.node_roles(cfg) == ["main", "main-2", "main-3", "sub", "sub-2"]
    assert [config.channel_of(r) for r in config.node_roles(cfg)] == ["main"] * 3 + ["sub"] * 2
    assert cfg.nodes.options("main-3") == config.NodeOptions(name="video31", readers="shared")
    assert cfg.nodes.options("main-2") == config.NodeOptions()  # vb2 by default
    assert cfg.nodes.name_of("sub") == "video30"


def test_default_is_one_vb2_node_per_channel():
    cfg = config.Config()
    assert config.node_roles(cfg) == ["main", "sub"]
    assert cfg.nodes.options("main").readers == "vb2"


@pytest.mark.parametrize("text,words", [
    ("[main]\nnodes = 0\n", "main.nodes: 0 is outside 1..8"),
    ("[sub]\nnodes = 9\n", "sub.nodes: 9 is outside 1..8"),
    ("[nodes.main-2]\nreaders = \"shared\"\n", "no such node"),  # main has one node
    ("[main]\nnodes = 2\n[nodes.main-2]\nreaders = \"many\"\n", "'many' is not one of vb2, shared"),
    ("[main]\nnodes = 2\n[nodes.main-2]\ncolour = \"red\"\n", "unknown key"),
    ("[nodes.encoder]\nreaders = \"shared\"\n", "its own context already"),
    ("[nodes.camera]\nname = \"video3\"\n", "not a node role"),
    ("[main]\nnodes = 2\n[nodes]\nmain = \"video5\"\n[nodes.main-2]\nname = \"video5\"\n", "already used"),
])
def test_bad_fanout_keys_name_the_key(tmp_path, text, words):
    with pytest.raises(config.ConfigError) as ex:
        load(tmp_path, text)
    assert words in str(ex.value)


def test_fanout_nodes_get_numbers_after_their_channel(monkeypatch):
    monkeypatch.setattr(daemon, "taken_video_numbers", lambda: {11})
    nodes = config.NodeConfig(base=10, roles={"sub-2": config.NodeOptions(name="video20")})
    names = daemon.allocate_names(["main", "main-2", "sub", "sub-2", "encoder"], nodes)
    assert names == {"main": "video10", "main-2": "video12", "sub": "video13", "sub-2": "video20",
                     "encoder": "video14"}


@pytest.mark.parametrize("card,bus,role", [
    ("impv4l2 main (sim)", "platform:impv4l2-main", "main"),
    ("impv4l2 main-2 (t31)", "platform:impv4l2-main-2", "main-2"),
    ("impv4l2 sub-3 (sim)", "platform:impv4l2-sub-3", "sub-3"),
    ("impv4l2 sub (sim)", "platform:impv4l2-sub", "sub"),
    ("UVC Camera", "usb-0000:00:14.0-1", "main"),
])
def test_role_of_a_node_names_its_fanout_role(card, bus, role):
    """What `impv4l2 list` shows and udev's by-id links are named after."""
    from impv4l2.install import role_of
    assert role_of(card, bus, 0) == role
