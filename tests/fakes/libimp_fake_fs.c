/* The fake libimp: frame source (see libimp_fake.c). */
#define _GNU_SOURCE
#include "libimp_fake.h"

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
    REQUIRE(fs_ok(c) && fs[c].created && !fs[c].enabled, "DestroyChn order");
    REQUIRE(find_bind(0, DEV_ID_FS, c, 0, 0) < 0, "DestroyChn while bound");
    REQUIRE(fs[c].outstanding == 0, "frames not released");
    munmap(fs[c].pool, fs[c].frame_size * fs[c].nslots);
    free(fs[c].slots);
    memset(&fs[c], 0, sizeof fs[c]);
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_FrameSource_EnableChn(int c)
{
    if (enter(__func__, "%d", c)) return -1;
    pthread_mutex_lock(&mu);
    REQUIRE(fs_ok(c) && fs[c].created && !fs[c].enabled, "EnableChn order");
    /* the channel's video buffers come out of rmem when it starts */
    uint32_t need = nv12_size(fs[c].attr.picWidth, fs[c].attr.picHeight) * fs[c].nslots;
    REQUIRE(rmem_take(__func__, need) == 0, "frame-source buffers above the rmem budget");
    fs[c].rmem = need;
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
        REQUIRE(!(enc[e].recv && enc[e].registered && fs_feeding(enc[e].grp) == c), "encoder still receiving");
    fs[c].enabled = 0;
    rmem_used -= fs[c].rmem;
    fs[c].rmem = 0;
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
    /* imp_framesource.h remark 6: "可以调用位置没有要求，但是只能使用一次" (any time, only once);
     * depth 0 (OpenIMP: frees the cached frames) is accepted whenever */
    REQUIRE(depth == 0 || fs[c].depth_calls == 0, "SetFrameDepth only once per channel");
    if (depth > 0) fs[c].depth_calls++;
    fs[c].depth = depth;
    pthread_mutex_unlock(&mu);
    return 0;
}

int IMP_FrameSource_GetFrame(int c, IMPFrameInfo **frame)
{
    /* not logged: called per frame */
    if (!fs_ok(c)) return violation(__func__, "bad channel");
    if (getenv("IMPFAKE_FRAME_TIMEOUT")) { sleep_us(GETFRAME_TIMEOUT_US); return -1; }  /* no frame */
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
