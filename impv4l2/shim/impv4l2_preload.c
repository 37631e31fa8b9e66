/*
 * libimpv4l2-preload.so: mmap for impv4l2's CUSE nodes (/dev/videoN).
 *
 * CUSE has no mmap (the kernel answers ENODEV), yet every common V4L2 client
 * streams with V4L2_MEMORY_MMAP.  The driver keeps all buffers of a node in
 * ONE memfd and its QUERYBUF offsets are offsets into that memfd, so this
 * library turns
 *     mmap(addr, len, prot, flags, <fd of an impv4l2 CUSE node>, off)
 * into
 *     mmap(addr, len, prot, flags, <the node's memfd>, off)
 * The client then reads the very pages the driver writes: zero copies, and
 * munmap/mremap/msync work as on any shared mapping.
 *
 * Identity, not names: a node is recognised by a driver-private ioctl
 * (VIDIOC_IMPV4L2_SHIM_INFO) that only impv4l2 answers; the answer names the
 * daemon's unix socket, which hands the memfd over with SCM_RIGHTS after
 * checking (SO_PEERCRED + /proc/<pid>/fd) that this process has the node open.
 *
 * The memfd holds every buffer the node ever allocated, so mapping it is not
 * proof that vb2 would allow the mapping: each mmap first asks the driver
 * (VIDIOC_IMPV4L2_SHIM_MMAP on the same fd: offset, length, prot) whether the
 * offset is one QUERYBUF gave for an MMAP buffer allocated now on this file's
 * queues and the length fits it; the answer is vb2_mmap's errno (USERPTR
 * queues, freed buffers, random offsets: EINVAL).  The same ioctl repeats the
 * SHIM_INFO answer, so a known node costs one ioctl per mmap.
 *
 * Everything else passes through untouched: anonymous maps and fd < 0 cost
 * nothing; other fds cost one fstat; other character devices one ioctl the
 * first time they are seen (the answer is cached per device inode).  With no
 * impv4l2 daemon the ioctl fails and mmap behaves exactly as without us.
 *
 * Keep in sync with impv4l2/shim/protocol.py.  Build:
 *     cc -O2 -shared -fPIC -o libimpv4l2-preload.so impv4l2_preload.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define SHIM_MAGIC "impv4l2"
#define SHIM_VERSION 2u /* 2: VIDIOC_IMPV4L2_SHIM_MMAP */
#define SHIM_FLAG_READONLY 1u /* reply flag: the memfd was sent read-only */

/* The ioctl's struct: explicit padding, same layout for 32- and 64-bit callers. */
struct impv4l2_shim_info {
	char magic[8];        /* "impv4l2\0" */
	uint32_t version;     /* SHIM_VERSION */
	uint32_t flags;       /* reserved, 0 */
	uint64_t memory_size; /* bytes of the node's memfd */
	uint64_t memory_id;   /* st_ino of that memfd: a new id means new memory */
	uint32_t daemon_pid;
	uint32_t reserved0;
	char node[32];        /* device name, e.g. "video10" */
	char socket[108];     /* unix socket path; "@name" = abstract namespace */
	uint8_t reserved[12];
};
_Static_assert(sizeof(struct impv4l2_shim_info) == 192, "shim info ABI");

/* _IOR('V', BASE_VIDIOC_PRIVATE + 40, struct impv4l2_shim_info) */
#define VIDIOC_IMPV4L2_SHIM_INFO _IOR('V', 192 + 40, struct impv4l2_shim_info)

/* Asked before every mmap of a node: may this fd map len bytes at offset? */
struct impv4l2_shim_mmap {
	uint64_t offset;      /* in: the mmap offset (a QUERYBUF mem_offset) */
	uint64_t length;      /* in: the mmap length */
	uint32_t prot;        /* in: PROT_* (vb2 wants READ on capture, WRITE on output queues) */
	int32_t error;        /* out: 0, or the errno vb2_mmap gives for this mapping */
	struct impv4l2_shim_info info; /* out: as VIDIOC_IMPV4L2_SHIM_INFO */
};
_Static_assert(sizeof(struct impv4l2_shim_mmap) == 216, "shim mmap ABI");

/* _IOWR('V', BASE_VIDIOC_PRIVATE + 41, struct impv4l2_shim_mmap) */
#define VIDIOC_IMPV4L2_SHIM_MMAP _IOWR('V', 192 + 41, struct impv4l2_shim_mmap)

struct shim_request {
	char magic[8];
	uint32_t version;
	uint32_t reserved;
	char node[32];
};

struct shim_reply {
	int32_t error;        /* 0 or an errno; an fd is attached only when 0 */
	uint32_t flags;       /* SHIM_FLAG_READONLY */
	uint64_t memory_size;
	uint64_t memory_id;
};

typedef void *(*mmap64_fn)(void *, size_t, int, int, int, off64_t);

static mmap64_fn real_mmap64;
static __thread int resolving; /* dlsym may allocate, and an allocator may mmap */
static int debug;

/* Char devices seen: is it an impv4l2 node?  Keyed by the device inode, so a
 * re-created /dev/videoN (new daemon, same name and maybe same rdev) is new. */
#define NDEV 64
struct dev_entry {
	dev_t dev;
	ino_t ino;
	dev_t rdev;
	int impv4l2; /* 1 yes, -1 no, 0 free slot */
};

/* Memfds received, per node of a daemon. */
#define NMEM 16
struct mem_entry {
	uint32_t daemon_pid;
	char node[32];
	uint64_t memory_id;
	int memfd; /* -1: free slot */
	uint32_t flags;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct dev_entry devs[NDEV];
static unsigned dev_next;
static struct mem_entry mems[NMEM];
static unsigned mem_next;

#define DBG(...) do { if (debug) dprintf(2, "impv4l2-preload: " __VA_ARGS__); } while (0)

static void lock_prepare(void) { pthread_mutex_lock(&lock); }
static void lock_release(void) { pthread_mutex_unlock(&lock); }

static void resolve(void)
{
	resolving = 1;
	if (!real_mmap64)
		real_mmap64 = (mmap64_fn)dlsym(RTLD_NEXT, "mmap64");
	resolving = 0;
}

__attribute__((constructor)) static void shim_init(void)
{
	const char *d = getenv("IMPV4L2_PRELOAD_DEBUG");
	debug = d && *d && strcmp(d, "0") != 0;
	for (int i = 0; i < NMEM; i++)
		mems[i].memfd = -1;
	pthread_atfork(lock_prepare, lock_release, lock_release);
	resolve();
}

/* The next mmap in the chain; the raw syscall while dlsym is still running. */
static void *next_mmap(void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
	if (!real_mmap64 && !resolving)
		resolve();
	if (real_mmap64)
		return real_mmap64(addr, len, prot, flags, fd, off);
#ifdef SYS_mmap2
	if (off & 4095) {
		errno = EINVAL;
		return MAP_FAILED;
	}
	return (void *)syscall(SYS_mmap2, addr, len, prot, flags, fd, (unsigned long)(off >> 12));
#else
	return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
#endif
}

static struct dev_entry *dev_lookup(const struct stat *st)
{
	for (int i = 0; i < NDEV; i++)
		if (devs[i].impv4l2 && devs[i].dev == st->st_dev && devs[i].ino == st->st_ino &&
		    devs[i].rdev == st->st_rdev)
			return &devs[i];
	return NULL;
}

static void dev_remember(const struct stat *st, int impv4l2)
{
	pthread_mutex_lock(&lock);
	struct dev_entry *e = dev_lookup(st);
	if (!e)
		e = &devs[dev_next++ % NDEV];
	e->dev = st->st_dev;
	e->ino = st->st_ino;
	e->rdev = st->st_rdev;
	e->impv4l2 = impv4l2;
	pthread_mutex_unlock(&lock);
}

static int info_valid(struct impv4l2_shim_info *info)
{
	if (memcmp(info->magic, SHIM_MAGIC, sizeof(SHIM_MAGIC)) != 0 || info->version != SHIM_VERSION)
		return 0;
	info->node[sizeof(info->node) - 1] = 0;
	info->socket[sizeof(info->socket) - 1] = 0;
	return 1;
}

/* 1: an impv4l2 node, 0: anything else.  Asked once per device inode. */
static int probe(int fd, const struct stat *st)
{
	pthread_mutex_lock(&lock);
	struct dev_entry *e = dev_lookup(st);
	int known = e ? e->impv4l2 : 0;
	pthread_mutex_unlock(&lock);
	if (known)
		return known > 0;
	struct impv4l2_shim_info info_buf, *info = &info_buf;
	memset(info, 0, sizeof(*info));
	if (ioctl(fd, VIDIOC_IMPV4L2_SHIM_INFO, info) != 0) {
		int err = errno;
		/* Only a definite "not mine" is remembered (not EINTR and the like). */
		if (err == ENOTTY || err == EINVAL || err == ENOSYS || err == EOPNOTSUPP || err == EPERM ||
		    err == EACCES || err == ENODEV || err == ENXIO)
			dev_remember(st, -1);
		DBG("fd %d (rdev %u:%u): not an impv4l2 node (%s)\n", fd, major(st->st_rdev),
		    minor(st->st_rdev), strerror(err));
		return 0;
	}
	if (!info_valid(info)) {
		DBG("fd %d: impv4l2 node of another shim version (%u, mine %u): not mapping it\n", fd,
		    info->version, SHIM_VERSION);
		dev_remember(st, -1);
		return 0;
	}
	dev_remember(st, 1);
	return 1;
}

/* Ask the daemon for the node's memfd; returns the fd or -1 with errno set. */
static int fetch_memfd(const struct impv4l2_shim_info *info, uint32_t *flags)
{
	struct sockaddr_un sa;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	size_t n = strnlen(info->socket, sizeof(info->socket) - 1);
	if (n == 0 || n > sizeof(sa.sun_path) - 1) {
		errno = EPROTO;
		return -1;
	}
	socklen_t salen;
	if (info->socket[0] == '@') { /* abstract: no file, no leftover after a crash */
		memcpy(sa.sun_path + 1, info->socket + 1, n - 1);
		salen = offsetof(struct sockaddr_un, sun_path) + n;
	} else {
		memcpy(sa.sun_path, info->socket, n);
		salen = sizeof(sa);
	}
	int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -1;
	struct timeval tv = {5, 0}; /* a wedged daemon must not hang the client forever */
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	int fd = -1, err = 0;
	struct shim_request req;
	memset(&req, 0, sizeof(req));
	memcpy(req.magic, SHIM_MAGIC, sizeof(SHIM_MAGIC));
	req.version = SHIM_VERSION;
	memcpy(req.node, info->node, sizeof(req.node));
	if (connect(s, (struct sockaddr *)&sa, salen) != 0 || send(s, &req, sizeof(req), MSG_NOSIGNAL) < 0) {
		err = errno;
		goto out;
	}
	struct shim_reply rep;
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} cbuf;
	struct iovec iov = {&rep, sizeof(rep)};
	struct msghdr msg = {0};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = cbuf.buf;
	msg.msg_controllen = sizeof(cbuf.buf);
	ssize_t r = recvmsg(s, &msg, MSG_CMSG_CLOEXEC);
	if (r < 0) {
		err = errno;
		goto out;
	}
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
		    c->cmsg_len >= CMSG_LEN(sizeof(int)))
			memcpy(&fd, CMSG_DATA(c), sizeof(int));
	if (r != (ssize_t)sizeof(rep))
		err = EPROTO;
	else if (rep.error)
		err = rep.error;
	else if (fd < 0)
		err = EPROTO;
	else
		*flags = rep.flags;
out:
	close(s);
	if (err) {
		if (fd >= 0)
			close(fd);
		errno = err;
		return -1;
	}
	return fd;
}

/* The node's memfd: cached, refetched when the daemon reports new memory. */
static int node_memfd(const struct impv4l2_shim_info *info, uint32_t *flags)
{
	pthread_mutex_lock(&lock);
	struct mem_entry *slot = NULL;
	for (int i = 0; i < NMEM; i++) {
		struct mem_entry *m = &mems[i];
		if (m->memfd >= 0 && m->daemon_pid == info->daemon_pid && strcmp(m->node, info->node) == 0) {
			if (m->memory_id == info->memory_id) {
				int fd = m->memfd;
				*flags = m->flags;
				pthread_mutex_unlock(&lock);
				return fd;
			}
			slot = m; /* stale: replace */
		}
	}
	/* Fetched under the lock: concurrent first mmaps of a node ask only once. */
	int fd = fetch_memfd(info, flags);
	if (fd >= 0) {
		struct stat st;
		uint64_t id = fstat(fd, &st) == 0 ? (uint64_t)st.st_ino : 0;
		if (!slot)
			slot = &mems[mem_next++ % NMEM];
		if (slot->memfd >= 0)
			close(slot->memfd); /* existing mappings keep their own reference */
		slot->daemon_pid = info->daemon_pid;
		memcpy(slot->node, info->node, sizeof(slot->node));
		slot->memory_id = id;
		slot->memfd = fd;
		slot->flags = *flags;
		DBG("node %s: memfd %d (id %llu, %llu bytes%s)\n", info->node, fd, (unsigned long long)id,
		    (unsigned long long)info->memory_size, (*flags & SHIM_FLAG_READONLY) ? ", read-only" : "");
	}
	pthread_mutex_unlock(&lock);
	return fd;
}

static void *shim_mmap(void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
	if (fd < 0 || (flags & MAP_ANONYMOUS))
		return next_mmap(addr, len, prot, flags, fd, off);
	int saved = errno;
	struct stat st;
	if (fstat(fd, &st) != 0 || !S_ISCHR(st.st_mode)) {
		errno = saved;
		return next_mmap(addr, len, prot, flags, fd, off);
	}
	if (!probe(fd, &st)) {
		errno = saved;
		return next_mmap(addr, len, prot, flags, fd, off);
	}
	/* The checks the mmap core and vb2_mmap make before looking at the queue. */
	int acc = fcntl(fd, F_GETFL);
	acc = acc < 0 ? O_RDWR : acc & O_ACCMODE;
	int type = flags & MAP_TYPE;
	if (type != MAP_SHARED && type != MAP_SHARED_VALIDATE) {
		errno = EINVAL; /* vb2: "VM_SHARED needed" */
		return MAP_FAILED;
	}
	if (acc == O_WRONLY || ((prot & PROT_WRITE) && acc == O_RDONLY)) {
		errno = EACCES;
		return MAP_FAILED;
	}
	if (off < 0 || (off & 4095) || len == 0) {
		errno = EINVAL;
		return MAP_FAILED;
	}
	/* The driver's verdict for this fd (its queues, their memory type, the buffers
	 * allocated now); its answer also carries the current memory id, so a
	 * replaced memfd is noticed. */
	struct impv4l2_shim_mmap req;
	memset(&req, 0, sizeof(req));
	req.offset = (uint64_t)off;
	req.length = len;
	req.prot = (uint32_t)prot;
	if (ioctl(fd, VIDIOC_IMPV4L2_SHIM_MMAP, &req) != 0 || !info_valid(&req.info)) {
		/* No shim server any more (or another version): as without the shim. */
		DBG("fd %d: no mmap verdict from the driver (%s): passing through\n", fd, strerror(errno));
		errno = saved;
		return next_mmap(addr, len, prot, flags, fd, off);
	}
	struct impv4l2_shim_info info = req.info;
	if (req.error) {
		DBG("%s: mmap %zu@%lld refused by the driver: %s\n", info.node, len, (long long)off,
		    strerror(req.error));
		errno = req.error;
		return MAP_FAILED;
	}
	uint64_t plen = ((uint64_t)len + 4095) & ~(uint64_t)4095;
	if ((uint64_t)off + plen > info.memory_size) { /* allowed but not there: never SIGBUS */
		DBG("%s: mmap %zu@%lld outside the %llu bytes of buffer memory\n", info.node, len,
		    (long long)off, (unsigned long long)info.memory_size);
		errno = EINVAL;
		return MAP_FAILED;
	}
	uint32_t mflags = 0;
	int memfd = node_memfd(&info, &mflags);
	if (memfd < 0) {
		static int warned;
		int err = errno;
		if (!__atomic_exchange_n(&warned, 1, __ATOMIC_RELAXED))
			dprintf(2, "impv4l2-preload: %s: cannot get the buffer memory from the driver "
				   "(socket %s): %s\n", info.node, info.socket, strerror(err));
		errno = ENODEV; /* what the kernel says about mmap on CUSE */
		return MAP_FAILED;
	}
	void *p = next_mmap(addr, len, prot, flags, memfd, off);
	DBG("%s: mmap fd %d len %zu off %lld -> memfd %d at %p\n", info.node, fd, len, (long long)off, memfd, p);
	if (p != MAP_FAILED)
		errno = saved;
	return p;
}

__attribute__((visibility("default"))) void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return shim_mmap(addr, len, prot, flags, fd, (off64_t)off);
}

__attribute__((visibility("default"))) void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
	return shim_mmap(addr, len, prot, flags, fd, off);
}
