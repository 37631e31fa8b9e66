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
 * As strict as the vendor's where a caller can go wrong: IMP_FrameSource_SetFrameDepth
 * once per channel (imp_framesource.h remark 6; depth 0 frees and is always accepted),
 * GetFrame gives up after GETFRAME_TIMEOUT_US without a frame, a reserved-memory (rmem)
 * budget charged by OSD pool, frame-source buffers (EnableChn) and encoder channels
 * (CreateChn), a stream ring that stalls while the packs it holds leave no room for the
 * next access unit (PollingStream times out, GetStream fails), binds as the SDK's graph
 * allows (FS->ENC, FS->OSD->ENC, FS output 0/1->IVS; each output and each group once),
 * and system teardown in the SDK sample's order (System_Exit first) or the reverse.
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
 *   IMPFAKE_RMEM=bytes         the rmem budget (default RMEM_DEFAULT)
 * Query functions: impfake_* at the end; at process exit the same counts go
 * to IMPFAKE_LOG as one "EXIT ..." line (for a daemon run as a subprocess).
 *
 * Frame and ring memory is mapped below 4 GiB (MAP_32BIT) because the SDK
 * carries virtual addresses in uint32_t fields.  The frame source is in libimp_fake_fs.c,
 * the encoder in libimp_fake_enc.c, the shared state in libimp_fake.h. */
#define _GNU_SOURCE
#include "libimp_fake.h"

/* ---------------------------------------------------------------- state */

pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
int n_errors, n_wrapped, n_stalls;
uint32_t rmem_used;
struct fake_sys sys = { .osd_pool = -1, .brightness = 128, .contrast = 128, .saturation = 128,
                        .sharpness = 128, .hue = 128, .aecomp = 128, .max_again = 160 };
struct fake_fs fs[NR_FS];
struct fake_grp grp[NR_GRP], osd_grp[NR_OSD], ivs_grp[NR_IVS];
IMPCell binds[NR_BIND][2];
int n_binds;
struct fake_enc enc[NR_ENC];
uint8_t *file_data;  /* Annex-B file mode */
Nal *file_nals;
int file_nnals, *file_au_start, file_naus;

/* ---------------------------------------------------------------- helpers */

void logline(const char *fmt, ...)
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
int enter(const char *name, const char *fmt, ...)
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

int violation(const char *name, const char *why)
{
    __sync_fetch_and_add(&n_errors, 1);
    logline("ERR %s: %s", name, why);
    return -1;
}

int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void sleep_us(int64_t us)
{
    if (us <= 0) return;
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

void *map32(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

const char *fake_version(void)
{
    const char *v = getenv("IMPFAKE_VERSION");
    return v ? v : "IMP-1.1.6";
}

/* The release as a number: "IMP-1.1.6" -> 1160, "1.1.5.2" -> 1152 (0: unparsable). */
int fake_release(void)
{
    const char *v = fake_version();
    while (*v && (*v < '0' || *v > '9')) v++;
    int a = 0, b = 0, c = 0, d = 0;
    if (sscanf(v, "%d.%d.%d.%d", &a, &b, &c, &d) < 3) return 0;
    return a * 1000 + b * 100 + c * 10 + d;
}

int fs_ok(int c) { return c >= 0 && c < NR_FS; }
int enc_ok(int c) { return c >= 0 && c < NR_ENC; }

int64_t fs_period_us(int c)
{
    int num = fs[c].attr.outFrmRateNum > 0 ? fs[c].attr.outFrmRateNum : 25;
    int den = fs[c].attr.outFrmRateDen > 0 ? fs[c].attr.outFrmRateDen : 1;
    return (int64_t)1000000 * den / num;
}

static uint32_t rmem_budget(void)
{
    const char *v = getenv("IMPFAKE_RMEM");
    return v ? (uint32_t)strtoul(v, NULL, 0) : RMEM_DEFAULT;
}

/* Take n bytes of rmem (0: done; -1: over budget, logged). Called with mu held. */
int rmem_take(const char *who, uint32_t n)
{
    if (rmem_used + n > rmem_budget()) {
        logline("RMEM %s: %u bytes wanted, %u of %u in use", who, n, rmem_used, rmem_budget());
        return -1;
    }
    rmem_used += n;
    return 0;
}

uint32_t nv12_size(int w, int h) { return (uint32_t)ALIGN16(w) * ALIGN16(h) * 3 / 2; }

/* ---------------------------------------------------------------- binds
 * The SDK's graph: (source device, destination device) pairs it connects. */
static const int BIND_OK[][2] = {
    {DEV_ID_FS, DEV_ID_ENC}, {DEV_ID_FS, DEV_ID_OSD}, {DEV_ID_OSD, DEV_ID_ENC}, {DEV_ID_FS, DEV_ID_IVS},
};

/* Whether the cell names an existing group/channel and a valid output. */
static int cell_exists(const IMPCell *c, int as_src)
{
    int g = c->groupID, outs = c->deviceID == DEV_ID_FS && as_src ? DEV_OUTPUTS_FS : 1;
    if (c->outputID < 0 || c->outputID >= outs) return 0;
    switch (c->deviceID) {
    case DEV_ID_FS: return fs_ok(g) && fs[g].created;
    case DEV_ID_ENC: return g >= 0 && g < NR_GRP && grp[g].created;
    case DEV_ID_OSD: return g >= 0 && g < NR_OSD && osd_grp[g].created;
    case DEV_ID_IVS: return g >= 0 && g < NR_IVS && ivs_grp[g].created;
    default: return 0;
    }
}

static int same_cell(const IMPCell *a, const IMPCell *b, int output)
{
    return a->deviceID == b->deviceID && a->groupID == b->groupID && (!output || a->outputID == b->outputID);
}

/* Index of the bind whose end `side` (0 src, 1 dst) is cell (outputs compared when `output`), or -1. */
int find_bind(int side, int dev, int group, int output, int match_output)
{
    IMPCell c = { dev, group, output };
    for (int i = 0; i < n_binds; i++)
        if (same_cell(&binds[i][side], &c, match_output)) return i;
    return -1;
}

/* The frame-source channel feeding encoder group g (directly or through an OSD group), or -1. */
int fs_feeding(int g)
{
    int b = find_bind(1, DEV_ID_ENC, g, 0, 0);
    if (b >= 0 && binds[b][0].deviceID == DEV_ID_OSD)
        b = find_bind(1, DEV_ID_OSD, binds[b][0].groupID, 0, 0);
    return b >= 0 && binds[b][0].deviceID == DEV_ID_FS ? binds[b][0].groupID : -1;
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
    rmem_used -= sys.osd_rmem;
    sys.osd_rmem = 0;
    REQUIRE(rmem_take(__func__, size) == 0, "OSD pool above the rmem budget");
    sys.osd_pool = sys.osd_rmem = size;
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
    REQUIRE(sys.isp_open && !sys.sensor_added && !sys.tuning, "close with sensor added / tuning on / not open");
    sys.isp_open = 0;
    rmem_used -= sys.osd_rmem;
    sys.osd_rmem = 0;
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
    /* sample_system_exit calls it first, tuning still enabled; the reverse order is accepted too */
    REQUIRE(sys.sys_init, "System_Exit order");
    for (int i = 0; i < NR_FS; i++) REQUIRE(!fs[i].created, "framesource channel left");
    for (int i = 0; i < NR_ENC; i++) REQUIRE(!enc[i].created, "encoder channel left");
    for (int i = 0; i < NR_GRP; i++) REQUIRE(!grp[i].created, "encoder group left");
    for (int i = 0; i < NR_OSD; i++) REQUIRE(!osd_grp[i].created, "OSD group left");
    for (int i = 0; i < NR_IVS; i++) REQUIRE(!ivs_grp[i].created, "IVS group left");
    REQUIRE(n_binds == 0, "binds left");
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
    int ok = 0;
    for (size_t i = 0; i < sizeof BIND_OK / sizeof BIND_OK[0]; i++)
        ok |= BIND_OK[i][0] == src->deviceID && BIND_OK[i][1] == dst->deviceID;
    REQUIRE(ok, "no such bind (FS->ENC, FS->OSD, OSD->ENC, FS->IVS)");
    REQUIRE(cell_exists(src, 1), "source not created / bad output");
    REQUIRE(cell_exists(dst, 0), "destination not created / bad output");
    REQUIRE(find_bind(0, src->deviceID, src->groupID, src->outputID, 1) < 0, "source output already bound");
    REQUIRE(find_bind(1, dst->deviceID, dst->groupID, 0, 0) < 0, "destination already bound");
    REQUIRE(n_binds < NR_BIND, "too many binds");
    binds[n_binds][0] = *src;
    binds[n_binds][1] = *dst;
    n_binds++;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_System_UnBind(IMPCell *src, IMPCell *dst)
{
    if (enter(__func__, "%d.%d.%d->%d.%d.%d", src->deviceID, src->groupID, src->outputID,
              dst->deviceID, dst->groupID, dst->outputID)) return -1;
    pthread_mutex_lock(&mu);
    int b = find_bind(0, src->deviceID, src->groupID, src->outputID, 1);
    REQUIRE(b >= 0 && same_cell(&binds[b][1], dst, 0), "not bound");
    REQUIRE(src->deviceID != DEV_ID_FS || !fs[src->groupID].enabled, "unbind while framesource enabled");
    binds[b][0] = binds[n_binds - 1][0];
    binds[b][1] = binds[n_binds - 1][1];
    n_binds--;
    pthread_mutex_unlock(&mu);
    return 0;
}

/* OSD and IVS groups: only so that binds through them can be made (no regions, no algorithms). */
#define SIMPLE_GROUP(Create, Destroy, arr, nr, dev)                                        \
    int Create(int g)                                                                     \
    {                                                                                     \
        if (enter(__func__, "%d", g)) return -1;                                          \
        pthread_mutex_lock(&mu);                                                          \
        REQUIRE(sys.sys_init && g >= 0 && g < nr && !arr[g].created, "CreateGroup order"); \
        arr[g].created = 1;                                                               \
        pthread_mutex_unlock(&mu);                                                        \
        return 0;                                                                         \
    }                                                                                     \
    int Destroy(int g)                                                                    \
    {                                                                                     \
        if (enter(__func__, "%d", g)) return -1;                                          \
        pthread_mutex_lock(&mu);                                                          \
        REQUIRE(g >= 0 && g < nr && arr[g].created, "group not created");                 \
        REQUIRE(find_bind(0, dev, g, 0, 0) < 0 && find_bind(1, dev, g, 0, 0) < 0, "group still bound"); \
        arr[g].created = 0;                                                               \
        pthread_mutex_unlock(&mu);                                                        \
        return 0;                                                                         \
    }
SIMPLE_GROUP(IMP_OSD_CreateGroup, IMP_OSD_DestroyGroup, osd_grp, NR_OSD, DEV_ID_OSD)
SIMPLE_GROUP(IMP_IVS_CreateGroup, IMP_IVS_DestroyGroup, ivs_grp, NR_IVS, DEV_ID_IVS)

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
    REQUIRE(sys.tuning && sys.isp_open, "DisableTuning order");
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
    for (int c = 0; c < NR_FS; c++) n += fs[c].created + fs[c].enabled;
    for (int g = 0; g < NR_GRP; g++) n += grp[g].created;
    for (int g = 0; g < NR_OSD; g++) n += osd_grp[g].created;
    for (int g = 0; g < NR_IVS; g++) n += ivs_grp[g].created;
    n += n_binds;
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
int impfake_stalls(void) { return n_stalls; }
/* rmem in use (bytes): the OSD pool, enabled frame-source channels, encoder channels */
unsigned impfake_rmem_used(void) { return rmem_used; }
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
    memset(grp, 0, sizeof grp);
    memset(osd_grp, 0, sizeof osd_grp);
    memset(ivs_grp, 0, sizeof ivs_grp);
    n_binds = 0;
    memset(enc, 0, sizeof enc);
    n_errors = n_wrapped = n_stalls = 0;
    rmem_used = 0;
    free(file_data); free(file_nals); free(file_au_start);
    file_data = NULL; file_nals = NULL; file_au_start = NULL; file_nnals = file_naus = 0;
}
