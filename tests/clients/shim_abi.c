/* The shim's ABI as its C source has it: ioctl numbers, struct sizes and offsets, printed for
 * tests/shim/test_shim.py to compare with impv4l2/shim/protocol.py. */
#include "impv4l2_preload.c"  /* compiled with -I <its directory> */
int main(void) {
    printf("%lu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %lu %zu %zu %zu %zu %zu\n",
           (unsigned long)VIDIOC_IMPV4L2_SHIM_INFO, sizeof(struct impv4l2_shim_info),
           offsetof(struct impv4l2_shim_info, memory_size), offsetof(struct impv4l2_shim_info, memory_id),
           offsetof(struct impv4l2_shim_info, daemon_pid), offsetof(struct impv4l2_shim_info, node),
           offsetof(struct impv4l2_shim_info, socket), sizeof(struct shim_request),
           offsetof(struct shim_request, node), sizeof(struct shim_reply),
           offsetof(struct shim_reply, memory_id), (unsigned long)VIDIOC_IMPV4L2_SHIM_MMAP,
           sizeof(struct impv4l2_shim_mmap), offsetof(struct impv4l2_shim_mmap, length),
           offsetof(struct impv4l2_shim_mmap, prot), offsetof(struct impv4l2_shim_mmap, error),
           offsetof(struct impv4l2_shim_mmap, info));
    return 0;
}
