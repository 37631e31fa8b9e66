"""What the t31 backend tests share: the fake libimp as a test object, a collecting sink,
the SDK's system sequences (tests/driver/t31/)."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import pytest

from fakes.build import build_fake  # noqa: E402

from impv4l2.driver.base import FrameBuffer, FrameInfo  # noqa: E402
from impv4l2.driver.t31.backend import T31Backend  # noqa: E402
from impv4l2.driver.t31.libimp import ENV_LIBIMP  # noqa: E402

ENV = ("IMPFAKE_LOG", "IMPFAKE_FAIL_AT", "IMPFAKE_POLL_TIMEOUT", "IMPFAKE_FRAME_TIMEOUT",
       "IMPFAKE_H264", "IMPFAKE_RING_SIZE", "IMPFAKE_VERSION", ENV_LIBIMP)

# sample-common.c's sample_system_init: the OSD pool before ISP_Open (no undo), then each step
# with its undo (UNDO); teardown as its sample_system_exit (SYSTEM_DOWN)
SYSTEM_UP = ["IMP_OSD_SetPoolSize", "IMP_ISP_Open", "IMP_ISP_AddSensor", "IMP_ISP_EnableSensor",
             "IMP_System_Init", "IMP_ISP_EnableTuning"]
# sample-common.c's sample_system_exit: the system first, tuning after DelSensor
SYSTEM_DOWN = ["IMP_System_Exit", "IMP_ISP_DisableSensor", "IMP_ISP_DelSensor", "IMP_ISP_DisableTuning",
               "IMP_ISP_Close"]
UNDO = {"IMP_ISP_Open": "IMP_ISP_Close", "IMP_ISP_AddSensor": "IMP_ISP_DelSensor",
        "IMP_ISP_EnableSensor": "IMP_ISP_DisableSensor", "IMP_System_Init": "IMP_System_Exit",
        "IMP_ISP_EnableTuning": "IMP_ISP_DisableTuning"}


def write_proc_sensor(root: Path, **values) -> Path:
    """A /proc/jz/sensor as thingino's sensor-info module makes it (one value a file)."""
    root.mkdir(parents=True, exist_ok=True)
    values = {"name": "gc2053", "i2c_addr": "0x37", "width": 1920, "height": 1080, "max_fps": 30,
              **values}
    for name, value in values.items():
        (root / name).write_text(f"{value}\n")
    return root


class Fake:
    def __init__(self, path: Path, log: Path):
        self.path, self.log = path, log
        self.proc = write_proc_sensor(log.parent / "proc-jz-sensor", max_fps=60)
        self.made: list[T31Backend] = []  # closed at teardown: a failed test leaves no capture thread
        self.so = ctypes.CDLL(str(path))
        self.so.impfake_get_tuning.argtypes = [ctypes.c_char_p]
        self.so.impfake_bitrate.argtypes = [ctypes.c_int, ctypes.c_int]
        self.so.impfake_reset()
        log.write_text("")

    def calls(self) -> list[str]:
        """Logged call names, without per-frame tuning noise."""
        return [ln.split()[0] for ln in self.log.read_text().splitlines()
                if ln and not ln.startswith(("IMP_ISP_Tuning_", "FAIL ", "ERR "))]

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def __getattr__(self, name):  # impfake_* queries
        return getattr(self.so, "impfake_" + name)

    def backend(self, **kw) -> T31Backend:
        kw.setdefault("channels", [(320, 240, 60), (160, 120, 60)])
        kw.setdefault("proc_root", str(self.proc))
        be = T31Backend(lib_path=str(self.path), **kw)
        self.made.append(be)
        return be


@pytest.fixture
def make_fake(tmp_path, monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    log = tmp_path / "imp.log"
    monkeypatch.setenv("IMPFAKE_LOG", str(log))
    fakes: list[Fake] = []

    def make(omit=()):
        fakes.append(Fake(build_fake(omit=tuple(omit)), log))
        return fakes[-1]

    yield make
    for f in fakes:
        for be in f.made:
            be.close()


@pytest.fixture
def fake(make_fake):
    return make_fake()


class Sink:
    """A FrameSink collecting copies of what it is given."""

    def __init__(self, size: int, nbufs: int = 4):
        self.bufs = [bytearray(size) for _ in range(nbufs)]
        self.n = 0
        self.frames: list[tuple[bytes, FrameInfo]] = []
        self.cond = threading.Condition()

    def get_buffer(self):
        self.n += 1
        return FrameBuffer(memoryview(self.bufs[self.n % len(self.bufs)]), self.n % len(self.bufs))

    def frame_done(self, buf, info: FrameInfo) -> None:
        with self.cond:
            self.frames.append((bytes(buf.view[:info.bytesused]), info))
            self.cond.notify_all()

    def wait(self, count: int, timeout: float = 10.0) -> list[tuple[bytes, FrameInfo]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.frames) >= count, timeout), \
                f"only {len(self.frames)} of {count} frames"
            return list(self.frames)


def split_nals(au: bytes) -> list[bytes]:
    parts = au.split(b"\x00\x00\x00\x01")
    assert parts[0] == b"", "access unit must start with a 4-byte start code"
    return parts[1:]
