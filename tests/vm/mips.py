"""MIPS stage: a 32-bit little-endian MIPS (mipsel) Linux guest under QEMU TCG.

The T31 camera is MIPS32 little-endian; this boots Debian bookworm's Malta kernel (6.1, 4kc) on
``qemu-system-mipsel -M malta -cpu 24Kf`` and runs one shell command in a Debian mipsel root that
has Python 3.11 (32-bit) and the host directories the caller shares (the project tree).

Host side, :func:`ensure_root` (once; later calls reuse the cache, keyed by a hash of the recipe):
``mmdebstrap --variant=extract --arch=mipsel`` downloads python3-minimal, libpython3.11-stdlib,
busybox-static, v4l-utils, ffmpeg and their dependencies and only unpacks them (no maintainer scripts, so no
qemu-user or binfmt_misc); an extract hook adds the kernel package without its dependencies
(``apt-get download`` + ``dpkg-deb -x``: vmlinuz and /lib/modules).  Then, still on the host:
``depmod`` for the guest's modules, busybox applet links (names read from busybox's applet table),
the stdlib's .pyc files compiled by the host's Python 3.11 (same bytecode; an emulated guest would
otherwise recompile every import on every start), docs/man/locales dropped, and the kernel's xz
payload unpacked into an ELF ``vmlinux`` (the guest's own decompressor costs ~1.6 s per boot).

Guest side, :func:`boot`: a tiny initramfs, written per boot in Python (busybox, the virtio and 9p
modules, an init script, the command and the mount table) loads virtio-pci/9p, mounts the cached
root read-only over virtio 9p (``-virtfs ...,readonly=on``), the shares read-only at their guest
paths, ONE writable share at /out, tmpfs on /tmp and /run, moves /dev (devtmpfs), /proc and /sys
into it and switch_roots (which frees the initramfs).  There, as PID 1, busybox sh loads fuse.ko
and cuse.ko with modprobe (same kernel package), prints ``IMPV4L2-START``, runs the command with
/bin/sh (stdin /dev/null), writes its status to /out/.impv4l2-exit and prints ``IMPV4L2-EXIT=N``,
then ``reboot -f`` (QEMU exits on ``-no-reboot``).  The status comes from the file; the marker is
the fallback.

Measured on the 2-core dev machine (no KVM, idle host), ``python3 tests/vm/mips.py``:
cold build 10-19 s without v4l-utils/ffmpeg, ~55 s with them (~650 MB unpacked) (mmdebstrap downloads ~30 MB then; depmod, pyc, kernel unpack ~3 s), warm
ensure_root < 1 ms, boot to the command ~4.6 s (~2 s of it is the Malta kernel timing the CPU
against the RTC in real time), the smoke payload's whole boot ~6.3 s.  The cache is ~280 MB
(181 MB of it the kernel's modules, all kept).  A 128 MB guest has ~100 MB available at the
command, a 64 MB one ~39 MB.  Python is slow under TCG: ``python3 -c pass`` ~1.2 s, importing
ctypes/json/socket/logging/argparse/tomllib/... ~7 s.

Caveat: 9p passes the host's errno numbers through, and MIPS numbers errnos >= 35 differently
(e.g. a host EOPNOTSUPP (95) reads as ENOTSOCK in the guest); the root is mounted ``nosuid``
so exec skips the file-capability xattr lookup that trips on this.
"""

from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# the camera-shaped runtime (Python without numpy/PyAV/pyudev) and the clients the MIPS stage
# runs there: v4l2-ctl and v4l2-compliance 1.22, ffmpeg 5.1 (~600 MB unpacked, ~1 min to build)
PACKAGES = ("python3-minimal", "libpython3.11-stdlib", "busybox-static", "v4l-utils", "ffmpeg")
KERNEL_META = "linux-image-4kc-malta"
RECIPE = 3  # bump when the host-side preparation of the root changes
# initramfs modules: virtio-pci and 9p (their dependencies come from modules.dep)
INITRD_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
GUEST_MODULES = ("fuse", "cuse")
OUT = "/out"
EXIT_FILE = ".impv4l2-exit"
TOOLS = {"mmdebstrap": "mmdebstrap", "qemu-system-mipsel": "qemu-system-mips", "depmod": "kmod"}
NINEP = "trans=virtio,version=9p2000.L,msize=262144"

# Fetch the kernel (the real package the metapackage depends on) without its dependencies.
KERNEL_HOOK = (
    'export APT_CONFIG="$MMDEBSTRAP_APT_CONFIG"; cd "$1/tmp" && '
    f'apt-get -q download $(apt-cache depends {KERNEL_META} | '
    "sed -n 's/^ *Depends: \\(linux-image-[0-9].*\\)/\\1/p') && "
    'dpkg-deb -x linux-image-*.deb "$1" && rm linux-image-*.deb')

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo 4 >/proc/sys/kernel/printk
fail() { echo "impv4l2: $*"; echo "IMPV4L2-EXIT=255"; reboot -f; }
for m in $(cat /modules); do insmod /lib/modules/$m || fail "insmod $m failed"; done
o=__NINEP__
mount -t 9p -o $o,ro,nosuid,cache=loose root /newroot || fail "cannot mount the root"
while read tag path mode; do
    mount -t 9p -o $o,$mode $tag /newroot$path || fail "cannot mount $path"
done </shares
for d in tmp run; do mount -t tmpfs -o mode=1777 tmpfs /newroot/$d; done
for d in dev proc sys; do mount --move /$d /newroot/$d; done
exec switch_root /newroot /bin/sh -c "$(cat /stage2)" stage2 "$(cat /cmd)"
""".replace("__NINEP__", NINEP)

STAGE2 = r"""export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb LANG=C.UTF-8 TMPDIR=/tmp
for m in __MODULES__; do modprobe $m || echo "impv4l2: modprobe $m failed"; done
echo "IMPV4L2-START up $(cut -d' ' -f1 /proc/uptime) s"
cd /
/bin/sh -c "$1" </dev/null
rc=$?
echo $rc >__OUT__/__EXIT__
echo "IMPV4L2-EXIT=$rc"
sync
reboot -f
""".replace("__MODULES__", " ".join(GUEST_MODULES)).replace("__OUT__", OUT) \
    .replace("__EXIT__", EXIT_FILE)


def _key() -> str:
    text = repr((SUITE, MIRROR, PACKAGES, KERNEL_META, KERNEL_HOOK, RECIPE))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _run(cmd: list[str], timeout: float = 900) -> str | None:
    """None on success, else the reason."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{cmd[0]}: {e}"
    if r.returncode == 0:
        return None
    return f"{shlex.join(cmd)[:200]} failed ({r.returncode}): {(r.stdout + r.stderr)[-1500:]}"


def _ensure_tools() -> str | None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return None
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if _run(install) is not None:  # the package lists may be missing or stale
        err = _run(["apt-get", "update", "-q"]) or _run(install)
        if err:
            return f"cannot install {' '.join(missing)}: {err}"
    return None


def kernel_release(root: Path) -> str:
    return next(root.glob("lib/modules/*")).name


MALTA_LOAD = 0x80100000  # VMLINUX_LOAD_ADDRESS of the Malta kernel


def _unpack_kernel(vmlinuz: Path, dest: Path) -> str | None:
    """Write the decompressed kernel as an ELF for ``-kernel`` (the guest's xz decompressor
    takes ~1.6 s under TCG).  Its entry is the ``lui/ori t9; jalr t9`` constant in the
    decompressor that points into the payload.  None on success, else why not."""
    z = vmlinuz.read_bytes()
    raw, code_end = b"", 0
    for m in re.finditer(rb"\xfd7zXZ\x00", z):
        try:
            raw, code_end = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(z[m.start():]), m.start()
            break
        except lzma.LZMAError:
            continue
    if not raw:
        return "no xz payload in vmlinuz"
    words = struct.unpack_from(f"<{code_end // 4}I", z)
    entries = []
    for hi, lo, jump in zip(words, words[1:], words[2:]):
        if hi >> 16 == 0x3c19 and jump in (0x0320f809, 0x03200008):  # lui t9,HI; ...; jalr/jr t9
            if lo >> 16 == 0x3739:  # ori t9,t9,LO
                entries.append((hi & 0xffff) << 16 | lo & 0xffff)
            elif lo >> 16 == 0x2739:  # addiu t9,t9,LO (signed)
                entries.append(((hi & 0xffff) << 16) + ((lo & 0xffff) ^ 0x8000) - 0x8000)
    entries = [e for e in entries if MALTA_LOAD < e < MALTA_LOAD + len(raw)]
    if len(entries) != 1:
        return f"kernel entry not found ({entries})"
    e_flags = struct.unpack_from("<I", z, 36)[0]
    ehdr = b"\x7fELF\x01\x01\x01" + bytes(9) + struct.pack(
        "<HHIIIIIHHHHHH", 2, 8, 1, entries[0], 52, 0, e_flags, 52, 32, 1, 40, 0, 0)
    phdr = struct.pack("<8I", 1, 4096, MALTA_LOAD, MALTA_LOAD, len(raw), len(raw), 7, 4096)
    dest.write_bytes((ehdr + phdr).ljust(4096, b"\0") + raw)
    return None


def _busybox_applets(busybox: Path) -> list[str]:
    """Applet names from busybox's applet table ("[\\0[[\\0acpid\\0...\\0\\0"), without running it."""
    data = busybox.read_bytes()
    start = data.find(b"[\0[[\0")
    names = data[start:data.find(b"\0\0", start)].decode().split("\0") if start >= 0 else []
    return [n for n in names if re.fullmatch(r"[\w.\[-]+", n)]


def _prepare(root: Path) -> str | None:
    release = kernel_release(root)
    if err := _run(["depmod", "-b", str(root), release]):
        return err
    applets = _busybox_applets(root / "bin/busybox")
    if len(applets) < 100:
        return f"busybox applet table not found ({len(applets)} names)"
    for name in applets:
        link = root / "bin" / name
        if not (link.exists() or link.is_symlink() or (root / "usr/bin" / name).exists()
                or (root / "sbin" / name).exists() or (root / "usr/sbin" / name).exists()):
            link.symlink_to("busybox")
    for d in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "var/cache/apt"):
        shutil.rmtree(root / d, ignore_errors=True)
    for d in ("dev", "proc", "sys", "tmp", "run", "root", OUT.lstrip("/")):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                     "nobody:x:65534:65534:nobody:/:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    if err := _unpack_kernel(next(root.glob("boot/vmlinuz-*")), root.parent / "vmlinux"):
        print(f"mips: booting the compressed kernel (slower): {err}", file=sys.stderr)
    stdlib = root / "usr/lib/python3.11"
    py = sys.executable if sys.version_info[:2] == (3, 11) else shutil.which("python3.11")
    if py:  # any 3.11 writes the guest 3.11's bytecode
        return _run([py, "-m", "compileall", "-q", "-j0", "-s", str(root), "-p", "/",
                     "-x", r"lib2to3/tests|test/", str(stdlib)])
    return None  # the guest compiles on each start (slower), nothing breaks


def ensure_root(cache: Path = Path.home() / ".cache/impv4l2") -> Path | str:
    """The mipsel guest's cache dir (root/ with the kernel in root/boot and root/lib/modules,
    vmlinux: the same kernel unpacked), built once; a string says why it could not be built."""
    top = Path(cache) / f"mips-{_key()}"
    if (top / "ok").exists():
        return top
    top.parent.mkdir(parents=True, exist_ok=True)
    with open(top.parent / "mips.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find it built
        if (top / "ok").exists():
            return top
        if err := _ensure_tools():
            return err
        for old in top.parent.glob("mips-*"):  # other recipes' roots and broken builds
            shutil.rmtree(old, ignore_errors=True)
        tmp = top.with_name(top.name + ".tmp")
        tmp.mkdir()
        err = _run(["mmdebstrap", "--variant=extract", "--arch=mipsel",
                    "--include=" + ",".join(PACKAGES), "--extract-hook=" + KERNEL_HOOK,
                    SUITE, str(tmp / "root"), MIRROR])
        if err is None and not list((tmp / "root/boot").glob("vmlinuz-*")):
            err = "no kernel in the root after mmdebstrap"
        err = err or _prepare(tmp / "root")
        if err:
            shutil.rmtree(tmp, ignore_errors=True)
            return err
        (tmp / "ok").write_text(f"{SUITE} {' '.join(PACKAGES)} {kernel_release(tmp / 'root')}\n")
        tmp.rename(top)
    return top


def _cpio(files: dict[str, tuple[int, bytes]]) -> bytes:
    """newc archive: path -> (mode, content); a char device's content is b"major,minor"."""
    out = bytearray()
    for ino, (name, (mode, data)) in enumerate([*files.items(), ("TRAILER!!!", (0, b""))], 1):
        rdev = (0, 0)
        if mode >> 12 == 0o02:  # S_IFCHR
            rdev, data = tuple(int(x) for x in data.split(b",")), b""
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _module_closure(moddir: Path, names: tuple[str, ...]) -> list[str]:
    """Module paths (relative to moddir) for names and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []
    for name in names:
        mod = by_name[name]
        for m in [*reversed(deps[mod]), mod]:  # modules.dep lists the deepest dependency last
            if m not in order:
                order.append(m)
    return order


def _initramfs(root: Path, command: str, mounts: list[str]) -> bytes:
    moddir = root / "lib/modules" / kernel_release(root)
    mods = _module_closure(moddir, INITRD_MODULES)
    dirs = ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules")
    files: dict[str, tuple[int, bytes]] = {d: (0o40755, b"") for d in dirs}
    files["dev/console"] = (0o20600, b"5,1")
    files["bin/busybox"] = (0o100755, (root / "bin/busybox").read_bytes())
    files |= {f"lib/modules/{Path(m).name}": (0o100644, (moddir / m).read_bytes()) for m in mods}
    text = {"init": INIT, "stage2": STAGE2, "cmd": command,
            "modules": "\n".join(Path(m).name for m in mods) + "\n", "shares": "".join(mounts)}
    files |= {name: (0o100755 if name == "init" else 0o100644, t.encode()) for name, t in text.items()}
    return _cpio(files)


def boot(cache: Path, command: str, *, memory_mb: int = 128, timeout: float = 600,
         shares: dict[str, Path], out: Path | None = None,
         timings: dict[str, float] | None = None) -> tuple[int, str]:
    """Boot the mipsel guest, run ``command`` with /bin/sh there, power off.

    ``shares`` maps guest path -> host directory (read-only; at most two: the Malta board has PCI
    slots for four virtio-9p devices with the root and /out); ``out`` is the host directory
    mounted read-write at /out (a temporary one when None).  Returns (exit status of the
    command, console log); 124 on timeout, 255 when the guest failed before the command.
    ``timings`` (if given) receives ``boot_to_command`` and ``total`` in seconds."""
    root = Path(cache) / "root"
    bad = [g for g in [*shares, OUT] if not g.startswith("/") or re.search(r"\s", g)]
    if bad or OUT in shares:
        raise ValueError(f"guest paths must be absolute, without spaces, and not {OUT}: {bad}")
    kernel = Path(cache) / "vmlinux"
    kernel = kernel if kernel.exists() else next(root.glob("boot/vmlinuz-*"))
    with tempfile.TemporaryDirectory(prefix="impv4l2-mips-") as tmpd:
        outdir = Path(out) if out is not None else Path(tmpd, "out")
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / EXIT_FILE).unlink(missing_ok=True)
        virtfs = [("root", root, True)]
        mounts = []
        for i, (guest, host) in enumerate([*shares.items(), (OUT, outdir)]):
            rw = guest == OUT
            (root / guest.lstrip("/")).mkdir(parents=True, exist_ok=True)  # mount point
            virtfs.append((f"s{i}", Path(host), not rw))
            mounts.append(f"s{i} {guest} {'rw' if rw else 'ro,cache=loose'}\n")
        initrd = Path(tmpd, "initrd.cpio")
        initrd.write_bytes(_initramfs(root, command, mounts))
        cmd = ["qemu-system-mipsel", "-M", "malta", "-cpu", "24Kf", "-m", str(memory_mb),
               "-kernel", str(kernel), "-initrd", str(initrd), "-append", "console=ttyS0 panic=1",
               "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot", "-nic", "none"]
        for tag, path, ro in virtfs:
            spec = f"local,path={str(path).replace(',', ',,')},mount_tag={tag},security_model=none"
            cmd += ["-virtfs", spec + (",readonly=on" if ro else "")]
        with _machine_lock():  # one mipsel guest at a time on this machine (TCG: a core each)
            return _run_qemu(cmd, outdir, timeout, timings)


def _machine_lock():
    f = open("/tmp/impv4l2-vm-mips.lock", "a")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f  # closing it (the with block's end) releases the lock


def _run_qemu(cmd: list[str], outdir: Path, timeout: float,
              timings: dict[str, float] | None) -> tuple[int, str]:
    t0 = time.monotonic()
    lines: list[str] = []
    started: list[float] = []
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return 255, f"[impv4l2: cannot start qemu: {e}]\n"

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").replace("\r", "")
            if not started and line.startswith("IMPV4L2-START"):
                started.append(time.monotonic() - t0)
            lines.append(line)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    th.join(5)
    log = "".join(lines)
    if timings is not None:
        timings.update(total=time.monotonic() - t0, boot_to_command=started[0] if started else -1)
    status = (outdir / EXIT_FILE).read_text().strip() if (outdir / EXIT_FILE).exists() else ""
    if not status:
        marks = re.findall(r"^IMPV4L2-EXIT=(\d+)$", log, re.M)
        status = marks[-1] if marks else ""
    if status:
        return int(status), log
    return (124, log + f"\n[impv4l2: timeout after {timeout:.0f} s]\n") if proc.returncode < 0 \
        else (255, log + f"\n[impv4l2: qemu exited {proc.returncode} without a status]\n")


SMOKE = ("uname -m; python3 -c 'import struct,ctypes; print(struct.calcsize(\"P\")*8, "
         "ctypes.sizeof(ctypes.c_long))'; ls -l /dev/fuse /dev/cuse; free -m")


def main() -> int:
    cache = Path(os.environ.get("IMPV4L2_CACHE") or Path.home() / ".cache/impv4l2")
    project = Path(__file__).resolve().parents[2]
    t0 = time.monotonic()
    top = ensure_root(cache)
    t1 = time.monotonic()
    if isinstance(top, str):
        print(f"mips: no guest: {top}")
        return 1
    ensure_root(cache)
    t2 = time.monotonic()
    timings: dict[str, float] = {}
    rc, log = boot(top, SMOKE, shares={str(project): project}, timings=timings)
    print(log)
    print(f"mips: exit status {rc}; build {t1 - t0:.1f} s (cold on first run), warm build "
          f"{(t2 - t1) * 1000:.2f} ms, boot to command {timings['boot_to_command']:.1f} s, "
          f"boot total {timings['total']:.1f} s, total {time.monotonic() - t0:.1f} s")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
