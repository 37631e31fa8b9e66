"""`impv4l2 bundle`: the tree that goes onto a camera (issue 14 item 6).

Bundles are built for this machine and for mipsel (the T31).  The mipsel shim's
ELF header is read here; the host bundle runs from outside the source tree
with `env -i`, with the system python3 and with tests/clients/camera_runtime.py's
blocker (no numpy, PyAV, pyudev); every shell script parses with dash and busybox
sh; the mdev rule and helper run under the real busybox mdev in a private mount
namespace; a missing compiler is one clear error and leaves no directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from impv4l2 import bundle, config, shim
from support.paths import CLIENTS, ROOT

CAMERA_RUNTIME = CLIENTS / "camera_runtime.py"
PYTHON3 = "/usr/bin/python3"  # the system's: no project, no venv
BUSYBOX = shutil.which("busybox")
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}  # keep the bundles as built
EXPECTED = ["MANIFEST", "bin/impv4l2", "etc/impv4l2.toml", "etc/init.d/S95impv4l2",
            "etc/mdev.conf.d/impv4l2.conf", f"lib/{shim.LIBNAME}", "lib/python/impv4l2/cli.py",
            "lib/python/impv4l2/shim/__init__.py", "lib/python/linuxpy/LICENSE",
            "lib/python/linuxpy/video/raw.py", "libexec/impv4l2-mdev", "share/kernel/impv4l2.config"]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "impv4l2.cli", *args], capture_output=True, text=True,
                          cwd=kw.pop("cwd", "/"), **kw)


@pytest.fixture(scope="module")
def mipsel(tmp_path_factory) -> Path:
    """The T31 bundle, through the command line another engineer uses."""
    out = tmp_path_factory.mktemp("mipsel") / "impv4l2"
    r = cli("bundle", "--arch", "mipsel", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    return out


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    """This machine's bundle, its prefix where it lies (so its mdev rule points at itself)."""
    out = tmp_path_factory.mktemp("host") / "impv4l2"
    return bundle.bundle(out, prefix=str(out))


def elf_header(path: Path) -> dict[str, int]:
    b = path.read_bytes()[:52]
    assert b[:4] == b"\x7fELF", f"{path} is not ELF"
    order = "little" if b[5] == 1 else "big"
    return {"class": b[4], "data": b[5], "type": int.from_bytes(b[16:18], order),
            "machine": int.from_bytes(b[18:20], order), "flags": int.from_bytes(b[36:40], order)}


def run(argv: list[str], env: dict[str, str] | None = None, cwd: Path | str = "/", **kw):
    return subprocess.run(argv, capture_output=True, text=True, env=env or CLEAN_ENV, cwd=cwd, timeout=60, **kw)


# ---------------------------------------------------------------- contents

def test_mipsel_shim_is_elf32_mips_lsb_o32_mips32r2(mipsel):
    h = elf_header(mipsel / "lib" / shim.LIBNAME)
    assert (h["class"], h["data"], h["type"], h["machine"]) == (1, 1, 3, 8)  # ELF32, LSB, ET_DYN, EM_MIPS
    assert h["flags"] & 0x0000F000 == 0x1000  # EF_MIPS_ABI_O32
    assert h["flags"] & 0xF0000000 == 0x70000000  # EF_MIPS_ARCH_32R2: the T31's XBurst1


def test_host_shim_matches_this_machine(host):
    h = elf_header(host / "lib" / shim.LIBNAME)
    assert (h["class"], h["data"], h["machine"]) == bundle.ARCHES[bundle.host_arch()].elf
    assert elf_header(Path(sys.executable).resolve())["machine"] == h["machine"]


def test_layout_and_manifest(mipsel):
    files = sorted(str(p.relative_to(mipsel)) for p in mipsel.rglob("*") if p.is_file() or p.is_symlink())
    assert set(EXPECTED) <= set(files), set(EXPECTED) - set(files)
    # a FAT SD card holds no symlinks; no caches, tests or C source in the tree
    assert not [p for p in mipsel.rglob("*") if p.is_symlink()]
    assert not [f for f in files if "__pycache__" in f or "test" in Path(f).name or f.endswith(".c")]
    package = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "impv4l2").rglob("*.py") if "__pycache__" not in p.parts)
    assert [f for f in files if f.startswith("lib/python/impv4l2/")] == [f"lib/python/{p}" for p in package]
    # only what linuxpy.video.raw imports, not the whole distribution
    assert sorted(f for f in files if f.startswith("lib/python/linuxpy/")) == [
        f"lib/python/linuxpy/{f}" for f in ("LICENSE", "__init__.py", "constants.py", "ctypes.py", "ioctl.py",
                                            "video/__init__.py", "video/raw.py", "video/util.py")]
    for script in bundle.SHELL_SCRIPTS:
        assert os.access(mipsel / script, os.X_OK), script
    text = (mipsel / "MANIFEST").read_text()
    facts = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line and not line.startswith("#"))
    import linuxpy

    assert facts["arch"] == "mipsel" and facts["prefix"] == "/opt/impv4l2"
    assert facts["linuxpy"].startswith(linuxpy.__version__ + " ")
    assert facts["impv4l2"].startswith(__import__("impv4l2").__version__)
    assert facts["compiler"].startswith("mipsel-linux-gnu-gcc (") and "-march=mips32r2" in facts["cflags"]
    sums = {line[66:]: line[:64] for line in text.splitlines() if len(line) > 66 and line[64:66] == "  "}
    assert int(facts["files"]) == len(sums) == len(files) - 1  # every file but MANIFEST itself
    for rel, digest in sums.items():
        assert hashlib.sha256((mipsel / rel).read_bytes()).hexdigest() == digest, rel
    if BUSYBOX:  # the check the MANIFEST tells a camera user to run
        r = run(["sh", "-c", "grep -E '^[0-9a-f]{64}  ' MANIFEST | busybox sha256sum -c"], cwd=mipsel)
        assert r.returncode == 0, r.stdout + r.stderr


def test_paths_refer_to_the_prefix(mipsel, tmp_path):
    assert "/opt/impv4l2/libexec/impv4l2-mdev" in (mipsel / "etc/mdev.conf.d/impv4l2.conf").read_text()
    assert 'PREFIX="/opt/impv4l2"' in (mipsel / "etc/init.d/S95impv4l2").read_text()
    assert "/opt/impv4l2/lib/python/impv4l2/install.py" in (mipsel / "libexec/impv4l2-mdev").read_text()
    for rel in bundle.FILES:
        assert "@PREFIX@" not in (mipsel / rel).read_text() and str(mipsel) not in (mipsel / rel).read_text()
    other = bundle.bundle(tmp_path / "b", arch="mipsel", prefix="/mnt/mmcblk0p1/impv4l2/")
    assert "*/mnt/mmcblk0p1/impv4l2/libexec/impv4l2-mdev" in (other / "etc/mdev.conf.d/impv4l2.conf").read_text()
    assert "prefix: /mnt/mmcblk0p1/impv4l2\n" in (other / "MANIFEST").read_text()


def test_default_config_is_valid_for_t31(mipsel):
    cfg = config.load(str(mipsel / "etc" / "impv4l2.toml"))
    assert cfg.backend == "t31" and cfg.hotplug.enable == "auto"
    # the sensor is detected from /proc/jz/sensor on the camera, not fixed by the bundle
    assert not {"sensor", "i2c_addr", "sensor_width"} & set(cfg.backend_options) and cfg.main.width == 1920


def test_kernel_fragment_enables_fuse_and_cuse(mipsel):
    lines = [ln for ln in (mipsel / "share/kernel/impv4l2.config").read_text().splitlines() if ln and ln[0] != "#"]
    assert sorted(lines) == ["CONFIG_CUSE=m", "CONFIG_FUSE_FS=m"]


# ---------------------------------------------------------------- runs without the source tree

def test_system_python_has_no_project():
    """The precondition of the runs below: only the bundle can provide impv4l2."""
    r = run([PYTHON3, "-c", "import impv4l2"])
    assert r.returncode != 0 and "No module named 'impv4l2'" in r.stderr


@pytest.mark.parametrize("args,rc,out", [
    (["--help"], 0, "bundle"), (["--version"], 0, "impv4l2 "), (["udev-info", "--help"], 0, "devnode"),
    (["udev-info", "/dev/null"], 1, "/dev/null"),
])
def test_launcher_with_env_i(host, tmp_path, args, rc, out):
    r = run(["env", "-i", *(f"{k}={v}" for k, v in CLEAN_ENV.items()), str(host / "bin" / "impv4l2"), *args],
            cwd=tmp_path)
    assert r.returncode == rc, r.stderr
    assert out in r.stdout + r.stderr


def test_launcher_through_a_symlink(host, tmp_path):
    (tmp_path / "impv4l2").symlink_to(host / "bin" / "impv4l2")
    r = run([str(tmp_path / "impv4l2"), "--version"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("impv4l2 "), r.stderr


def test_camera_runtime_blocker_on_the_bundle(host, tmp_path):
    """numpy, PyAV and pyudev unimportable: the CLI (list imports linuxpy from the bundle) and
    every module of the t31 path import from the bundle with the system python3."""
    env = {**CLEAN_ENV, "PYTHONPATH": str(host / "lib" / "python")}
    mount = tmp_path / "mnt"
    mount.mkdir()
    (mount / "video10").write_text("not a node")
    r = run([PYTHON3, "-S", str(CAMERA_RUNTIME), "list", "--mount", str(mount)], env=env, cwd=tmp_path)
    assert r.returncode == 1 and "no impv4l2 nodes" in r.stderr and "Traceback" not in r.stderr, r.stderr
    modules = ["impv4l2.cli", "impv4l2.daemon", "impv4l2.driver.t31.backend", "impv4l2.v4l2.capture",
               "impv4l2.v4l2.encoder", "impv4l2.fuse.cuse", "impv4l2.fuse.mount", "impv4l2.hotplug",
               "impv4l2.shim", "impv4l2.install", "linuxpy.video.raw"]
    code = (f"src = open({str(CAMERA_RUNTIME)!r}).read().split('from impv4l2.cli import main')[0]\n"
            "exec(src)\n"  # the blocker, as camera_runtime.py installs it
            f"import importlib\nmods = [importlib.import_module(m) for m in {modules!r}]\n"
            "print('\\n'.join(m.__file__ for m in mods))\n"
            "print('ABSENT', sorted(m for m in sys.modules if m.split('.')[0] in ABSENT))")
    r = run([PYTHON3, "-S", "-c", code], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    *files, absent = r.stdout.splitlines()
    assert absent == "ABSENT []"
    assert len(files) == len(modules) and all(f.startswith(str(host / "lib" / "python") + "/") for f in files), files


@pytest.mark.parametrize("flags", [["-S", "-I"], ["-S"]])
def test_vendored_linuxpy_needs_only_the_stdlib(mipsel, flags):
    lib = str(mipsel / "lib" / "python")
    env = {**CLEAN_ENV, "PYTHONPATH": lib}  # -I ignores it: the code puts lib first itself
    code = (f"import sys; sys.path.insert(0, {lib!r}); import linuxpy.video.raw as r, linuxpy\n"
            "print(r.__file__, linuxpy.__version__, r.v4l2_capability.__name__)")
    r = run([PYTHON3, *flags, "-c", code], env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(lib + "/linuxpy/video/raw.py ")


def test_shim_runtime_uses_the_bundled_library_and_never_compiles(host, tmp_path):
    lib = host / "lib" / shim.LIBNAME
    code = "import impv4l2.shim as s; print(s.find_library()); print(s.ensure_library())"
    env = {"PATH": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(tmp_path),
           "PYTHONPATH": str(host / "lib" / "python")}  # no compiler on PATH, as on a camera
    r = run([PYTHON3, "-S", "-c", code], env=env)
    assert r.returncode == 0 and r.stdout.split() == [str(lib)] * 2, r.stderr
    # `impv4l2 run` preloads it; the host's shim loads into a real process
    r = run([str(host / "bin" / "impv4l2"), "run", "--", "sh", "-c", 'echo "$LD_PRELOAD"'], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == str(lib), r.stderr
    # a bundle without its library: an error naming it, not a build attempt
    shutil.copytree(host / "lib" / "python", tmp_path / "nolib" / "lib" / "python")
    env["PYTHONPATH"] = str(tmp_path / "nolib" / "lib" / "python")
    r = run([PYTHON3, "-S", "-c", code], env=env)
    assert r.returncode == 1 and f"no {shim.LIBNAME} at {tmp_path}/nolib/lib/{shim.LIBNAME}" in r.stderr, r.stderr
    assert not list(tmp_path.rglob(".build-*")) and not (tmp_path / ".cache").exists()


# ---------------------------------------------------------------- shell scripts

@pytest.mark.parametrize("shell", ["dash", "busybox"])
def test_shell_scripts_parse(mipsel, host, shell):
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell}")
    argv = ["busybox", "sh"] if shell == "busybox" else ["dash"]
    for tree in (mipsel, host):
        for script in bundle.SHELL_SCRIPTS:
            assert (tree / script).read_text().startswith("#!/bin/sh\n")
            r = run([*argv, "-n", str(tree / script)])
            assert r.returncode == 0, f"{script}: {r.stderr}"


def fake_udev_info(tmp: Path, role: str) -> Path:
    """Stands in for `impv4l2 udev-info`: what it prints for one of our nodes."""
    exe = tmp / "fake-udev-info"
    exe.write_text(f'#!/bin/sh\necho "$@" >>{tmp}/calls\n'
                   f'printf "ID_V4L_VERSION=2\\nID_V4L_PRODUCT=impv4l2 {role} (t31)\\nID_IMPV4L2_ROLE={role}\\n"\n')
    exe.chmod(0o755)
    return exe


def test_mdev_helper_makes_and_removes_the_links(host, tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "video7").touch()
    env = {**CLEAN_ENV, "IMPV4L2_DEV": str(dev), "IMPV4L2_UDEV_INFO": str(fake_udev_info(tmp_path, "sub"))}
    helper = str(host / "libexec" / "impv4l2-mdev")
    by_id = dev / "v4l/by-id/impv4l2-sub-video-index0"
    by_path = dev / "v4l/by-path/platform-impv4l2-sub-video-index0"
    for shell in filter(shutil.which, ("dash", "busybox")):
        argv = ["busybox", "sh", helper] if shell == "busybox" else ["dash", helper]
        r = run(argv, env={**env, "MDEV": "video7", "ACTION": "add"})
        assert r.returncode == 0, r.stderr
        assert os.readlink(by_id) == os.readlink(by_path) == "../../video7"
        assert by_id.resolve() == dev / "video7"
        assert (tmp_path / "calls").read_text().splitlines()[-1] == f"{dev}/video7"
        # another node's remove leaves them; this node's remove takes them
        assert run(argv, env={**env, "MDEV": "video8", "ACTION": "remove"}).returncode == 0
        assert by_id.is_symlink()
        assert run(argv, env={**env, "MDEV": "video7", "ACTION": "remove"}).returncode == 0
        assert not by_id.is_symlink() and not by_path.is_symlink()
    # a node udev-info does not claim (another CUSE driver) gets no link
    env["IMPV4L2_UDEV_INFO"] = "false"
    assert run([helper], env={**env, "MDEV": "video7"}).returncode == 0
    assert not list((dev / "v4l/by-id").iterdir())


MDEV_NS = r"""
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /sys
node() {  # subsystem name major:minor, laid out as sysfs does
	d=/sys/devices/virtual/$1/$2
	mkdir -p "$d" "/sys/class/$1" /sys/dev/char
	echo "$3" >"$d/dev"
	printf 'MAJOR=%s\nMINOR=%s\nDEVNAME=%s\n' "${3%:*}" "${3#*:}" "$2" >"$d/uevent"
	ln -s "../../../../class/$1" "$d/subsystem"
	ln -s "../../devices/virtual/$1/$2" "/sys/class/$1/$2"
	ln -s "../../devices/virtual/$1/$2" "/sys/dev/char/$3"
}
node cuse video42 10:200
node video4linux video5 81:5
mount -t tmpfs tmpfs /etc
echo 'root:x:0:0:root:/root:/bin/sh' >/etc/passwd
printf 'root:x:0:\nvideo:x:44:\n' >/etc/group
cp "$CONF" /etc/mdev.conf
mount -t tmpfs tmpfs /dev
mknod -m 666 /dev/null c 1 3
show() {  # one line a node or link: name mode uid:gid (hex) major:minor or the link's target
	for f in /dev/video* /dev/v4l/*/*; do
		[ -L "$f" ] && echo "$f -> $(readlink "$f")" && continue
		[ -e "$f" ] && stat -c '%n %A %u:%g %t:%T' "$f"
	done
	return 0
}
busybox mdev -s
echo "--- coldplug"; show
ACTION=remove DEVPATH=/devices/virtual/cuse/video42 SUBSYSTEM=cuse busybox mdev
echo "--- removed"; show
"""


@pytest.mark.skipif(BUSYBOX is None or os.geteuid() != 0, reason="needs busybox and root (mount namespace)")
def test_mdev_rule_under_busybox_mdev(host, tmp_path):
    """The bundle's mdev.conf line under the real mdev (coldplug `mdev -s`, then a remove
    uevent), with /sys, /etc and /dev replaced in a private mount namespace: our CUSE node gets
    group video, 0660 and both links; a video4linux node of the same name pattern is untouched."""
    if run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("no mount namespace here")
    env = {**CLEAN_ENV, "CONF": str(host / "etc/mdev.conf.d/impv4l2.conf"),
           "IMPV4L2_UDEV_INFO": str(fake_udev_info(tmp_path, "main"))}
    r = run(["unshare", "-m", "sh", "-c", MDEV_NS], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    cold, removed = (part.strip().splitlines() for part in r.stdout.split("--- coldplug")[1].split("--- removed"))
    assert sorted(cold) == ["/dev/v4l/by-id/impv4l2-main-video-index0 -> ../../video42",
                            "/dev/v4l/by-path/platform-impv4l2-main-video-index0 -> ../../video42",
                            "/dev/video42 crw-rw---- 0:44 a:c8",  # root:video 0660
                            "/dev/video5 crw-rw---- 0:0 51:5"]  # another subsystem: mdev's default, no helper
    assert (tmp_path / "calls").read_text().split() == ["/dev/video42"]
    assert removed == ["/dev/video5 crw-rw---- 0:0 51:5"]


def test_init_script_names_the_kernel_options(mipsel, tmp_path):
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "modprobe").write_text("#!/bin/sh\necho \"modprobe $*\" >>" + str(tmp_path / "calls") + "\nexit 1\n")
    (fakebin / "modprobe").chmod(0o755)
    (tmp_path / "dev").mkdir()
    (tmp_path / "sys").mkdir()
    env = {**CLEAN_ENV, "PATH": f"{fakebin}:/usr/bin:/bin", "IMPV4L2_DEV": str(tmp_path / "dev"),
           "IMPV4L2_SYSFS": str(tmp_path / "sys")}
    r = run(["sh", str(mipsel / "etc/init.d/S95impv4l2"), "start"], env=env)
    assert r.returncode == 1
    assert (tmp_path / "calls").read_text().split("\n")[:2] == ["modprobe fuse", "modprobe cuse"]
    assert r.stderr.count("\n") == 1 and "CONFIG_FUSE_FS" in r.stderr and "CONFIG_CUSE" in r.stderr, r.stderr
    assert "/opt/impv4l2/share/kernel/impv4l2.config" in r.stderr and "FAIL" in r.stdout
    r = run(["sh", str(mipsel / "etc/init.d/S95impv4l2"), "bogus"], env=env)
    assert r.returncode == 1 and "start|stop|restart" in r.stdout


# ---------------------------------------------------------------- bad input

def test_missing_compiler_is_one_error_and_no_directory(tmp_path):
    out = tmp_path / "out"
    r = cli("bundle", "--arch", "mipsel", "--cc", "/nonexistent/gcc", str(out))
    assert r.returncode != 0 and "'/nonexistent/gcc'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "gcc-mipsel-linux-gnu" in r.stderr
    absent = next((a for a, spec in bundle.ARCHES.items() if shutil.which(spec.cc) is None), None)
    if absent is not None:  # an arch whose default compiler this machine lacks
        r = cli("bundle", "--arch", absent, str(out))
        spec = bundle.ARCHES[absent]
        assert r.returncode != 0 and spec.cc in r.stderr and f"apt-get install {spec.package}" in r.stderr
    assert list(tmp_path.iterdir()) == []  # neither DIR nor a temporary sibling


def test_unknown_arch_wrong_compiler_and_existing_dir(tmp_path):
    r = cli("bundle", "--arch", "sparc", str(tmp_path / "x"))
    assert r.returncode == 1 and "unknown architecture 'sparc'" in r.stderr and "mipsel" in r.stderr
    # a compiler for another machine than --arch says: caught by the ELF check, nothing left
    r = cli("bundle", "--arch", "x86_64", "--cc", "mipsel-linux-gnu-gcc", str(tmp_path / "x"))
    assert r.returncode == 1 and "built (1, 1, 8)" in r.stderr and "not x86_64's (2, 1, 62)" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("")
    r = cli("bundle", "--arch", "mipsel", str(tmp_path / "x"))
    assert r.returncode == 1 and "--force" in r.stderr and (tmp_path / "x" / "keep").exists()
    r = cli("bundle", "--arch", "mipsel", "--force", str(tmp_path / "x"))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "x" / "keep").exists() and (tmp_path / "x" / "MANIFEST").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
