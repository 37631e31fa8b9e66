/* A fake libimp.so (T31, IMP SDK 1.1.x ABI) for testing the t31 backend.
 *
 * Exports the IMP calls the backend uses with the SDK's struct layouts
 * (imp_abi.h), enforces the SDK's ordering rules (a call out of order fails
 * and counts as an error), refuses what the vendor library refuses (frame
 * source widths not a multiple of 16, chn0 not FS_PHY_CHANNEL, a bit rate
 * outside its range or on a JPEG/FIXQP channel, the OSD pool size after
 * ISP_Open), records every call, produces NV12 frames laid out like the
 * vendor's (UV plane at width * ALIGN16(height), buffers ALIGN16(w) *
 * ALIGN16(h) * 3/2, padding rows zero) and H.264 access units pack by pack
 * through a small ring buffer (packs wrap around its end), writes the stream
 * tail of the SDK release it claims, and fails on demand.
 *
 * Environment (read at call time, so a test can change it between runs):
 *   IMPFAKE_LOG=path           append "Name args" per call
 *   IMPFAKE_FAIL_AT=Name       that call returns -1
 *   IMPFAKE_POLL_TIMEOUT=1     PollingStream always times out
 *   IMPFAKE_FRAME_TIMEOUT=1    GetFrame always times out
 *   IMPFAKE_H264=path          serve this Annex-B file (one AU per GetStream)
 *   IMPFAKE_RING_SIZE=bytes    stream ring size (default 16384)
 *   IMPFAKE_VERSION=text       what IMP_System_GetVersion reports (default
 *                              "IMP-1.1.6"); its release picks the stream tail
 * Query functions: impfake_* at the end; at process exit the same counts go
 * to IMPFAKE_LOG as one "EXIT ..." line (for a daemon run as a subprocess).
 *
 * Frame and ring memory is mapped below 4 GiB (MAP_32BIT) because the SDK
 * carries virtual addresses in uint32_t fields. */
#define _GNU_SOURCE
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
#define NR_ENC 8
#define PROFILE_JPEG (4 << 24)
#define RC_FIXQP 0
#define FS_PHY_CHANNEL 0
#define ALIGN16(x) (((x) + 15) & ~15)
/* NV12 test pattern: Y = the frame counter's low byte (the counter itself in the
 * first 8 bytes), U and V constant, rows of padding zero. */
#define NV12_U 0x50
#define NV12_V 0xb0

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int n_errors, n_wrapped;

/* ---------------------------------------------------------------- helpers */

static void logline(const char *fmt, ...)
{
    const char *path = getenv("IMPFAKE_LOG");
    if (!path) return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0) return;
    if (write(fd, line, n) < 0) { /* nothing to do */ }
    close(fd);
}

/* Log the call; -1 if the test asked this call to fail. */
static int enter(const char *name, const char *fmt, ...)
{
    char args[256] = "";
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(args, sizeof args, fmt, ap);
        va_end(ap);
    }
    logline("%s%s%s", name, *args ? " " : "", args);
    const char *f = getenv("IMPFAKE_FAIL_AT");
    if (f && strcmp(f, name) == 0) {
        logline("FAIL %s (requested)", name);
        return -1;
    }
    return 0;
}

static int violation(const char *name, const char *why)
{
    __sync_fetch_and_add(&n_errors, 1);
    logline("ERR %s: %s", name, why);
    return -1;
}
#define REQUIRE(cond, why) do { if (!(cond)) { pthread_mutex_unlock(&mu); return violation(__func__, why); } } while (0)

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void sleep_us(int64_t us)
{
    if (us <= 0) return;
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

static void *map32(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* ---------------------------------------------------------------- state */

static struct {
    int isp_open, sensor_added, sensor_enabled, sys_init, tuning;
    int osd_pool;       /* IMP_OSD_SetPoolSize's size, -1 never set */
    int64_t t0;
    int brightness, contrast, saturation, sharpness, hue, hflip, vflip;
    int antiflicker, running_mode_value, aecomp, max_again;
} sys = { .osd_pool = -1, .brightness = 128, .contrast = 128, .saturation = 128, .sharpness = 128,
          .hue = 128, .aecomp = 128, .max_again = 160 };

typedef struct {
    IMPFrameInfo_116 info;  /* the largest IMPFrameInfo (1.1.6); older releases fill its head */
    int busy;
} Slot;

static struct {
    int created, enabled, bound_grp; /* bound_grp: -1 none */
    IMPFSChnAttr attr;
    int depth, nslots, outstanding;
    Slot *slots;
    uint8_t *pool;
    size_t frame_size;
    int64_t t_enable;
    uint32_t raw_seq;
} fs[NR_FS];

static struct { int created; } grp[NR_GRP];

typedef struct { int type; uint32_t len; const uint8_t *data; } Nal;

static struct {
    int created, registered, grp, recv, idr_req;
    uint32_t file_pos;  /* the next AU of IMPFAKE_H264: an IDR jump moves the whole stream on */
    IMPEncoderChnAttr attr;
    uint8_t *ring;
    uint32_t ring_size, wpos, seq;
    int64_t t_start;
    int outstanding;
    int bitrate_target, bitrate_max;  /* last IMP_Encoder_SetChnBitRate, bit/s */
    IMPEncoderPack *out_packs[16];
} enc[NR_ENC];

/* Annex-B file mode */
static uint8_t *file_data;
static Nal *file_nals;
static int file_nnals, *file_au_start, file_naus;

static const char *fake_version(void)
{
    const char *v = getenv("IMPFAKE_VERSION");
    return v ? v : "IMP-1.1.6";
}

/* The release as a number: "IMP-1.1.6" -> 1160, "1.1.5.2" -> 1152 (0: unparsable). */
static int fake_release(void)
{
    const char *v = fake_version();
    while (*v && (*v < '0' || *v > '9')) v++;
    int a = 0, b = 0, c = 0, d = 0;
    if (sscanf(v, "%d.%d.%d.%d", &a, &b, &c, &d) < 3) return 0;
    return a * 1000 + b * 100 + c * 10 + d;
}

static int fs_ok(int c) { return c >= 0 && c < NR_FS; }
static int enc_ok(int c) { return c >= 0 && c < NR_ENC; }

static int64_t fs_period_us(int c)
{
    int num = fs[c].attr.outFrmRateNum > 0 ? fs[c].attr.outFrmRateNum : 25;
    int den = fs[c].attr.outFrmRateDen > 0 ? fs[c].attr.outFrmRateDen : 1;
    return (int64_t)1000000 * den / num;
}

/* ---------------------------------------------------------------- system / ISP */

#ifdef IMPFAKE_NEEDS_ALOG
/* Built with -DIMPFAKE_NEEDS_ALOG: like the vendor's libimp.so, it uses libalog's symbols
 * without naming libalog in DT_NEEDED, so dlopen fails unless they are loaded already. */
extern int IMP_Log_Get_Option(void);
__attribute__((constructor)) static void impfake_needs_alog(void) { (void)IMP_Log_Get_Option(); }
#endif

int IMP_OSD_SetPoolSize(int size)
{
    if (enter(__func__, "%d", size)) return -1;
    pthread_mutex_lock(&mu);
    /* sample-common.c and prudynt set it before IMP_ISP_Open: the rmem pools are laid out then */
    REQUIRE(!sys.isp_open, "OSD pool size after IMP_ISP_Open");
    REQUIRE(size >= 0, "negative pool size");
    sys.osd_pool = size;
    pthread_mutex_unlock(&mu);
    return 0;
}

/* Not logged (a query, like GetTimeStamp). */
int IMP_System_GetVersion(IMPVersion *v)
{
    if (!v) return violation(__func__, "NULL");
    snprintf(v->aVersion, sizeof v->aVersion, "%s", fake_version());
    return 0;
}

int IMP_ISP_Open(void)
{
    if (enter(__func__, NULL)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(!sys.isp_open, "already open");
    sys.isp_open = 1;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_ISP_Close(void)
{
    if (enter(__func__, NULL)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(sys.isp_open && !sys.sensor_added, "close with sensor added / not open");
    sys.isp_open = 0;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_ISP_AddSensor(IMPSensorInfo *p)
{
    if (enter(__func__, "%s i2c=0x%x", p->name, p->i2c.addr)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(sys.isp_open && !sys.sensor_added, "AddSensor order");
    REQUIRE(p->cbus_type == 1 && p->name[0], "bad sensor info");
    sys.sensor_added = 1;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_ISP_DelSensor(IMPSensorInfo *p)
{
    if (enter(__func__, "%s", p->name)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(sys.sensor_added && !sys.sensor_enabled, "DelSensor order");
    sys.sensor_added = 0;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_ISP_EnableSensor(void)
{
    if (enter(__func__, NULL)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(sys.sensor_added && !sys.sensor_enabled, "EnableSensor order");
    sys.sensor_enabled = 1;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_ISP_DisableSensor(void)
{
    if (enter(__func__, NULL)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(sys.sensor_enabled && !sys.sys_init, "DisableSensor order");
    sys.sensor_enabled = 0;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_System_Init(void)
{
    if (enter(__func__, NULL)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(sys.sensor_enabled && !sys.sys_init, "System_Init order");
    sys.sys_init = 1;
    sys.t0 = now_us();
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_System_Exit(void)
{
    if (enter(__func__, NULL)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(sys.sys_init && !sys.tuning, "System_Exit order");
    for (int i = 0; i < NR_FS; i++) REQUIRE(!fs[i].created, "framesource channel left");
    for (int i = 0; i < NR_ENC; i++) REQUIRE(!enc[i].created, "encoder channel left");
    for (int i = 0; i < NR_GRP; i++) REQUIRE(!grp[i].created, "encoder group left");
    sys.sys_init = 0;
    pthread_mutex_unlock(&mu);
    return 0;
}

int64_t IMP_System_GetTimeStamp(void)
{
    return now_us() - sys.t0;
}

int IMP_System_Bind(IMPCell *src, IMPCell *dst)
{
    if (enter(__func__, "%d.%d.%d->%d.%d.%d", src->deviceID, src->groupID, src->outputID,
              dst->deviceID, dst->groupID, dst->outputID)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(src->deviceID == DEV_ID_FS && dst->deviceID == DEV_ID_ENC, "only FS->ENC binds");
    REQUIRE(fs_ok(src->groupID) && fs[src->groupID].created, "source not created");
    REQUIRE(dst->groupID >= 0 && dst->groupID < NR_GRP && grp[dst->groupID].created, "group not created");
    REQUIRE(fs[src->groupID].bound_grp < 0, "already bound");
    fs[src->groupID].bound_grp = dst->groupID;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_System_UnBind(IMPCell *src, IMPCell *dst)
{
    if (enter(__func__, "%d.%d.%d->%d.%d.%d", src->deviceID, src->groupID, src->outputID,
              dst->deviceID, dst->groupID, dst->outputID)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(fs_ok(src->groupID) && fs[src->groupID].bound_grp == dst->groupID, "not bound");
    REQUIRE(!fs[src->groupID].enabled, "unbind while framesource enabled");
    fs[src->groupID].bound_grp = -1;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_ISP_EnableTuning(void)
{
    if (enter(__func__, NULL)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(sys.sys_init && !sys.tuning, "EnableTuning order");
    sys.tuning = 1;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_ISP_DisableTuning(void)
{
    if (enter(__func__, NULL)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(sys.tuning, "DisableTuning order");
    sys.tuning = 0;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_ISP_Tuning_SetSensorFPS(uint32_t num, uint32_t den)
{
    if (enter(__func__, "%u/%u", num, den)) return -1;
    return sys.tuning ? 0 : violation(__func__, "tuning not enabled");
}

#define TUNING_U8(Name, field)                                                   \
    int IMP_ISP_Tuning_Set##Name(unsigned char v)                                \
    {                                                                            \
        if (enter(__func__, "%u", v)) return -1;                                 \
        if (!sys.tuning) return violation(__func__, "tuning not enabled");       \
        sys.field = v;                                                           \
        return 0;                                                                \
    }                                                                            \
    int IMP_ISP_Tuning_Get##Name(unsigned char *p)                               \
    {                                                                            \
        if (!sys.tuning) return violation(__func__, "tuning not enabled");       \
        *p = (unsigned char)sys.field;                                           \
        return 0;                                                                \
    }
TUNING_U8(Brightness, brightness)
TUNING_U8(Contrast, contrast)
TUNING_U8(Saturation, saturation)
TUNING_U8(Sharpness, sharpness)
TUNING_U8(BcshHue, hue)

#define TUNING_INT(Name, field, type)                                            \
    int IMP_ISP_Tuning_Set##Name(type v)                                         \
    {                                                                            \
        if (enter(__func__, "%d", (int)v)) return -1;                            \
        if (!sys.tuning) return violation(__func__, "tuning not enabled");       \
        sys.field = (int)v;                                                      \
        return 0;                                                                \
    }                                                                            \
    int IMP_ISP_Tuning_Get##Name(type *p)                                        \
    {                                                                            \
        if (!sys.tuning) return violation(__func__, "tuning not enabled");       \
        *p = (type)sys.field;                                                    \
        return 0;                                                                \
    }
TUNING_INT(ISPHflip, hflip, int)
TUNING_INT(ISPVflip, vflip, int)
TUNING_INT(AntiFlickerAttr, antiflicker, int)
TUNING_INT(ISPRunningMode, running_mode_value, int)
TUNING_INT(AeComp, aecomp, int)
TUNING_INT(MaxAgain, max_again, uint32_t)

/* ---------------------------------------------------------------- frame source */

int IMP_FrameSource_CreateChn(int c, IMPFSChnAttr *a)
{
    if (enter(__func__, "%d %dx%d", c, a ? a->picWidth : 0, a ? a->picHeight : 0)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(sys.sys_init, "System_Init first");
    REQUIRE(fs_ok(c) && !fs[c].created, "bad or existing channel");
    REQUIRE(a->pixFmt == 10 && a->picWidth > 0 && a->picHeight > 0 && a->nrVBs > 0, "bad attr");
    /* the vendor's frame source: widths (and scaler outputs) multiples of 16, chn0 physical */
    REQUIRE(a->picWidth % 16 == 0, "picWidth not a multiple of 16");
    REQUIRE(!a->scaler.enable || a->scaler.outwidth % 16 == 0, "scaler.outwidth not a multiple of 16");
    REQUIRE(c != 0 || a->type == FS_PHY_CHANNEL, "channel 0 must be FS_PHY_CHANNEL");
    fs[c].attr = *a;
    fs[c].created = 1;
    fs[c].bound_grp = -1;
    fs[c].nslots = a->nrVBs;
    /* OpenIMP framesource_tseries.c: ALIGN16(w) * ALIGN16(h) * 3/2 per buffer */
    fs[c].frame_size = (size_t)ALIGN16(a->picWidth) * ALIGN16(a->picHeight) * 3 / 2;
    fs[c].pool = map32(fs[c].frame_size * a->nrVBs);
    fs[c].slots = calloc(a->nrVBs, sizeof(Slot));
    REQUIRE(fs[c].pool && fs[c].slots, "out of memory");
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_FrameSource_SetChnAttr(int c, const IMPFSChnAttr *a)
{
    if (enter(__func__, "%d %dx%d@%d/%d", c, a->picWidth, a->picHeight, a->outFrmRateNum, a->outFrmRateDen)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(fs_ok(c) && fs[c].created && !fs[c].enabled, "SetChnAttr order");
    REQUIRE(a->picWidth == fs[c].attr.picWidth && a->picHeight == fs[c].attr.picHeight, "size differs from CreateChn");
    fs[c].attr = *a;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_FrameSource_GetChnAttr(int c, IMPFSChnAttr *a)
{
    if (!fs_ok(c) || !fs[c].created) return violation(__func__, "not created");
    *a = fs[c].attr;
    return 0;
}

int IMP_FrameSource_DestroyChn(int c)
{
    if (enter(__func__, "%d", c)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(fs_ok(c) && fs[c].created && !fs[c].enabled && fs[c].bound_grp < 0, "DestroyChn order");
    REQUIRE(fs[c].outstanding == 0, "frames not released");
    munmap(fs[c].pool, fs[c].frame_size * fs[c].nslots);
    free(fs[c].slots);
    memset(&fs[c], 0, sizeof fs[c]);
    fs[c].bound_grp = -1;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_FrameSource_EnableChn(int c)
{
    if (enter(__func__, "%d", c)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(fs_ok(c) && fs[c].created && !fs[c].enabled, "EnableChn order");
    fs[c].enabled = 1;
    fs[c].t_enable = now_us();
    fs[c].raw_seq = 0;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_FrameSource_DisableChn(int c)
{
    if (enter(__func__, "%d", c)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(fs_ok(c) && fs[c].enabled, "DisableChn order");
    for (int e = 0; e < NR_ENC; e++)
        REQUIRE(!(enc[e].recv && enc[e].grp == fs[c].bound_grp), "encoder still receiving");
    fs[c].enabled = 0;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_FrameSource_SetFrameDepth(int c, int depth)
{
    if (enter(__func__, "%d %d", c, depth)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(fs_ok(c) && fs[c].created, "SetFrameDepth on missing channel");
    REQUIRE(depth >= 0 && depth <= fs[c].nslots, "depth above nrVBs");
    REQUIRE(depth > 0 || fs[c].outstanding == 0, "depth 0 with frames held");
    fs[c].depth = depth;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_FrameSource_GetFrame(int c, IMPFrameInfo **frame)
{
    /* not logged: called per frame */
    if (!fs_ok(c)) return violation(__func__, "bad channel");
    if (getenv("IMPFAKE_FRAME_TIMEOUT")) { sleep_us(100000); return -1; }
    pthread_mutex_lock(&mu);
    REQUIRE(fs[c].enabled && fs[c].depth > 0, "GetFrame without enable/depth");
    if (fs[c].outstanding >= fs[c].depth) {
        pthread_mutex_unlock(&mu);
        return violation(__func__, "more frames held than depth");
    }
    int64_t due = fs[c].t_enable + (int64_t)fs[c].raw_seq * fs_period_us(c);
    pthread_mutex_unlock(&mu);
    sleep_us(due - now_us());
    pthread_mutex_lock(&mu);
    int s;
    for (s = 0; s < fs[c].nslots && fs[c].slots[s].busy; s++) {}
    REQUIRE(s < fs[c].nslots, "no free slot");
    Slot *slot = &fs[c].slots[s];
    uint8_t *mem = fs[c].pool + fs[c].frame_size * s;
    uint64_t seq = fs[c].raw_seq++;
    size_t w = fs[c].attr.picWidth, h = fs[c].attr.picHeight;
    /* the vendor's NV12 (nv12_copyto_yuyv422 in the SDK samples): Y rows of stride w, then
     * padding rows up to ALIGN16(h), the UV plane at w * ALIGN16(h) */
    size_t ysize = w * h, uv_at = w * ALIGN16(h);
    memset(mem, 0, fs[c].frame_size);
    memset(mem, (int)(seq & 0xff), ysize);
    memcpy(mem, &seq, sizeof seq); /* counter pattern: seq in the first 8 bytes */
    for (size_t i = 0; i < w * (h / 2); i += 2) {
        mem[uv_at + i] = NV12_U;
        mem[uv_at + i + 1] = NV12_V;
    }
    slot->busy = 1;
    slot->info.index = s;
    slot->info.pool_idx = c;
    slot->info.width = fs[c].attr.picWidth;
    slot->info.height = fs[c].attr.picHeight;
    slot->info.pixfmt = 10;
    slot->info.size = (uint32_t)fs[c].frame_size;
    slot->info.phyAddr = 0;
    slot->info.virAddr = (uint32_t)(uintptr_t)mem;
    slot->info.timeStamp = now_us() - sys.t0;
    if (fake_release() >= 1160) slot->info.rotate_osdflag = 0;
    fs[c].outstanding++;
    *frame = (IMPFrameInfo *)&slot->info;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_FrameSource_ReleaseFrame(int c, IMPFrameInfo *frame)
{
    if (!fs_ok(c)) return violation(__func__, "bad channel");
    pthread_mutex_lock(&mu);
    Slot *slot = (Slot *)frame;
    REQUIRE(fs[c].slots && slot >= fs[c].slots && slot < fs[c].slots + fs[c].nslots && slot->busy,
            "release of a frame not held");
    slot->busy = 0;
    fs[c].outstanding--;
    pthread_mutex_unlock(&mu);
    return 0;
}

/* ---------------------------------------------------------------- encoder */

int IMP_Encoder_CreateGroup(int g)
{
    if (enter(__func__, "%d", g)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(sys.sys_init && g >= 0 && g < NR_GRP && !grp[g].created, "CreateGroup order");
    grp[g].created = 1;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_Encoder_DestroyGroup(int g)
{
    if (enter(__func__, "%d", g)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(g >= 0 && g < NR_GRP && grp[g].created, "group not created");
    for (int e = 0; e < NR_ENC; e++) REQUIRE(!(enc[e].registered && enc[e].grp == g), "channel still registered");
    for (int c = 0; c < NR_FS; c++) REQUIRE(!(fs[c].created && fs[c].bound_grp == g), "group still bound");
    grp[g].created = 0;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_Encoder_SetDefaultParam(IMPEncoderChnAttr *a, int profile, int rcMode, uint16_t w, uint16_t h,
                                uint32_t num, uint32_t den, uint32_t gop, int maxSame, int qp, uint32_t bitrate)
{
    if (enter(__func__, "0x%x rc=%d %ux%u %u/%u gop=%u qp=%d br=%u", profile, rcMode, w, h, num, den, gop, qp, bitrate)) return -1;
    memset(a, 0, sizeof *a);
    a->encAttr.eProfile = profile;
    a->encAttr.uLevel = 51;
    a->encAttr.uWidth = w;
    a->encAttr.uHeight = h;
    a->encAttr.ePicFormat = 0x188;
    a->rcAttr.attrRcMode.rcMode = rcMode;
    a->rcAttr.attrRcMode.attrCappedQuality.uTargetBitRate = bitrate;
    a->rcAttr.attrRcMode.attrCappedQuality.iInitialQP = qp;
    a->rcAttr.outFrmRate.frmRateNum = num;
    a->rcAttr.outFrmRate.frmRateDen = den;
    a->gopAttr.uGopCtrlMode = 2;
    a->gopAttr.uGopLength = gop;
    a->gopAttr.uMaxSameSenceCnt = maxSame;
    return 0;
}

static void load_file(void)
{
    const char *path = getenv("IMPFAKE_H264");
    if (file_data || !path) return;
    FILE *f = fopen(path, "rb");
    if (!f) return;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    file_data = malloc(n);
    if (fread(file_data, 1, n, f) != (size_t)n) n = 0;
    fclose(f);
    file_nals = calloc(n / 3 + 1, sizeof(Nal));
    file_au_start = calloc(n / 3 + 2, sizeof(int));
    long i = 0, start = -1;
    for (;;) {  /* split on 00 00 01 start codes; payload excludes the code */
        long sc = -1;
        for (long j = i; j + 2 < n; j++)
            if (file_data[j] == 0 && file_data[j + 1] == 0 && file_data[j + 2] == 1) { sc = j; break; }
        long end = sc < 0 ? n : sc;
        if (start >= 0) {
            while (end > start && file_data[end - 1] == 0) end--;  /* 4-byte code's zero */
            Nal *nal = &file_nals[file_nnals++];
            nal->data = file_data + start;
            nal->len = end - start;
            nal->type = file_data[start] & 0x1f;
        }
        if (sc < 0) break;
        start = i = sc + 3;
    }
    int au_open = 0;
    for (int k = 0; k < file_nnals; k++) {  /* an AU ends with its (single) slice */
        if (!au_open) { file_au_start[file_naus++] = k; au_open = 1; }
        if (file_nals[k].type == 1 || file_nals[k].type == 5) au_open = 0;
    }
    if (au_open) file_naus--;
    file_au_start[file_naus] = file_nnals;
}

int IMP_Encoder_CreateChn(int e, const IMPEncoderChnAttr *a)
{
    if (enter(__func__, "%d 0x%x %ux%u", e, a->encAttr.eProfile, a->encAttr.uWidth, a->encAttr.uHeight)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(sys.sys_init && enc_ok(e) && !enc[e].created, "CreateChn order");
    REQUIRE(a->encAttr.uWidth > 0 && a->encAttr.uHeight > 0 && a->rcAttr.outFrmRate.frmRateDen > 0, "bad attr");
    load_file();
    const char *rs = getenv("IMPFAKE_RING_SIZE");
    uint32_t size = rs ? (uint32_t)atoi(rs) : 16384;
    if (file_data)
        for (int k = 0; k < file_naus; k++) {
            uint32_t au = 0;
            for (int m = file_au_start[k]; m < file_au_start[k + 1]; m++) au += file_nals[m].len + 4;
            if (size < au + 64) size = au + 64;
        }
    if (size < 1024) size = 1024;
    enc[e].attr = *a;
    enc[e].ring = map32(size);
    enc[e].ring_size = size;
    enc[e].wpos = 0;
    enc[e].seq = 0;
    enc[e].created = 1;
    enc[e].grp = -1;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_Encoder_DestroyChn(int e)
{
    if (enter(__func__, "%d", e)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(enc_ok(e) && enc[e].created && !enc[e].registered, "DestroyChn order");
    REQUIRE(enc[e].outstanding == 0, "streams not released");
    munmap(enc[e].ring, enc[e].ring_size);
    memset(&enc[e], 0, sizeof enc[e]);
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_Encoder_RegisterChn(int g, int e)
{
    if (enter(__func__, "%d %d", g, e)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(g >= 0 && g < NR_GRP && grp[g].created, "group not created");
    REQUIRE(enc_ok(e) && enc[e].created && !enc[e].registered, "RegisterChn order");
    enc[e].registered = 1;
    enc[e].grp = g;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_Encoder_UnRegisterChn(int e)
{
    if (enter(__func__, "%d", e)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(enc_ok(e) && enc[e].registered && !enc[e].recv, "UnRegisterChn order");
    enc[e].registered = 0;
    enc[e].grp = -1;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_Encoder_StartRecvPic(int e)
{
    if (enter(__func__, "%d", e)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(enc_ok(e) && enc[e].registered && !enc[e].recv, "StartRecvPic order");
    enc[e].recv = 1;
    enc[e].t_start = now_us();
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_Encoder_StopRecvPic(int e)
{
    if (enter(__func__, "%d", e)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(enc_ok(e) && enc[e].recv, "StopRecvPic order");
    enc[e].recv = 0;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_Encoder_Query(int e, IMPEncoderChnStat *st)
{
    if (!enc_ok(e) || !enc[e].created) return violation(__func__, "not created");
    memset(st, 0, sizeof *st);
    st->registered = enc[e].registered;
    return 0;
}

int IMP_Encoder_RequestIDR(int e)
{
    if (enter(__func__, "%d", e)) return -1;
    if (!enc_ok(e) || !enc[e].created) return violation(__func__, "not created");
    enc[e].idr_req = 1;
    return 0;
}

int IMP_Encoder_FlushStream(int e)
{
    if (enter(__func__, "%d", e)) return -1;
    if (!enc_ok(e) || !enc[e].created) return violation(__func__, "not created");
    enc[e].idr_req = 1;
    return 0;
}

/* bit/s (1.1.4 zh imp_encoder.h: 码率单位是 bit/s; 1.1.6 en), kept in the channel attr in
 * kbit/s like SetDefaultParam's (OpenIMP's SetChnBitRate: target > 0, then / 1000). */
int IMP_Encoder_SetChnBitRate(int e, int target, int max)
{
    if (enter(__func__, "%d %d %d", e, target, max)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(enc_ok(e) && enc[e].created, "not created");
    /* @attention: only H.264/H.265 channels; OpenIMP refuses FIXQP */
    REQUIRE(enc[e].attr.encAttr.eProfile != PROFILE_JPEG, "JPEG channel");
    REQUIRE(enc[e].attr.rcAttr.attrRcMode.rcMode != RC_FIXQP, "FIXQP channel has no bit rate");
    REQUIRE(target >= 1000 && max >= 0, "bit rate out of range (bit/s, at least 1 kbit/s)");
    enc[e].bitrate_target = target;
    enc[e].bitrate_max = max;
    enc[e].attr.rcAttr.attrRcMode.attrCappedQuality.uTargetBitRate = target / 1000;
    if (max > 0) enc[e].attr.rcAttr.attrRcMode.attrCappedQuality.uMaxBitRate = max / 1000;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_Encoder_SetChnGopLength(int e, int gop)
{
    if (enter(__func__, "%d %d", e, gop)) return -1;
    if (!enc_ok(e) || !enc[e].created || gop <= 0) return violation(__func__, "bad call");
    enc[e].attr.gopAttr.uGopLength = gop;
    return 0;
}

/* The FS channel feeding encoder channel e (through its group), or -1. */
static int source_of(int e)
{
    for (int c = 0; c < NR_FS; c++)
        if (fs[c].enabled && enc[e].registered && fs[c].bound_grp == enc[e].grp) return c;
    return -1;
}

/* Time the next picture of e is due, or -1 when nothing feeds it. */
static int64_t due_us(int e)
{
    int c = source_of(e);
    if (c < 0 || !enc[e].recv) return -1;
    int64_t t = enc[e].t_start > fs[c].t_enable ? enc[e].t_start : fs[c].t_enable;
    return t + (int64_t)enc[e].seq * fs_period_us(c);
}

int IMP_Encoder_PollingStream(int e, uint32_t timeout_ms)
{
    if (!enc_ok(e)) return violation(__func__, "bad channel");
    int64_t deadline = now_us() + (int64_t)timeout_ms * 1000;
    if (getenv("IMPFAKE_POLL_TIMEOUT")) { sleep_us(deadline - now_us()); return -1; }
    pthread_mutex_lock(&mu);
    int64_t due = due_us(e);
    pthread_mutex_unlock(&mu);
    if (due < 0 || due > deadline) { sleep_us(deadline - now_us()); return -1; }
    sleep_us(due - now_us());
    return 0;
}

static void ring_put(int e, const uint8_t *p, uint32_t n)
{
    for (uint32_t done = 0; done < n;) {
        uint32_t chunk = enc[e].ring_size - enc[e].wpos;
        if (chunk > n - done) chunk = n - done;
        memcpy(enc[e].ring + enc[e].wpos, p + done, chunk);
        done += chunk;
        enc[e].wpos = (enc[e].wpos + chunk) % enc[e].ring_size;
    }
}

static void add_pack(int e, IMPEncoderPack *pk, int type, const uint8_t *hdr, uint32_t hlen,
                     const uint8_t *body, uint32_t blen, int fill, int64_t ts)
{
    pk->offset = enc[e].wpos;
    pk->length = hlen + blen;
    pk->timestamp = ts;
    pk->nalType.h264NalType = type;
    pk->sliceType = type == 5 ? 2 : 1;
    if (pk->offset + pk->length > enc[e].ring_size) n_wrapped++;
    ring_put(e, hdr, hlen);
    if (body) ring_put(e, body, blen);
    else {
        uint8_t buf[256];
        memset(buf, fill, sizeof buf);
        for (uint32_t left = blen; left;) {
            uint32_t k = left < sizeof buf ? left : sizeof buf;
            ring_put(e, buf, k);
            left -= k;
        }
    }
}

int IMP_Encoder_GetStream(int e, IMPEncoderStream *st, bool block)
{
    if (!enc_ok(e)) return violation(__func__, "bad channel");
    pthread_mutex_lock(&mu);
    int64_t due = due_us(e);
    REQUIRE(due >= 0, "GetStream with nothing bound/started");
    if (now_us() < due) {
        pthread_mutex_unlock(&mu);
        if (!block) return -1;
        sleep_us(due - now_us());
        pthread_mutex_lock(&mu);
    }
    int slot;
    for (slot = 0; slot < 16 && enc[e].out_packs[slot]; slot++) {}
    REQUIRE(slot < 16, "too many streams held");
    uint32_t n = enc[e].seq;
    int64_t ts = now_us() - sys.t0;
    IMPEncoderPack *packs = calloc(64, sizeof *packs);
    int np = 0;
    static const uint8_t sc[4] = {0, 0, 0, 1};
    if (enc[e].attr.encAttr.eProfile == PROFILE_JPEG) {
        uint8_t soi[2] = {0xff, 0xd8}, eoi[2] = {0xff, 0xd9};
        uint32_t start = enc[e].wpos;
        uint32_t body = 1000 + (n * 131) % 4000;
        add_pack(e, &packs[np], 0, soi, 2, NULL, body, 2 + n % 200, ts);
        ring_put(e, eoi, 2);
        packs[np].offset = start;
        packs[np].length = 2 + body + 2;
        np++;
    } else if (file_data && file_naus) {
        int au = enc[e].file_pos % file_naus;
        if (enc[e].idr_req) {  /* jump to the next AU holding an IDR */
            for (int k = 0; k < file_naus; k++) {
                int cand = (au + k) % file_naus, idr = 0;
                for (int m = file_au_start[cand]; m < file_au_start[cand + 1]; m++) idr |= file_nals[m].type == 5;
                if (idr) { au = cand; break; }
            }
            enc[e].idr_req = 0;
        }
        enc[e].file_pos = au + 1;
        for (int m = file_au_start[au]; m < file_au_start[au + 1] && np < 64; m++, np++)
            add_pack(e, &packs[np], file_nals[m].type, sc, 4, file_nals[m].data, file_nals[m].len, 0, ts);
    } else {
        /* 1.1.5/1.1.6 SetDefaultParam doc: "GOPLength = uGopLength * uMaxSameSenceCnt" */
        uint32_t same = enc[e].attr.gopAttr.uMaxSameSenceCnt ? enc[e].attr.gopAttr.uMaxSameSenceCnt : 1;
        uint32_t gop = (enc[e].attr.gopAttr.uGopLength ? enc[e].attr.gopAttr.uGopLength : 50) * same;
        int idr = n % gop == 0 || enc[e].idr_req;
        enc[e].idr_req = 0;
        int fill = 2 + n % 200;  /* payload byte: never 0/1, so no false start codes */
        if (idr) {
            uint8_t h7[5] = {0, 0, 0, 1, 0x67}, h8[5] = {0, 0, 0, 1, 0x68}, h5[5] = {0, 0, 0, 1, 0x65};
            add_pack(e, &packs[np++], 7, h7, 5, NULL, 12, fill, ts);
            add_pack(e, &packs[np++], 8, h8, 5, NULL, 4, fill, ts);
            add_pack(e, &packs[np++], 5, h5, 5, NULL, 2000 + (n * 37) % 3000, fill, ts);
        } else {
            uint8_t h1[5] = {0, 0, 0, 1, 0x41};
            add_pack(e, &packs[np++], 1, h1, 5, NULL, 200 + (n * 53) % 1500, fill, ts);
        }
    }
    packs[np - 1].frameEnd = 1;
    uint32_t au_bytes = 0;
    for (int k = 0; k < np; k++) au_bytes += packs[k].length;
    /* the tail of the release this library claims (its IMPEncoderStream) */
    int rel = fake_release();
    int jpeg = enc[e].attr.encAttr.eProfile == PROFILE_JPEG;
    IMPEncoderStreamInfo *info = NULL;
    IMPEncoderJpegInfo *jinfo = NULL;
    if (rel >= 1160) {
        IMPEncoderStream_116 *t = (IMPEncoderStream_116 *)st;
        t->isVI = 0;
        info = &t->streamInfo;
        jinfo = &t->jpegInfo;
    } else if (rel >= 1150 && rel < 1152) {
        IMPEncoderStream_115 *t = (IMPEncoderStream_115 *)st;
        memset(&t->streamInfo, 0, sizeof t->streamInfo);
        if (jpeg) {
            t->jpegInfo.iNumBytes = au_bytes;
            t->jpegInfo.iQPfactor = 50;
        } else {
            t->streamInfo.iNumBytes = au_bytes;
            t->streamInfo.iSliceQP = 30;
        }
    } else if (rel >= 1140 && rel < 1150) {
        IMPEncoderStream_114 *t = (IMPEncoderStream_114 *)st;
        info = &t->streamInfo;
        jinfo = &t->jpegInfo;
    }
    if (info) {
        memset(info, 0, sizeof *info);
        if (jpeg) {
            jinfo->iNumBytes = au_bytes;
            jinfo->iQPfactor = 50;
        } else {
            info->iNumBytes = au_bytes;
            info->iSliceQP = 30;
        }
    }
    st->phyAddr = 0;
    st->virAddr = (uint32_t)(uintptr_t)enc[e].ring;
    st->streamSize = enc[e].ring_size;
    st->pack = packs;
    st->packCount = np;
    st->seq = enc[e].seq++;
    enc[e].out_packs[slot] = packs;
    enc[e].outstanding++;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_Encoder_ReleaseStream(int e, IMPEncoderStream *st)
{
    if (!enc_ok(e)) return violation(__func__, "bad channel");
    pthread_mutex_lock(&mu);
    int slot;
    for (slot = 0; slot < 16 && enc[e].out_packs[slot] != st->pack; slot++) {}
    REQUIRE(st->pack && slot < 16, "release of a stream not held");
    enc[e].out_packs[slot] = NULL;
    free(st->pack);
    enc[e].outstanding--;
    pthread_mutex_unlock(&mu);
    return 0;
}

/* ---------------------------------------------------------------- queries for tests */

int impfake_outstanding_streams(void)
{
    int n = 0;
    for (int e = 0; e < NR_ENC; e++) n += enc[e].outstanding;
    return n;
}

int impfake_outstanding_frames(void)
{
    int n = 0;
    for (int c = 0; c < NR_FS; c++) n += fs[c].outstanding;
    return n;
}

/* Everything still open: ISP, sensor, system, tuning, channels, groups, binds. */
int impfake_open_resources(void)
{
    int n = sys.isp_open + sys.sensor_added + sys.sensor_enabled + sys.sys_init + sys.tuning;
    for (int c = 0; c < NR_FS; c++) n += fs[c].created + fs[c].enabled + (fs[c].created && fs[c].bound_grp >= 0);
    for (int g = 0; g < NR_GRP; g++) n += grp[g].created;
    for (int e = 0; e < NR_ENC; e++) n += enc[e].created + enc[e].registered + enc[e].recv;
    return n;
}

int impfake_errors(void) { return n_errors; }
/* The last bit rate IMP_Encoder_SetChnBitRate accepted on e (bit/s): target, or max when which=1. */
int impfake_bitrate(int e, int which)
{
    return enc_ok(e) ? (which ? enc[e].bitrate_max : enc[e].bitrate_target) : -1;
}
int impfake_wrapped_packs(void) { return n_wrapped; }
int impfake_get_tuning(const char *name)
{
    if (!strcmp(name, "brightness")) return sys.brightness;
    if (!strcmp(name, "contrast")) return sys.contrast;
    if (!strcmp(name, "hflip")) return sys.hflip;
    if (!strcmp(name, "antiflicker")) return sys.antiflicker;
    if (!strcmp(name, "running_mode")) return sys.running_mode_value;
    if (!strcmp(name, "osd_pool")) return sys.osd_pool;
    return -1;
}

/* At process exit (a daemon under test, queried from outside): one summary
 * line "EXIT streams=N frames=N open=N errors=N" in IMPFAKE_LOG. */
__attribute__((destructor)) static void impfake_exit_summary(void)
{
    logline("EXIT streams=%d frames=%d open=%d errors=%d", impfake_outstanding_streams(),
            impfake_outstanding_frames(), impfake_open_resources(), impfake_errors());
}

/* Forget all state (a test after a deliberately broken one). */
void impfake_reset(void)
{
    memset(&sys, 0, sizeof sys);
    sys.osd_pool = -1;
    sys.brightness = sys.contrast = sys.saturation = sys.sharpness = sys.hue = sys.aecomp = 128;
    sys.max_again = 160;
    memset(fs, 0, sizeof fs);
    for (int c = 0; c < NR_FS; c++) fs[c].bound_grp = -1;
    memset(grp, 0, sizeof grp);
    memset(enc, 0, sizeof enc);
    n_errors = n_wrapped = 0;
    free(file_data); free(file_nals); free(file_au_start);
    file_data = NULL; file_nals = NULL; file_au_start = NULL; file_nnals = file_naus = 0;
}
