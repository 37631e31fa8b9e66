"""One ioctl from another process: argv = path, command number, [argument hex]; prints "ok <hex>"
or "errno <n>" (tests/shim/test_shim.py)."""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
arg = bytearray.fromhex(sys.argv[3]) if len(sys.argv) > 3 else bytearray(192)
try:
    fcntl.ioctl(fd, int(sys.argv[2]), arg)
    print("ok", arg.hex())
except OSError as e:
    print("errno", e.errno)
