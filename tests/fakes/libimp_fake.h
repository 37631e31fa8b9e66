/* The fake libimp's shared state and helpers (libimp_fake.c: system, ISP, binds, queries;
 * libimp_fake_fs.c: frame source; libimp_fake_enc.c: encoder).  Nothing here is exported:
 * the library's interface is the IMP_* and impfake_* functions. */
#ifndef LIBIMP_FAKE_H
#define LIBIMP_FAKE_H
#include "imp_abi.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef MAP_32BIT
#define MAP_32BIT 0   /* 32-bit targets: every address fits */
#endif

#define NR_FS 3
#define NR_GRP 3
/* The AVPU's channel limits as libimp enforces them: 9 encoder channel slots (OpenIMP's
 * reading of libimp 1.1.6), at most 2 channels registered to one group (imp_encoder.h: "each
 * group can add 2 encoding channel"). */
#define NR_ENC 9
#define NR_ENC_PER_GRP 2
#define PROFILE_JPEG (4 << 24)
#define RC_FIXQP 0
#define FS_PHY_CHANNEL 0
#define ALIGN16(x) (((x) + 15) & ~15)
/* NV12 test pattern: Y = the frame counter's low byte (the counter itself in the
 * first 8 bytes), U and V constant, rows of padding zero. */
#define NV12_U 0x50
#define NV12_V 0xb0
/* The vendor's GetFrame waits this long for a frame before it fails. */
#define GETFRAME_TIMEOUT_US 2000000
/* rmem, resembling a T31X: thingino boots it with rmem=29M, of which the ISP keeps about
 * 5 MiB for raw and statistics buffers.  Charged: the OSD pool; per enabled frame-source
 * channel nrVBs NV12 buffers of ALIGN16(w) * ALIGN16(h) * 3/2 (framesource_tseries.c); per
 * encoder channel its stream buffer plus, for H.264, a reference and a reconstructed
 * picture.  Main 1920x1080 + sub 640x360, each NV12 + H.264 + JPEG, fits (16 MiB with the
 * OSD pool); a second 1080p H.264 channel, or a 2560x1440 main and a sub, both H.264, do not. */
#define RMEM_DEFAULT (24u << 20)
#define NR_OSD 4
#define NR_IVS 2
#define NR_BIND 16
#define DEV_OUTPUTS_FS 2     /* a frame-source channel has two outputs (IVS on output 1) */

#pragma GCC visibility push(hidden)

extern pthread_mutex_t mu;
extern int n_errors, n_wrapped, n_stalls;
extern uint32_t rmem_used;

void logline(const char *fmt, ...);
int enter(const char *name, const char *fmt, ...);   /* log the call; -1 if asked to fail */
int violation(const char *name, const char *why);
#define REQUIRE(cond, why) do { if (!(cond)) { pthread_mutex_unlock(&mu); return violation(__func__, why); } } while (0)
int64_t now_us(void);
void sleep_us(int64_t us);
void *map32(size_t size);
const char *fake_version(void);
int fake_release(void);
int fs_ok(int c);
int enc_ok(int c);
int64_t fs_period_us(int c);
int rmem_take(const char *who, uint32_t n);
uint32_t nv12_size(int w, int h);
int find_bind(int side, int dev, int group, int output, int match_output);
int fs_feeding(int g);

struct fake_sys {
    int isp_open, sensor_added, sensor_enabled, sys_init, tuning;
    int osd_pool;       /* IMP_OSD_SetPoolSize's size, -1 never set */
    uint32_t osd_rmem;  /* its rmem, freed when the ISP closes */
    int64_t t0;
    int brightness, contrast, saturation, sharpness, hue, hflip, vflip;
    int antiflicker, running_mode_value, aecomp, max_again;
};
extern struct fake_sys sys;

typedef struct {
    IMPFrameInfo_116 info;  /* the largest IMPFrameInfo (1.1.6); older releases fill its head */
    int busy;
} Slot;

struct fake_fs {
    int created, enabled;
    IMPFSChnAttr attr;
    int depth, depth_calls, nslots, outstanding;  /* depth_calls: non-zero SetFrameDepths */
    uint32_t rmem;      /* charged at EnableChn */
    Slot *slots;
    uint8_t *pool;
    size_t frame_size;
    int64_t t_enable;
    uint32_t raw_seq;
};
extern struct fake_fs fs[NR_FS];

struct fake_grp { int created; };
extern struct fake_grp grp[NR_GRP], osd_grp[NR_OSD], ivs_grp[NR_IVS];
extern IMPCell binds[NR_BIND][2];  /* src, dst */
extern int n_binds;

typedef struct { int type; uint32_t len; const uint8_t *data; } Nal;

struct fake_enc {
    int created, registered, grp, recv, idr_req;
    uint32_t file_pos;  /* the next AU of IMPFAKE_H264: an IDR jump moves the whole stream on */
    IMPEncoderChnAttr attr;
    uint8_t *ring;
    uint32_t ring_size, wpos, seq;
    int64_t t_start;
    int outstanding;
    int bitrate_target, bitrate_max;  /* last IMP_Encoder_SetChnBitRate, bit/s */
    IMPEncoderPack *out_packs[16];
    uint32_t out_bytes[16], held_bytes, max_au;  /* ring bytes the caller holds; largest AU */
    uint32_t rmem;
};
extern struct fake_enc enc[NR_ENC];

/* Annex-B file mode */
extern uint8_t *file_data;
extern Nal *file_nals;
extern int file_nnals, *file_au_start, file_naus;


#pragma GCC visibility pop
#endif
