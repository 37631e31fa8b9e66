"""As uid nobody (after importing as root): SO_RCVBUFFORCE is refused, SO_RCVBUF still works;
prints the granted buffer and rmem_max (tests/test_uevent.py)."""
import os
from impv4l2 import uevent  # first: nobody may not read this tree or the venv
os.setgid(65534); os.setuid(65534)
with uevent.UeventSocket() as s:
    try:
        s._sock.setsockopt(uevent.socket.SOL_SOCKET, uevent.SO_RCVBUFFORCE, 1 << 20)
    except PermissionError:
        print(s.rcvbuf, open("/proc/sys/net/core/rmem_max").read().strip())
