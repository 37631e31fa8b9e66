"""t31 backend capture cost against the fake libimp: frames/s and CPU per frame.

Run: .venv/bin/python benchmarks/t31_fake_capture.py
The fake paces frames at the channel rate; CPU time of the process per frame
is the backend's cost (GetStream/GetFrame + one memmove + release) plus the fake's.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fakes.build import build_fake  # noqa: E402

from impv4l2.driver.base import EncoderParams, FrameBuffer  # noqa: E402
from impv4l2.driver.t31.backend import T31Backend  # noqa: E402


class CountSink:
    def __init__(self, size):
        self.buf = FrameBuffer(memoryview(bytearray(size)), 0)
        self.n = 0
        self.bytes = 0

    def get_buffer(self):
        return self.buf

    def frame_done(self, buf, info):
        self.n += 1
        self.bytes += info.bytesused


def run(kind, w, h, fps, seconds=2.0):
    be = T31Backend(lib_path=str(build_fake()), channels=[(w, h, fps)],
                    sensor="gc2053", i2c_addr=0x37, sensor_width=w, sensor_height=h)
    sink = CountSink(w * h * 3 // 2)
    c0, t0 = time.process_time(), time.monotonic()
    if kind == "nv12":
        be.channels[0].start(sink)
    else:
        be.channels[0].start_encoded(EncoderParams(width=w, height=h, fps_num=fps), sink)
    time.sleep(seconds)
    n, nbytes = sink.n, sink.bytes
    c1, t1 = time.process_time(), time.monotonic()
    be.close()
    return n / (t1 - t0), (c1 - c0) / max(n, 1) * 1e6, nbytes / max(n, 1)


if __name__ == "__main__":
    os.environ.pop("IMPFAKE_LOG", None)
    print(f"{'stream':<22}{'fps':>8}{'CPU us/frame':>14}{'bytes/frame':>13}")
    for kind, w, h, fps in (("nv12", 1920, 1080, 200), ("nv12", 640, 360, 500),
                            ("h264", 1920, 1080, 500), ("h264", 640, 360, 1000)):
        rate, us, b = run(kind, w, h, fps)
        print(f"{kind + f' {w}x{h}':<22}{rate:>8.0f}{us:>14.1f}{b:>13.0f}")
