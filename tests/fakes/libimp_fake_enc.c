/* The fake libimp: encoder groups, channels and the stream ring (see libimp_fake.c). */
#define _GNU_SOURCE
#include "libimp_fake.h"

/* IMPEncoderProfile values every T31 SDK 1.1.x takes: (type << 24) | profile_idc */
#define PROFILE_HEVC_MAIN ((1 << 24) | 1)
static int profile_ok(int p)
{
    return p == ((0 << 24) | 66) || p == ((0 << 24) | 77) || p == ((0 << 24) | 100) ||
           p == PROFILE_HEVC_MAIN || p == PROFILE_JPEG;
}
static int is_hevc(int e) { return enc[e].attr.encAttr.eProfile == PROFILE_HEVC_MAIN; }

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
    REQUIRE(find_bind(1, DEV_ID_ENC, g, 0, 0) < 0, "group still bound");
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
    REQUIRE(profile_ok(a->encAttr.eProfile), "unknown IMPEncoderProfile");
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
    /* what the AVPU takes from rmem: the stream buffer (half a picture), for H.264 also a
     * reference and a reconstructed picture */
    int jpeg = a->encAttr.eProfile == PROFILE_JPEG;
    uint32_t pic = nv12_size(a->encAttr.uWidth, a->encAttr.uHeight);
    uint32_t need = pic / 3 + (jpeg ? 0 : 2 * pic);
    REQUIRE(rmem_take(__func__, need) == 0, "encoder buffers above the rmem budget");
    enc[e].rmem = need;
    uint32_t max_au = 5100;  /* the synthetic stream's largest AU (IDR with SPS and PPS) */
    if (file_data)
        for (int k = 0; k < file_naus; k++) {
            uint32_t au = 0;
            for (int m = file_au_start[k]; m < file_au_start[k + 1]; m++) au += file_nals[m].len + 4;
            if (max_au < au) max_au = au;
        }
    enc[e].attr = *a;
    enc[e].max_au = max_au;
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
    rmem_used -= enc[e].rmem;
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
    int in_group = 0;
    for (int k = 0; k < NR_ENC; k++) in_group += enc[k].registered && enc[k].grp == g;
    REQUIRE(in_group < NR_ENC_PER_GRP, "group has its 2 encoder channels");
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
    int c = enc[e].registered ? fs_feeding(enc[e].grp) : -1;
    return c >= 0 && fs[c].enabled ? c : -1;
}

/* Time the next picture of e is due, or -1 when nothing feeds it. */
static int64_t due_us(int e)
{
    int c = source_of(e);
    if (c < 0 || !enc[e].recv) return -1;
    int64_t t = enc[e].t_start > fs[c].t_enable ? enc[e].t_start : fs[c].t_enable;
    return t + (int64_t)enc[e].seq * fs_period_us(c);
}

/* The ring holds what the caller has not released: no room for the largest AU, no new AU
 * (the AVPU waits for the caller).  Called with mu held. */
static int stalled(int e)
{
    if (enc[e].held_bytes + enc[e].max_au <= enc[e].ring_size) return 0;
    if (!n_stalls++ || n_stalls % 100 == 0)
        logline("STALL %d: %u bytes held of a %u-byte ring", e, enc[e].held_bytes, enc[e].ring_size);
    return 1;
}

int IMP_Encoder_PollingStream(int e, uint32_t timeout_ms)
{
    if (!enc_ok(e)) return violation(__func__, "bad channel");
    int64_t deadline = now_us() + (int64_t)timeout_ms * 1000;
    if (getenv("IMPFAKE_POLL_TIMEOUT")) { sleep_us(deadline - now_us()); return -1; }
    pthread_mutex_lock(&mu);
    int64_t due = stalled(e) ? -1 : due_us(e);
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
    /* the union's member of the channel's codec, every release (1.1.1 .. 1.1.6) */
    int idr = is_hevc(e) ? type == 19 || type == 20 : type == 5;  /* IDR_W_RADL/IDR_N_LP, IDR */
    if (is_hevc(e)) pk->nalType.h265NalType = type;
    else pk->nalType.h264NalType = type;
    pk->sliceType = idr ? 2 : 1;  /* IMP_ENC_SLICE_I / _P; parameter sets get the P default */
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
    if (stalled(e)) { pthread_mutex_unlock(&mu); return -1; }
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
    } else if (file_data && file_naus && !is_hevc(e)) {  /* the file is H.264 */
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
        if (is_hevc(e) && idr) {  /* VPS, SPS, PPS, IDR_W_RADL: 2-byte NAL headers */
            uint8_t vps[6] = {0, 0, 0, 1, 32 << 1, 1}, sps[6] = {0, 0, 0, 1, 33 << 1, 1};
            uint8_t pps[6] = {0, 0, 0, 1, 34 << 1, 1}, irap[6] = {0, 0, 0, 1, 19 << 1, 1};
            add_pack(e, &packs[np++], 32, vps, 6, NULL, 20, fill, ts);
            add_pack(e, &packs[np++], 33, sps, 6, NULL, 30, fill, ts);
            add_pack(e, &packs[np++], 34, pps, 6, NULL, 4, fill, ts);
            add_pack(e, &packs[np++], 19, irap, 6, NULL, 2000 + (n * 37) % 3000, fill, ts);
        } else if (is_hevc(e)) {  /* TRAIL_R */
            uint8_t trail[6] = {0, 0, 0, 1, 1 << 1, 1};
            add_pack(e, &packs[np++], 1, trail, 6, NULL, 200 + (n * 53) % 1500, fill, ts);
        } else if (idr) {
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
    enc[e].out_bytes[slot] = au_bytes;
    enc[e].held_bytes += au_bytes;
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
    enc[e].held_bytes -= enc[e].out_bytes[slot];
    free(st->pack);
    enc[e].outstanding--;
    pthread_mutex_unlock(&mu);
    return 0;
}
