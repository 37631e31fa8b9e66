/* Pass-through checks of the preload shim: calls it must leave alone (tests/shim/test_shim.py). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static void report(const char *what, void *p, int err) {
    if (p == MAP_FAILED) printf("%s: failed errno=%d\n", what, err);
    else printf("%s: ok errno=%d\n", what, err);
}

int main(int argc, char **argv) {
    close(-123);  /* marks the start for strace */
    int f = open(argv[1], O_RDWR);
    errno = 4242;  /* a successful mmap must leave errno alone */
    unsigned char *p = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, f, 4096);
    report("file shared", p, errno);
    if (p != MAP_FAILED) { printf("file byte %d\n", p[5]); p[6] = 0x5a; munmap(p, 8192); }
    p = mmap64(NULL, 4096, PROT_READ, MAP_PRIVATE, f, 0);
    report("file private mmap64", p, errno);
    if (p != MAP_FAILED) { printf("file byte %d\n", p[0]); munmap(p, 4096); }
    int z = open("/dev/zero", O_RDWR);
    for (int i = 0; i < 3; i++) {
        errno = 4242;
        p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, i ? MAP_SHARED : MAP_PRIVATE, z, 0);
        report("/dev/zero", p, errno);
        if (p != MAP_FAILED) { printf("zero byte %d\n", p[100]); munmap(p, 4096); }
    }
    int n = open("/dev/null", O_RDWR);  /* a char device without mmap: ENODEV, unchanged */
    errno = 4242;
    p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, n, 0);
    report("/dev/null", p, errno);
    errno = 4242;
    p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, 999, 0);
    report("bad fd", p, errno);
    errno = 4242;
    p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    report("anonymous", p, errno);
    return 0;
}
