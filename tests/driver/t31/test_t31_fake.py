"""The fake libimp as strict as the vendor's (issue 10, item 4), and the t31 backend passing it:
SetFrameDepth once, GetFrame's 2 s, the rmem budget, the stream ring stall, the bind graph,
the system teardown order, key frames from the packs' nalType union."""

from __future__ import annotations

import ctypes

import pytest

from support import t31_fake  # noqa: E402
from support.t31_fake import Sink, split_nals  # noqa: E402

from impv4l2.driver.base import Codec, EncoderParams  # noqa: E402
from impv4l2.driver.t31 import structs  # noqa: E402
from impv4l2.driver.t31.libimp import T31Error  # noqa: E402

make_fake, fake = t31_fake.make_fake, t31_fake.fake  # the fixtures


def test_set_frame_depth_once_per_channel(fake):
    """imp_framesource.h: SetFrameDepth "只能使用一次" (once).  A raw capture restarted while an
    encoder keeps the FrameSource channel keeps the depth set the first time."""
    be = fake.backend()
    ch = be.channels[0]
    coded = Sink(1 << 20)
    ch.start_encoded(EncoderParams(width=320, height=240, fps_num=60), coded)
    for _ in range(2):
        raw = Sink(320 * 240 * 3 // 2)
        ch.start(raw)
        assert not raw.wait(2)[0][1].error
        ch.stop_raw()
    depths = [ln for ln in fake.lines() if ln.startswith("IMP_FrameSource_SetFrameDepth")]
    assert depths == ["IMP_FrameSource_SetFrameDepth 0 1"], depths
    assert fake.errors() == 0
    # the fake refuses a second depth on the channel, as the vendor's documents
    assert fake.so.IMP_FrameSource_SetFrameDepth(0, 1) == -1 and fake.errors() == 1
    assert fake.so.IMP_FrameSource_SetFrameDepth(0, 0) == 0  # depth 0 frees, always accepted
    be.close()
    # a new FrameSource channel takes a depth again
    be = fake.backend()
    be.channels[0].start(Sink(320 * 240 * 3 // 2))
    be.close()
    assert fake.errors() == 1 and fake.open_resources() == 0


def test_rmem_budget_takes_main_and_sub_as_the_camera_runs_them(fake):
    """The default budget (a T31X) holds main 1920x1080 and sub 640x360, each NV12, H.264
    and JPEG, as tests/mips/guest.py and a camera run them; a second 1080p H.264 does not."""
    be = fake.backend(channels=[(1920, 1080, 30), (640, 360, 30)])
    main, sub = be.channels
    sinks = []
    for ch, (w, h) in ((main, (1920, 1080)), (sub, (640, 360))):
        for codec in (Codec.H264, Codec.JPEG):
            sinks.append(Sink(1 << 20))
            ch.start_encoded(EncoderParams(codec=codec, width=w, height=h, fps_num=30), sinks[-1])
        sinks.append(Sink(w * h * 3 // 2, nbufs=2))
        ch.start(sinks[-1])
    for sink in sinks:
        assert not sink.wait(2)[-1][1].error
    used = fake.so.impfake_rmem_used()
    assert fake.errors() == 0
    be.close()
    assert fake.so.impfake_rmem_used() == 0 and fake.open_resources() == 0
    print(f"\nrmem for main 1080p + sub 360p, NV12 + H.264 + JPEG each: {used / 2**20:.1f} MiB")

    be = fake.backend(channels=[(1920, 1080, 30), (1920, 1080, 30)])
    be.channels[0].start_encoded(EncoderParams(width=1920, height=1080, fps_num=30), Sink(1 << 20))
    with pytest.raises(T31Error, match="IMP_Encoder_CreateChn|IMP_FrameSource_EnableChn"):
        be.channels[1].start_encoded(EncoderParams(width=1920, height=1080, fps_num=30), Sink(1 << 20))
    assert "RMEM" in fake.log.read_text()
    be.close()
    assert fake.open_resources() == 0 and fake.so.impfake_rmem_used() == 0


@pytest.mark.parametrize("budget,fails_at", [(4 << 20, "IMP_FrameSource_EnableChn"),
                                             (6 << 20, "IMP_Encoder_CreateChn")])
def test_rmem_too_small_fails_at_create_or_enable_and_unwinds(fake, monkeypatch, budget, fails_at):
    monkeypatch.setenv("IMPFAKE_RMEM", str(budget))
    be = fake.backend(channels=[(1920, 1080, 30), (640, 360, 30)])
    params = EncoderParams(width=1920, height=1080, fps_num=30)
    if fails_at == "IMP_FrameSource_EnableChn":
        with pytest.raises(T31Error, match=fails_at):
            be.channels[0].start(Sink(1920 * 1080 * 3 // 2))
    else:
        with pytest.raises(T31Error, match=fails_at):
            be.channels[0].start_encoded(params, Sink(1 << 20))
    assert fake.open_resources() == 5  # the system only: the channel unwound
    sink = Sink(1 << 20)
    be.channels[1].start_encoded(EncoderParams(width=640, height=360, fps_num=30), sink)  # small fits
    sink.wait(2)
    be.close()
    assert fake.open_resources() == 0 and fake.so.impfake_rmem_used() == 0


def test_stream_ring_stalls_while_packs_are_held(fake, monkeypatch):
    """The AVPU writes no new AU over packs the caller holds: PollingStream times out.  The
    backend releases every AU right after its copy, so it never stalls; one that holds them
    gets error buffers (not a hang), and the stream resumes once they are released."""
    monkeypatch.setenv("IMPFAKE_RING_SIZE", "8192")
    be = fake.backend(poll_timeout_ms=100)
    sink = Sink(1 << 16)
    sc = be.channels[0].start_encoded(EncoderParams(width=320, height=240, fps_num=60), sink)
    sink.wait(30)
    assert fake.so.impfake_stalls() == 0
    held, release = [], be.lib.IMP_Encoder_ReleaseStream
    sc.lib.IMP_Encoder_ReleaseStream = lambda chn, ref: held.append(
        structs.native.IMPEncoderStream.from_buffer_copy(ref._obj)) or 0
    try:
        n = len(sink.frames)
        with sink.cond:
            assert sink.cond.wait_for(lambda: any(i.error for _, i in sink.frames[n:]), 10)
        assert fake.so.impfake_stalls() > 0 and len(held) >= 1
    finally:
        sc.lib.IMP_Encoder_ReleaseStream = release
    for s in held:
        assert release(sc.enc_chn, ctypes.byref(s)) == 0
    n = len(sink.frames)
    with sink.cond:
        assert sink.cond.wait_for(lambda: any(not i.error for _, i in sink.frames[n:]), 10)
    be.close()
    assert (fake.outstanding_streams(), fake.open_resources(), fake.errors()) == (0, 0, 0)


def test_binds_as_the_sdk_graph_allows(fake):
    """FS->ENC (the backend's), FS->OSD->ENC and FS output 1 -> IVS are accepted; anything else
    (wrong direction, unknown device, a bad output, a second bind of one output) refused."""
    be = fake.backend()
    sink = Sink(1 << 20)
    be.channels[0].start_encoded(EncoderParams(width=320, height=240, fps_num=60), sink)
    sink.wait(2)
    S, so = structs.native, fake.so
    attr = S.IMPFSChnAttr(picWidth=320, picHeight=240, pixFmt=structs.PIX_FMT_NV12, outFrmRateNum=30,
                          outFrmRateDen=1, nrVBs=2, type=1)
    assert so.IMP_FrameSource_CreateChn(2, ctypes.byref(attr)) == 0
    for call in ("IMP_Encoder_CreateGroup", "IMP_OSD_CreateGroup", "IMP_IVS_CreateGroup"):
        assert getattr(so, call)(2 if call == "IMP_Encoder_CreateGroup" else 0) == 0, call

    def bind(src, dst, unbind=False):
        a, b = S.IMPCell(*src), S.IMPCell(*dst)
        fn = so.IMP_System_UnBind if unbind else so.IMP_System_Bind
        return fn(ctypes.byref(a), ctypes.byref(b))

    FS, ENC, DEC, IVS, OSD = range(5)
    good = [((FS, 2, 0), (OSD, 0, 0)), ((OSD, 0, 0), (ENC, 2, 0)), ((FS, 2, 1), (IVS, 0, 0))]
    bad = [((ENC, 2, 0), (FS, 2, 0)),   # backwards
           ((FS, 2, 0), (DEC, 0, 0)),   # no decoder in the graph
           ((FS, 2, 2), (IVS, 0, 0)),   # a frame source has outputs 0 and 1
           ((FS, 2, 0), (ENC, 2, 0)),   # output 0 already feeds the OSD
           ((FS, 1, 0), (ENC, 1, 0)),   # channel 1 not created
           ((FS, 0, 0), (ENC, 0, 0))]   # the backend's bind, made twice
    assert [bind(*b) for b in good] == [0, 0, 0]
    assert [bind(*b) for b in bad] == [-1] * len(bad)
    assert fake.errors() == len(bad)
    assert [bind(*b, unbind=True) for b in reversed(good)] == [0, 0, 0]
    for call in ("IMP_Encoder_DestroyGroup", "IMP_OSD_DestroyGroup", "IMP_IVS_DestroyGroup"):
        assert getattr(so, call)(2 if call == "IMP_Encoder_DestroyGroup" else 0) == 0, call
    assert so.IMP_FrameSource_DestroyChn(2) == 0
    be.close()
    assert fake.open_resources() == 0 and fake.errors() == len(bad)


@pytest.mark.parametrize("order,ok", [
    (("IMP_System_Exit", "IMP_ISP_DisableSensor", "IMP_ISP_DelSensor", "IMP_ISP_DisableTuning",
      "IMP_ISP_Close"), True),   # sample-common.c sample_system_exit (the backend's)
    (("IMP_ISP_DisableTuning", "IMP_System_Exit", "IMP_ISP_DisableSensor", "IMP_ISP_DelSensor",
      "IMP_ISP_Close"), True),   # imp_isp.h @attention: tuning off first
    (("IMP_ISP_Close", "IMP_System_Exit", "IMP_ISP_DisableSensor", "IMP_ISP_DelSensor",
      "IMP_ISP_DisableTuning"), False),
])
def test_system_teardown_order_is_one_table_entry(fake, monkeypatch, order, ok):
    from impv4l2.driver.t31 import sequence
    if ok and order[0] == "IMP_System_Exit":
        assert sequence.SYSTEM_TEARDOWN == order  # the backend follows the sample
    monkeypatch.setattr(sequence, "SYSTEM_TEARDOWN", order)
    be = fake.backend()
    be.channels[0].start(Sink(320 * 240 * 3 // 2))
    be.close()
    assert fake.calls()[-5:] == list(order)
    assert (fake.errors() == 0) is ok


@pytest.mark.parametrize("version", ["IMP-1.1.1", "IMP-1.1.6"])
def test_keyframes_from_the_packs_nal_type_union(fake, monkeypatch, version):
    """Key frames come from each pack's nalType.h264NalType (and agree with sliceType)."""
    monkeypatch.setenv("IMPFAKE_VERSION", version)
    be = fake.backend()
    sink = Sink(1 << 20)
    be.channels[0].start_encoded(EncoderParams(width=320, height=240, fps_num=60, gop=4), sink)
    frames = sink.wait(12)
    be.close()
    for data, info in frames[:12]:
        types = [n[0] & 0x1F for n in split_nals(data)]
        assert info.keyframe == (5 in types), (info.sequence, types)
    assert [info.keyframe for _, info in frames[:12]] == [i % 4 == 0 for i in range(12)]
    assert fake.errors() == 0
