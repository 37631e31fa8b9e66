"""Native tests of the preload shim (no CUSE here: the full mmap path runs in the VM,
tests/vm/test_vm_shim.py).  Here: the library builds and leaves every other mmap alone
(checked syscall by syscall with strace), the handover socket and its SO_PEERCRED
check with a fake node, the ioctl ABI shared by C and Python, the `run` command
and the hint for clients without the shim."""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from impv4l2 import shim
from impv4l2.memfd import MemfdMemory
from impv4l2.shim import protocol, server
from support.paths import CLIENTS, ROOT

CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    return shim.build(tmp_path_factory.mktemp("shim") / shim.LIBNAME)


def compile_c(tmp: Path, name: str, source: str, *flags: str) -> Path:
    src = tmp / f"{name}.c"
    src.write_text(textwrap.dedent(source))
    exe = tmp / name
    subprocess.run([CC, "-O1", "-Wall", "-o", str(exe), str(src), *flags], check=True)
    return exe


# ---------------------------------------------------------------- build

def test_build_exports_only_mmap_and_rebuilds_when_source_is_newer(tmp_path):
    out = shim.build(tmp_path / shim.LIBNAME)
    nm = subprocess.run(["nm", "-D", "--defined-only", str(out)], capture_output=True, text=True, check=True)
    exported = sorted(line.split()[-1] for line in nm.stdout.splitlines() if " T " in line)
    assert exported == ["mmap", "mmap64"]
    first = out.stat().st_mtime_ns
    assert shim.build(out).stat().st_mtime_ns == first  # up to date: not rebuilt
    os.utime(out, ns=(first, shim.SOURCE.stat().st_mtime_ns - 10**9))  # now older than the source
    assert shim.build(out).stat().st_mtime_ns > shim.SOURCE.stat().st_mtime_ns - 10**9


def test_abi_constants_match_the_c_source(tmp_path):
    exe = compile_c(tmp_path, "abi", (CLIENTS / "shim_abi.c").read_text(), "-I", str(shim.SOURCE.parent),
                    "-ldl", "-lpthread")
    got = [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    info = protocol.pack_info("video10", "@sock", 0x1122, 0x3344, 77)
    assert got == [protocol.VIDIOC_IMPV4L2_SHIM_INFO, protocol.INFO.size,
                   info.index((0x1122).to_bytes(8, "little")), info.index((0x3344).to_bytes(8, "little")),
                   info.index((77).to_bytes(4, "little")), info.index(b"video10"), info.index(b"@sock"),
                   protocol.REQUEST.size, 16, protocol.REPLY.size, 16,
                   protocol.VIDIOC_IMPV4L2_SHIM_MMAP, protocol.MMAP_SIZE, 8, 16, 20, protocol.MMAP_REQ.size]
    assert ctypes.sizeof(server.ShimMmapArg) == protocol.MMAP_SIZE
    assert server.ShimMmapArg.info.offset == protocol.MMAP_REQ.size


# ---------------------------------------------------------------- pass-through



@pytest.fixture(scope="module")
def passthrough_exe(tmp_path_factory) -> Path:
    return compile_c(tmp_path_factory.mktemp("pt"), "passthrough", (CLIENTS / "shim_passthrough.c").read_text())


def _data_file(tmp_path: Path) -> Path:
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(7, 256)) * 64)
    return data


def test_passthrough_output_is_identical_with_and_without_the_shim(tmp_path, lib, passthrough_exe):
    runs = {}
    for label, extra in (("plain", {}), ("shim", {"LD_PRELOAD": str(lib)})):
        data = _data_file(tmp_path)
        r = subprocess.run([str(passthrough_exe), str(data)], capture_output=True, text=True,
                           env={**os.environ, **extra}, check=True)
        runs[label] = (r.stdout, data.read_bytes()[4096 + 6])
    assert runs["shim"] == runs["plain"]
    out = runs["plain"][0]
    # The program really exercised every case (a broken run could also be "identical").
    assert "file shared: ok errno=4242" in out and "/dev/null: failed errno=19" in out
    assert "bad fd: failed errno=9" in out and out.count("/dev/zero: ok") == 3
    assert runs["plain"][1] == 0x5A


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_passthrough_costs_one_fstat_per_file_map_and_one_ioctl_per_char_device(tmp_path, lib, passthrough_exe):
    """The shim's syscalls, counted: nothing for anonymous maps and bad fds beyond
    fstat, an fstat per fd map, one ioctl for /dev/zero (cached after) and /dev/null."""
    def trace(env: dict) -> list[str]:
        log = tmp_path / "trace"
        subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=close,ioctl,fstat,newfstatat,fcntl,connect",
                        str(passthrough_exe), str(_data_file(tmp_path))],
                       env={**os.environ, **env}, check=True, capture_output=True)
        lines = log.read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if "close(-123)" in line)
        return [line.split(None, 1)[1] for line in lines[start + 1:]]

    plain = trace({})
    shimmed = trace({"LD_PRELOAD": str(lib)})
    extra = list(shimmed)
    for call in plain:  # remove what both runs do; what is left is the shim's
        if call in extra:
            extra.remove(call)
    kinds = [c.split("(")[0] for c in extra]
    ioctls = [c for c in extra if c.startswith("ioctl(")]
    assert not any(k in ("connect", "fcntl") for k in kinds), extra
    # file shared, file private, /dev/zero x3, /dev/null, bad fd: 7 fstats; anonymous: none.
    assert sum(k in ("fstat", "newfstatat") for k in kinds) == 7, extra
    assert len(ioctls) == 2, extra  # /dev/zero once (then cached), /dev/null once
    assert all("ENOTTY" in c for c in ioctls), ioctls


# ---------------------------------------------------------------- handover



@pytest.fixture
def fake_node():
    mem = MemfdMemory("fake0", 3 * mmap.PAGESIZE)
    node = types.SimpleNamespace(name="fake0", memory=mem)
    srv = server.ShimServer(f"@impv4l2-shim-test-{os.getpid()}")
    srv.register(node, rdev=os.stat("/dev/null").st_rdev)
    srv.start()
    yield srv, node
    srv.stop()
    mem.close()


def run_client(srv: server.ShimServer, node: str, hold: str) -> dict[str, str]:
    r = subprocess.run([sys.executable, str(CLIENTS / "shim_handover.py"), str(ROOT), node, hold, srv.address],
                       stdin=subprocess.PIPE, capture_output=True, text=True, timeout=30, check=True)
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in r.stdout.splitlines()}


def test_handover_gives_the_node_memfd_to_a_holder_zero_copy(fake_node):
    srv, node = fake_node
    node.memory.view(100, 8)[:] = b"\x01\x02frame!"
    out = run_client(srv, "fake0", "rw")
    assert out["reply"] == f"0 0 {3 * mmap.PAGESIZE} 1"
    assert out["same-file"] == "True"
    assert out["read"] == b"\x01\x02frame!".hex()  # the driver's bytes, seen in the client's map
    assert out["write"] == "ok" and bytes(node.memory.view(200, 4)) == b"back"  # and back: same pages
    assert srv.handovers == 1


def test_handover_refuses_a_process_without_the_node_open(fake_node, caplog):
    srv, node = fake_node
    with caplog.at_level(logging.WARNING, "impv4l2.shim"):
        out = run_client(srv, "fake0", "none")
    assert out["reply"] == f"{errno.EACCES} 0 0 0"
    assert "does not have fake0" in caplog.text and srv.handovers == 0


def test_handover_to_a_read_only_holder_is_read_only(fake_node):
    srv, node = fake_node
    node.memory.view(100, 8)[:] = b"readonly"
    out = run_client(srv, "fake0", "ro")
    assert out["reply"] == f"0 {protocol.FLAG_READONLY} {3 * mmap.PAGESIZE} 1"
    assert out["read"] == b"readonly".hex()
    assert out["write"] == f"errno {errno.EACCES}"


@pytest.mark.parametrize("name,err", [("nosuch", errno.ENODEV), ("badmagic", errno.EPROTO)])
def test_handover_bad_requests_get_an_errno_and_no_fd(fake_node, name, err):
    srv, _ = fake_node
    assert run_client(srv, name, "rw")["reply"] == f"{err} 0 0 0"


def test_handover_of_a_node_without_memory(fake_node):
    srv, node = fake_node
    node.memory.close()
    assert run_client(srv, "fake0", "rw")["reply"] == f"{errno.ENODEV} 0 0 0"


def test_filesystem_socket_is_removed_on_stop(tmp_path):
    path = tmp_path / "shim.sock"
    with server.ShimServer(str(path)):
        assert path.exists()
    assert not path.exists()


# ---------------------------------------------------------------- ioctl

def test_info_ioctl_describes_node_memory_and_socket(fake_node):
    srv, node = fake_node
    arg = bytearray(protocol.INFO.size)
    assert srv.info_ioctl("fake0", arg) == 0
    info = protocol.unpack_info(arg)
    assert info == {"magic": protocol.MAGIC, "version": protocol.VERSION, "flags": 0, "memory_size": 3 * mmap.PAGESIZE,
                    "memory_id": os.fstat(node.memory.fd).st_ino, "daemon_pid": os.getpid(),
                    "node": "fake0", "socket": srv.address}
    with pytest.raises(OSError) as e:
        srv.info_ioctl("other", bytearray(protocol.INFO.size))
    assert e.value.errno == errno.ENOTTY


def test_info_ioctl_without_server_is_enotty():
    """A node no shim server serves answers ENOTTY (the shim then leaves mmap alone);
    a stopped server answers ENOTTY too."""
    from impv4l2.v4l2 import node as node_mod

    class Probe(node_mod.NodeHandle):
        def __init__(self):
            self.node = types.SimpleNamespace(name="video10", shim=None)

    with pytest.raises(OSError) as e:
        Probe().vidioc_impv4l2_shim_info(bytearray(protocol.INFO.size), None)
    assert e.value.errno == errno.ENOTTY
    srv = server.ShimServer(f"@impv4l2-shim-test-stopped-{os.getpid()}")
    dev = types.SimpleNamespace(name="video10", memory=None)
    srv.attach(dev)
    assert dev.shim is srv
    with pytest.raises(OSError) as e:
        srv.info_ioctl("video10", bytearray(protocol.INFO.size))
    assert e.value.errno == errno.ENOTTY
    srv.unregister("video10")
    assert dev.shim is None


def test_ioctl_numbers_are_private_v4l2_ioctls():
    cmd = protocol.VIDIOC_IMPV4L2_SHIM_INFO
    assert (cmd >> 30, (cmd >> 16) & 0x3FFF, chr((cmd >> 8) & 0xFF), cmd & 0xFF) == (2, 192, "V", 232)
    cmd = protocol.VIDIOC_IMPV4L2_SHIM_MMAP  # _IOWR: offset/length/prot in, verdict and info out
    assert (cmd >> 30, (cmd >> 16) & 0x3FFF, chr((cmd >> 8) & 0xFF), cmd & 0xFF) == (3, 216, "V", 233)


# ---------------------------------------------------------------- hint and run

def _wait_for(pred, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_hint_once_for_cuse_clients_without_the_shim_only(fake_node, lib, caplog):
    """The fake node's "CUSE device" is /dev/null: holders of it without the
    shim get one hint; shim users and non-holders (FUSE clients) none."""
    srv, _ = fake_node
    with open("/dev/null", "rb") as null:
        plain = subprocess.Popen(["sleep", "30"], stdin=null)
        shimmed = subprocess.Popen(["sleep", "30"], stdin=null, env={**os.environ, "LD_PRELOAD": str(lib)})
    other = subprocess.Popen(["sleep", "30"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs = (plain, shimmed, other)
    try:
        assert _wait_for(lambda: server.shim_loaded(shimmed.pid))
        with caplog.at_level(logging.WARNING, "impv4l2.shim"):
            for _ in range(3):
                for p in procs:
                    srv.note_mmap_client("fake0", p.pid)
            assert _wait_for(lambda: "impv4l2 run" in caplog.text)
            time.sleep(0.3)  # let the worker go through the queued rest
        hints = [r.getMessage() for r in caplog.records if "impv4l2 run" in r.getMessage()]
        assert len(hints) == 1 and f"pid {plain.pid} (sleep)" in hints[0] and "fake0" in hints[0]
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ---------------------------------------------------------------- through a real node

@pytest.fixture
def fuse_capture_node(tmp_path):
    """A sim CaptureNode served as a file of a real FUSE mount."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    from impv4l2.driver import load_backend
    from impv4l2.fuse import FuseMount
    from impv4l2.v4l2.capture import CaptureNode

    backend = load_backend("sim", width=640, height=360, fps=25, sub_size=(320, 180))
    ch = next(c for c in backend.channels if c.role == "main")
    node = CaptureNode("video77", backend, ch)
    mnt = FuseMount(str(tmp_path / "mnt"))
    mnt.start()
    try:
        yield node, mnt.add(node)
    finally:
        mnt.stop()
        node.close()
        backend.close()




def node_ioctl(path: str, cmd: int = protocol.VIDIOC_IMPV4L2_SHIM_INFO, arg: bytes = b"") -> tuple[str, bytes]:
    """SHIM_INFO (or ``cmd`` with ``arg``) on ``path`` from another process (the FUSE
    server runs in this one)."""
    r = subprocess.run([sys.executable, str(CLIENTS / "raw_ioctl.py"), path, str(cmd), *([arg.hex()] if arg else [])],
                       capture_output=True, text=True, timeout=20, check=True)
    kind, value = r.stdout.split()
    return kind, bytes.fromhex(value) if kind == "ok" else value.encode()


def test_private_ioctl_answered_by_a_served_node_only_with_a_server(fuse_capture_node):
    node, path = fuse_capture_node
    # No shim server: ENOTTY, so the shim leaves mmap alone.
    assert node_ioctl(path) == ("errno", str(errno.ENOTTY).encode())
    with server.ShimServer(f"@impv4l2-shim-test-{os.getpid()}") as srv:
        srv.attach(node, rdev=os.stat("/dev/null").st_rdev)
        kind, arg = node_ioctl(path)
        assert kind == "ok"
        info = protocol.unpack_info(arg)
        assert info["magic"] == protocol.MAGIC and info["node"] == "video77"
        assert info["socket"] == srv.address and info["daemon_pid"] == os.getpid()
        assert info["memory_id"] == os.fstat(node.memory.fd).st_ino
        assert info["memory_size"] == node.memory.size
        # SHIM_MMAP (_IOWR) through the real FUSE transport: in and out, the verdict in the
        # struct (no buffers yet: EINVAL, as vb2_mmap) and the SHIM_INFO answer after it.
        kind, arg = node_ioctl(path, protocol.VIDIOC_IMPV4L2_SHIM_MMAP,
                               protocol.MMAP_REQ.pack(0, 4096, mmap.PROT_READ, -1) + bytes(protocol.INFO.size))
        assert kind == "ok"
        assert protocol.MMAP_REQ.unpack(arg[:protocol.MMAP_REQ.size]) == (0, 4096, mmap.PROT_READ, errno.EINVAL)
        assert protocol.unpack_info(arg[protocol.MMAP_REQ.size:])["node"] == "video77"




def test_reqbufs_on_the_fuse_file_with_a_shim_server_answers(fuse_capture_node, caplog):
    """REQBUFS(MMAP) runs the `impv4l2 run` hint on the FUSE loop thread; the hint looks
    through the client's fds for the CUSE node, and a stat() of the client's FUSE file was a
    GETATTR to that very thread: the client hung unkillably in fuse_do_ioctl (VM, 6.1)."""
    node, path = fuse_capture_node
    with server.ShimServer(f"@impv4l2-shim-test-{os.getpid()}") as srv, \
            caplog.at_level(logging.WARNING, "impv4l2.shim"):
        srv.attach(node, rdev=os.stat("/dev/null").st_rdev)
        p = subprocess.Popen([sys.executable, str(CLIENTS / "reqbufs_mmap.py"), path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        try:
            out, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()  # it dies once the fixture's unmount aborts the connection
            pytest.fail("REQBUFS on the FUSE file got no answer: the FUSE loop deadlocked in the hint")
        assert p.returncode == 0 and out.split() == ["buffers", "4"], err
        # the char device beside the FUSE file is still found: one hint for this pid
        assert sum(f"pid {p.pid} " in r.getMessage() for r in caplog.records) == 1, caplog.text


def test_run_command_preloads_the_shim_and_keeps_ld_preload(tmp_path):
    other = tmp_path / "libother.so"
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(other), "-x", "c", "-"], input="int other_x;", text=True, check=True)
    env = {**os.environ, "LD_PRELOAD": str(other)}
    r = subprocess.run([sys.executable, "-m", "impv4l2.cli", "run", "--", "sh", "-c",
                        'echo "$LD_PRELOAD"; cat /proc/$$/maps'], capture_output=True, text=True, env=env,
                       cwd=Path(shim.__file__).parents[2], check=True)
    first, maps = r.stdout.split("\n", 1)
    libs = first.split(":")
    assert Path(libs[0]).name == shim.LIBNAME and libs[1:] == [str(other)]
    assert shim.LIBNAME in maps and "libother.so" in maps


def test_run_without_command_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "impv4l2.cli", "run"], capture_output=True, text=True,
                       cwd=Path(shim.__file__).parents[2])
    assert r.returncode == 2 and "usage: impv4l2 run" in r.stderr


def test_preload_env_puts_the_shim_first_once():
    env = shim.preload_env({"LD_PRELOAD": "/a.so /lib.so", "X": "1"}, library="/lib.so")
    assert env == {"LD_PRELOAD": "/lib.so:/a.so", "X": "1"}
    assert shim.preload_env({}, library="/lib.so") == {"LD_PRELOAD": "/lib.so"}


# ---------------------------------------------------------------- mmap verdicts (as vb2_mmap)

RW = mmap.PROT_READ | mmap.PROT_WRITE


@pytest.fixture(scope="module")
def sim_backend():
    from impv4l2.driver import load_backend

    b = load_backend("sim", width=640, height=360, fps=30, sub_size=(320, 180))
    yield b
    b.close()


def test_capture_node_mmap_verdicts_follow_vb2(sim_backend):
    """Only QUERYBUF offsets of MMAP buffers allocated now, with a length that fits
    and read access; any file of the node (vb2_fop_mmap shares the node's queue)."""
    from impv4l2.v4l2 import abi
    from impv4l2.v4l2.capture import CaptureNode
    from support.v4l2_helpers import buf, ioctl, open_node, reqbufs

    node = CaptureNode("video78", sim_backend, sim_backend.channels[1])
    try:
        a, b = open_node(node), open_node(node, pid=2)
        assert a.mmap_check(0, 4096) == errno.EINVAL  # nothing allocated
        reqbufs(a, 3)
        bufs = []
        for i in range(3):
            q = buf(i)
            ioctl(a, "QUERYBUF", q)
            bufs.append((q.m.offset, q.length))
        for off, length in bufs:
            assert a.mmap_check(off, length, mmap.PROT_READ) == 0
            assert b.mmap_check(off, length, RW) == 0  # another file of the node
            assert a.mmap_check(off, 1, mmap.PROT_READ) == 0  # shorter: fine
            assert a.mmap_check(off, length + mmap.PAGESIZE) == errno.EINVAL  # past the buffer
            assert a.mmap_check(off + mmap.PAGESIZE, mmap.PAGESIZE) == errno.EINVAL  # inside, not a start
            assert a.mmap_check(off, length, mmap.PROT_WRITE) == errno.EINVAL  # capture: VM_READ needed
        assert a.mmap_check(bufs[-1][0] + 0xDEADB000, 4096) == errno.EINVAL
        reqbufs(a, 0)  # freed: the memfd keeps the pages, the offsets are gone
        assert all(a.mmap_check(off, length) == errno.EINVAL for off, length in bufs)
        reqbufs(a, 2, abi.Memory.USERPTR)  # USERPTR buffers live in the memfd too: never mappable
        assert all(a.mmap_check(bq.planes[0].offset, bq.planes[0].length) == errno.EINVAL
                   for bq in node.queue.buffers)
        assert a.mmap_check(0, 4096) == errno.EINVAL
    finally:
        node.close()


def test_encoder_mmap_verdicts_are_per_session(sim_backend):
    """M2M: a file maps only its own context's OUTPUT (writable) and CAPTURE buffers."""
    from impv4l2.v4l2 import abi
    from impv4l2.v4l2.encoder import EncoderNode
    from support.encoder_client import M2MClient

    node = EncoderNode("video79", sim_backend)
    node.add_waker(lambda: None)
    try:
        c1 = M2MClient(node, 320, 240, n_out=2, n_cap=2)
        c2 = M2MClient(node, 320, 240, n_out=2, n_cap=2, pid=1001)
        for off, length in c1.out_bufs:
            assert c1.h.mmap_check(off, length, RW) == 0
            assert c1.h.mmap_check(off, length, mmap.PROT_READ) == errno.EINVAL  # output: VM_WRITE needed
            assert c2.h.mmap_check(off, length, RW) == errno.EINVAL  # another session's buffer
        for off, length in c1.cap_bufs:
            assert c1.h.mmap_check(off, length, mmap.PROT_READ) == 0
            assert c1.h.mmap_check(off, length + mmap.PAGESIZE, mmap.PROT_READ) == errno.EINVAL
            assert c2.h.mmap_check(off, length, mmap.PROT_READ) == errno.EINVAL
        c3 = M2MClient(node, 320, 240, n_out=2, n_cap=2, pid=1002, memory=abi.Memory.USERPTR)
        for q in (c3.h.ctx.out_q, c3.h.ctx.cap_q):
            assert all(c3.h.mmap_check(b.planes[0].offset, b.planes[0].length, RW) == errno.EINVAL
                       for b in q.buffers)
        old = c1.out_bufs
        c1.reqbufs(c1.out_t, 0)
        assert all(c1.h.mmap_check(off, length, RW) == errno.EINVAL for off, length in old)
    finally:
        node.close()


def test_mmap_ioctl_through_the_table(fake_node, sim_backend):
    """VIDIOC_IMPV4L2_SHIM_MMAP as the transport hands it to a handle: verdict and info."""
    from impv4l2.v4l2.capture import CaptureNode
    from support.v4l2_helpers import MEM, buf, ioctl, open_node, reqbufs

    srv, _ = fake_node
    node = CaptureNode("video80", sim_backend, sim_backend.channels[1])
    try:
        srv.attach(node, rdev=os.stat("/dev/null").st_rdev)
        h = open_node(node)
        reqbufs(h, 2)
        q = buf(1)
        ioctl(h, "QUERYBUF", q)
        for off, length, prot, want in ((q.m.offset, q.length, mmap.PROT_READ, 0),
                                        (q.m.offset, q.length + 8192, mmap.PROT_READ, errno.EINVAL),
                                        (q.m.offset + 4096, 4096, mmap.PROT_READ, errno.EINVAL)):
            arg = bytearray(protocol.MMAP_REQ.pack(off, length, prot, -1) + bytes(protocol.INFO.size))
            assert h.ioctl(protocol.VIDIOC_IMPV4L2_SHIM_MMAP, arg, MEM) == 0
            assert protocol.MMAP_REQ.unpack(arg[:protocol.MMAP_REQ.size])[3] == want
            info = protocol.unpack_info(arg[protocol.MMAP_REQ.size:])
            assert (info["node"], info["socket"], info["memory_size"]) == ("video80", srv.address, node.memory.size)
        srv.stop()  # no server: ENOTTY, the shim then passes mmap through (the kernel's ENODEV)
        with pytest.raises(OSError) as e:
            h.ioctl(protocol.VIDIOC_IMPV4L2_SHIM_MMAP, bytearray(protocol.MMAP_SIZE), MEM)
        assert e.value.errno == errno.ENOTTY
    finally:
        node.close()
