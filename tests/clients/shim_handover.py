"""The shim's memfd hand-over seen from a client: argv = repo, node, hold (rw|ro|none), socket
(tests/shim/test_shim.py)."""
import mmap, os, socket, sys
sys.path.insert(0, sys.argv[1])
from impv4l2.shim import protocol
node, hold, addr = sys.argv[2], sys.argv[3], sys.argv[4]
held = os.open("/dev/null", {"rw": os.O_RDWR, "ro": os.O_RDONLY}[hold]) if hold != "none" else None
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(protocol.socket_address(addr))
s.send(protocol.REQUEST.pack(protocol.MAGIC if node != "badmagic" else b"nope\0\0\0\0", protocol.VERSION, 0, node.encode()))
msg, fds, _flags, _addr = socket.recv_fds(s, protocol.REPLY.size, 1)
err, flags, size, mem_id = protocol.REPLY.unpack(msg)
print("reply", err, flags, size, len(fds))
if fds:
    fd = fds[0]
    print("same-file", os.fstat(fd).st_ino == mem_id)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    print("read", bytes(m[100:108]).hex())
    try:
        w = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        w[200:204] = b"back"
        print("write ok")
    except OSError as e:
        print("write errno", e.errno)
