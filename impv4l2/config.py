"""Daemon configuration: one TOML file (``/etc/impv4l2.toml`` or ``--config``).

Every key has a default, so no file is needed.  Errors name the file and the
line: TOML syntax errors carry tomllib's position; unknown keys and bad values
are located by searching the key in the file text.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from typing import Any

DEFAULT_PATH = "/etc/impv4l2.toml"


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names file and line."""


@dataclasses.dataclass
class ChannelConfig:
    width: int
    height: int
    fps: int
    # Capture nodes of the channel: main, then main-2 ... main-N (fan-out: each its own
    # queue, memory type and format; one frame delivery and one encoder per format shared).
    nodes: int = 1


MAX_NODES_PER_CHANNEL = 8
READERS = ("vb2", "shared")


@dataclasses.dataclass
class NodeOptions:
    """``[nodes.<role>]``: one node's options (``[nodes.main-2]``, ``[nodes.sub]`` ...)."""

    name: str = ""  # an explicit videoN
    # vb2: one file handle owns the queue (others get EBUSY); shared: every open file gets
    # its own queue of the node's one stream (non-vb2, as v4l2loopback's readers)
    readers: str = "vb2"


@dataclasses.dataclass
class NodeConfig:
    base: int = 10  # first /dev/videoN number tried; taken numbers are skipped
    # Buffer memory per node and for all nodes, MiB; 0: the backend's default
    # (t31: 12 and 24, sim: no limit).  REQBUFS grants what fits.
    buffer_mb: int = 0
    total_buffer_mb: int = 0
    main: str = ""  # explicit names override numbering, e.g. "video20"
    sub: str = ""
    encoder: str = ""
    roles: dict[str, NodeOptions] = dataclasses.field(default_factory=dict)  # [nodes.<role>] tables

    def options(self, role: str) -> NodeOptions:
        return self.roles.get(role) or NodeOptions(name=getattr(self, role, "") if role in _NAMED else "")

    def name_of(self, role: str) -> str:
        return self.options(role).name


_NAMED = ("main", "sub", "encoder")  # roles whose name may also be a plain [nodes] key
_ROLE = re.compile(r"^(?:(main|sub)(?:-([0-9]+))?|encoder)$")


def node_roles(cfg: "Config") -> list[str]:
    """The capture node roles of the configuration: main, main-2 .. main-N, sub, sub-2 ..."""
    roles = []
    for ch in ("main", "sub"):
        roles += [ch] + [f"{ch}-{k}" for k in range(2, getattr(cfg, ch).nodes + 1)]
    return roles


def channel_of(role: str) -> str:
    """main-2 -> main"""
    return role.split("-", 1)[0]


@dataclasses.dataclass
class EncoderDefaults:
    bitrate: int = 2_000_000
    gop: int = 50
    profile: str = "high"
    rc_mode: str = "capped_quality"


@dataclasses.dataclass
class TransportConfig:
    cuse: str = "auto"  # auto | on | off
    mount: str = "/run/impv4l2"  # "" disables the FUSE mount
    mmap_mode: str = "auto"  # auto | passthrough | direct | cached
    dev_links: bool = True  # /dev/videoN symlinks to FUSE files when there is no CUSE


@dataclasses.dataclass
class HotplugConfig:
    # auto: on for backends with real hardware (t31), or when ``devices`` is set.
    enable: str = "auto"  # auto | on | off (true/false accepted)
    # Kernel device names (fnmatch patterns, e.g. "framechan*") that make up the
    # hardware; all must be present.  Empty: the backend's default
    # (impv4l2.hotplug.DEFAULT_DEVICES).
    devices: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DayNightConfig:
    """[daynight]: IR-cut filter and IR LED lines (sysfs GPIO numbers as thingino boards
    name them, -1: none), their active values, and the auto mode's hysteresis on the
    ISP's total gain (x1 = well lit): night at >= night_gain, day at <= day_gain, each
    after ``hold`` samples ``interval_ms`` apart."""

    mode: str = "day"  # initial Day/Night control: day | night | auto
    ircut_gpio: int = -1
    irled_gpio: int = -1
    ircut_day: int = 1  # line value with the filter in (day)
    irled_on: int = 1  # line value with the LEDs lit
    gpio_root: str = "/sys/class/gpio"
    night_gain: int = 8
    day_gain: int = 2
    interval_ms: int = 1000
    hold: int = 3


@dataclasses.dataclass
class Config:
    backend: str = "sim"
    log_level: str = "info"  # debug | info | warning | error (-v forces debug)
    # Every backend's table ([sim], [t31]); the one used is chosen by ``backend``
    # after command-line overrides (serve --backend).
    backend_tables: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    main: ChannelConfig = dataclasses.field(default_factory=lambda: ChannelConfig(1920, 1080, 25))
    sub: ChannelConfig = dataclasses.field(default_factory=lambda: ChannelConfig(640, 360, 25))
    nodes: NodeConfig = dataclasses.field(default_factory=NodeConfig)
    encoder: EncoderDefaults = dataclasses.field(default_factory=EncoderDefaults)
    transport: TransportConfig = dataclasses.field(default_factory=TransportConfig)
    hotplug: HotplugConfig = dataclasses.field(default_factory=HotplugConfig)
    daynight: DayNightConfig = dataclasses.field(default_factory=DayNightConfig)
    path: str | None = None

    @property
    def backend_options(self) -> dict[str, Any]:
        """The options table of the selected backend."""
        return self.backend_tables.get(self.backend, {})


# Allowed values per choice field, as data.
_CHOICES = {
    ("transport", "cuse"): ("auto", "on", "off"),
    ("transport", "mmap_mode"): ("auto", "passthrough", "direct", "cached"),
    ("encoder", "profile"): ("baseline", "main", "high"),
    ("encoder", "rc_mode"): ("fixqp", "cbr", "vbr", "capped_vbr", "capped_quality"),
    ("", "backend"): ("sim", "t31"),
    ("", "log_level"): ("debug", "info", "warning", "error"),
    ("hotplug", "enable"): ("auto", "on", "off"),
    ("daynight", "mode"): ("day", "night", "auto"),
}

# Values rewritten before checking, as data: TOML booleans for on/off switches.
_COERCE = {
    ("hotplug", "enable"): {True: "on", False: "off"},
}

_NODE_NAME = re.compile(r"^video[0-9]+$")

_SECTIONS: dict[str, type] = {
    "nodes": NodeConfig,
    "encoder": EncoderDefaults,
    "transport": TransportConfig,
    "main": ChannelConfig,
    "sub": ChannelConfig,
    "hotplug": HotplugConfig,
    "daynight": DayNightConfig,
}


def _node_options(role: str, table: dict, fail) -> NodeOptions:
    """A ``[nodes.<role>]`` table."""
    if not _ROLE.match(role):
        fail("nodes", role, "not a node role (main, main-N, sub, sub-N, encoder)")
    opts = NodeOptions()
    for k, v in table.items():
        if k not in ("name", "readers") or not isinstance(v, str):
            fail(f"nodes.{role}", k, "unknown key or not a string (known: name, readers)")
        setattr(opts, k, v)
    if opts.readers not in READERS:
        fail(f"nodes.{role}", "readers", f"{opts.readers!r} is not one of {', '.join(READERS)}")
    if opts.readers == "shared" and role == "encoder":
        fail(f"nodes.{role}", "readers", "the M2M encoder gives every open file its own context already")
    return opts


def _line_of(text: str, section: str, key: str) -> int:
    """Best-effort line number of ``key`` (inside ``[section]``) in the file."""
    lines = text.splitlines()
    in_section = section == ""
    for no, line in enumerate(lines, 1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([^\]]+?)\s*\]", stripped)
        if header:
            in_section = header.group(1) == section
            if key == "" and in_section:
                return no
            continue
        if in_section and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return no
    return 0


def load(path: str | None = None) -> Config:
    """Load ``path`` (or the default file when it exists) into a Config."""
    explicit = path is not None
    path = path or DEFAULT_PATH
    cfg = Config()
    if not os.path.exists(path):
        if explicit:
            raise ConfigError(f"{path}: no such file")
        return cfg
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode()
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib says "... (at line N, column M)": lead with path:N like a compiler.
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        raise ConfigError(f"{path}:{m.group(1)}: {e}" if m else f"{path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.path = path

    def fail(section: str, key: str, msg: str) -> None:
        # The key's line; else its section's header; else a top-level table's header.
        line = _line_of(text, section, key) or (_line_of(text, section, "") if section else
                                                 _line_of(text, key, ""))
        where = f"{path}:{line}" if line else path
        name = f"{section}.{key}" if section else key
        raise ConfigError(f"{where}: {name}: {msg}")

    def check_choice(section: str, key: str, value: Any) -> None:
        allowed = _CHOICES.get((section, key))
        if allowed and value not in allowed:
            fail(section, key, f"{value!r} is not one of {', '.join(allowed)}")

    for key, value in data.items():
        if key in ("backend", "log_level"):
            if not isinstance(value, str):
                fail("", key, "must be a string")
            check_choice("", key, value)
            setattr(cfg, key, value)
        elif key in ("sim", "t31"):
            if not isinstance(value, dict):
                fail("", key, "must be a table")
            cfg.backend_tables[key] = dict(value)
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                fail("", key, "must be a table")
            cls = _SECTIONS[key]
            current = getattr(cfg, key)
            fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "roles"}
            for k, v in value.items():
                if key == "nodes" and isinstance(v, dict):
                    current.roles[k] = _node_options(k, v, fail)
                    continue
                if k not in fields:
                    fail(key, k, f"unknown key (known: {', '.join(fields)})")
                v = _COERCE.get((key, k), {}).get(v, v) if isinstance(v, bool) else v
                expected = type(getattr(current, k))
                if expected is list and not (isinstance(v, list) and all(isinstance(x, str) and x for x in v)):
                    fail(key, k, f"must be a list of non-empty strings, not {v!r}")
                if expected is int and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                    fail(key, k, f"must be a non-negative integer, not {v!r}")
                if expected is str and not isinstance(v, str):
                    fail(key, k, f"must be a string, not {v!r}")
                if expected is bool and not isinstance(v, bool):
                    fail(key, k, f"must be true or false, not {v!r}")
                check_choice(key, k, v)
                setattr(current, k, v)
        else:
            fail("", key, "unknown key")
    for role in ("main", "sub"):
        ch: ChannelConfig = getattr(cfg, role)
        for key in ("width", "height"):
            if getattr(ch, key) % 2 or not getattr(ch, key):
                fail(role, key, f"size {ch.width}x{ch.height} must be even and non-zero")
        if not 1 <= ch.fps <= 60:
            fail(role, "fps", f"{ch.fps} is outside 1..60")
        if not 1 <= ch.nodes <= MAX_NODES_PER_CHANNEL:
            fail(role, "nodes", f"{ch.nodes} is outside 1..{MAX_NODES_PER_CHANNEL}")
    roles = node_roles(cfg) + ["encoder"]
    for role in cfg.nodes.roles:
        if role not in roles:
            fail("nodes", role, f"no such node (the nodes are {', '.join(roles)})")
        if role in _NAMED and getattr(cfg.nodes, role):
            fail("nodes", role, f"named twice: nodes.{role} and [nodes.{role}] name")
    seen: dict[str, str] = {}
    for role in roles:
        name = cfg.nodes.name_of(role)
        if not name:
            continue
        if not _NODE_NAME.match(name):
            fail("nodes", role, f"{name!r} is not a videoN name")
        if name in seen:
            fail("nodes", role, f"{name!r} is already used by nodes.{seen[name]}")
        seen[name] = role
    return cfg
