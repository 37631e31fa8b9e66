"""A FUSE mount serving one echo device at argv[1] until SIGTERM (tests/fuse/test_fuse_mount.py:
kill -9 and SIGTERM of a server process).  Prints READY, then STOPPED <seconds to tear down>."""
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: support.*

from impv4l2.fuse import FuseMount  # noqa: E402
from support.fuse_echo_device import EchoDevice  # noqa: E402

m = FuseMount(sys.argv[1])
m.start()
m.add(EchoDevice("echo0"))
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: done.set())
print("READY", flush=True)
done.wait()
t0 = time.monotonic()
m.stop()
print("STOPPED", time.monotonic() - t0, flush=True)
