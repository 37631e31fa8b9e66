"""open(argv[1]) read-write and close it: prints 'ok' or the errno name (support.fuse_clients.open_as
runs it as another uid, the program on stdin)."""
import errno
import os
import sys

try:
    os.close(os.open(sys.argv[1], os.O_RDWR))
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
