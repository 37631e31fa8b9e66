"""Desktop visibility without CUSE (issue 11 item 2): `impv4l2 serve` on a host with FUSE but
no /dev/cuse links every node as /dev/videoN -> its FUSE file, and desktop clients find them
by scanning /dev: ffmpeg (capture, and h264_v4l2m2m finding the encoder) and
headless Chromium's getUserMedia. (v4l2-ctl and v4l2-compliance want a character device
with a sysfs entry, i.e. the CUSE node: not the case here.)

Each daemon runs in a private mount namespace whose /dev is a tmpfs holding only the few
device nodes the clients need: the daemon writes into a real /dev exactly as users run it,
while this shared host's own /dev (and other test runs' links in it) stays out of reach.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from support.paths import CLIENTS, ROOT

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("nsenter") is None,
                       reason="needs unshare and nsenter (util-linux)"),
]
IMPV4L2 = [sys.executable, "-m", "impv4l2.cli"]
SERVING = re.compile(r"serving (.*) with backend")
NODE = re.compile(r"(video\d+) \((\w+)\)")
# V4L2_CAP_*: what a capture node must not claim (Chromium skips a device with VIDEO_OUTPUT).
CAP_VIDEO_CAPTURE, CAP_DEVICE_CAPS = 0x1, 0x80000000
CAP_NOT_CAPTURE = {"VIDEO_OUTPUT": 0x2, "VIDEO_CAPTURE_MPLANE": 0x1000, "VIDEO_OUTPUT_MPLANE": 0x2000,
                   "VIDEO_M2M_MPLANE": 0x4000, "VIDEO_M2M": 0x8000, "VIDEO_OVERLAY": 0x4}

# Run in the new namespace: a tmpfs over /dev with the nodes bind-mounted from the real one.


class DevNamespace:
    """A mount namespace with a private /dev; commands run in it through nsenter."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", str(CLIENTS / "private_dev.sh")],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            self.holder.kill()
            pytest.skip(f"cannot make a private /dev: {self.holder.stderr.read().strip()}")

    def argv(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--", *argv]

    def run(self, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        return subprocess.run(self.argv(argv), timeout=timeout, text=kw.pop("text", True), **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), **kw)  # nsenter execs: the pid is the program's

    def dev(self) -> dict[str, str]:
        """The namespace's /dev/video* entries: name -> link target ('' for a non-link)."""
        out = self.run(["sh", "-c", 'for f in /dev/video*; do [ -L "$f" ] && echo "$f $(readlink "$f")" '
                        '|| { [ -e "$f" ] && echo "$f"; }; done; true'], check=True).stdout
        return {p[0].removeprefix("/dev/"): (p[1] if len(p) > 1 else "")
                for p in (line.split(" ", 1) for line in out.splitlines())}

    def close(self) -> None:
        self.holder.kill()  # the last process in it: the namespace and its mounts go
        self.holder.wait(10)


@pytest.fixture
def ns():
    space = DevNamespace()
    yield space
    space.close()


class Serve:
    """`impv4l2 serve --config FILE` in the namespace, as users start it: transport.cuse is
    "auto" and the private /dev has no cuse (nor has this host)."""

    def __init__(self, ns: DevNamespace, tmp: Path, extra: str = ""):
        self.ns, self.mount, self.log = ns, tmp / "mnt", tmp / "daemon.log"
        self.cfg = tmp / "impv4l2.toml"
        self.cfg.write_text(textwrap.dedent(f"""
            [main]
            width = 1280
            height = 720
            [transport]
            mount = "{self.mount}"
        """) + extra)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> dict[str, str]:
        """Start and wait until serving; returns role -> videoN."""
        with open(self.log, "ab") as out:
            self.proc = self.ns.popen([*IMPV4L2, "--config", str(self.cfg), "serve"], stdout=out,
                                      stderr=subprocess.STDOUT, cwd=ROOT)
        self.starts += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = SERVING.findall(self.log.read_text())
            if len(found) >= self.starts:
                return {role: name for name, role in NODE.findall(found[self.starts - 1])}
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        pytest.fail("daemon not serving:\n" + self.log.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(20)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def serve(ns, tmp_path):
    s = Serve(ns, tmp_path)
    yield s
    s.kill()




def querycap(ns: DevNamespace, path: str) -> dict:
    """QUERYCAP of ``path`` (v4l2-ctl refuses a node that is no character device: it looks
    for it in /sys/dev/char; ffmpeg and Chromium only open and ask)."""
    return json.loads(ns.run([sys.executable, str(CLIENTS / "querycap.py"), path], check=True).stdout)


def test_every_node_linked_and_usable_through_dev(ns, serve, tmp_path):
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs ffmpeg")
    names = serve.start()
    assert set(names) == {"main", "sub", "encoder"}, names
    assert "CUSE" not in serve.log.read_text()  # the case under test: FUSE only
    links = ns.dev()
    assert links == {n: f"{serve.mount}/{n}" for n in names.values()}, links
    for role in ("main", "sub"):
        cap = querycap(ns, f"/dev/{names[role]}")
        assert cap["card"] == f"impv4l2 {role} (sim)"
        for field in ("capabilities", "device_caps"):  # capture only: Chromium skips OUTPUT
            assert cap[field] & CAP_VIDEO_CAPTURE, (role, field, hex(cap[field]))
            assert not [k for k, bit in CAP_NOT_CAPTURE.items() if cap[field] & bit], (role, field, hex(cap[field]))
        assert cap["capabilities"] == cap["device_caps"] | CAP_DEVICE_CAPS
    enc = querycap(ns, f"/dev/{names['encoder']}")
    assert not enc["capabilities"] & CAP_VIDEO_CAPTURE  # a desktop camera list skips it
    # Capture through the links (MMAP streaming on the FUSE file behind them).
    for role, size in (("main", "1280x720"), ("sub", "640x360")):
        out = tmp_path / f"{role}.nut"
        r = ns.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "v4l2", "-input_format", "yuyv422",
                    "-video_size", size, "-i", f"/dev/{names[role]}", "-frames:v", "10", "-c:v", "rawvideo",
                    str(out)], timeout=60)
        assert r.returncode == 0, r.stderr
        assert out.stat().st_size > 10 * 2 * 640 * 360
    # h264_v4l2m2m finds the encoder only by scanning /dev/video*.
    out = tmp_path / "enc.mp4"
    r = ns.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25",
                "-frames:v", "10", "-pix_fmt", "nv12", "-c:v", "h264_v4l2m2m", str(out)], timeout=60)
    assert r.returncode == 0, r.stderr
    frames = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                             "stream=nb_read_frames", "-of", "csv=p=0", str(out)], capture_output=True, text=True,
                            timeout=60).stdout.strip()
    assert frames == "10", frames
    assert serve.stop() == 0, serve.log.read_text()
    assert ns.dev() == {}, "SIGTERM removes every link"


def test_kill9_restart_same_numbers_and_foreign_links_left(ns, serve):
    # Another program's entries at videoN names: a link to elsewhere at the first number the
    # daemon would take, and a link shaped like ours but into another mount.
    foreign = {"video10": "/elsewhere/video10", "video13": "/run/other-mount/video13"}
    for name, target in foreign.items():
        ns.run(["ln", "-s", target, f"/dev/{name}"], check=True)
    names = serve.start()
    assert names == {"main": "video11", "sub": "video12", "encoder": "video14"}, names  # 10 and 13 skipped
    ours = {n: f"{serve.mount}/{n}" for n in names.values()}
    assert ns.dev() == {**foreign, **ours}
    serve.stop(signal.SIGKILL)
    assert ns.dev() == {**foreign, **ours}, "kill -9 leaves the links behind"
    assert serve.start() == names, "the same numbers after kill -9"
    log = serve.log.read_text()
    assert sorted(re.findall(r"(/dev/video\d+): removed stale link", log)) == sorted(f"/dev/{n}" for n in ours)
    assert ns.dev() == {**foreign, **ours}
    assert querycap(ns, f"/dev/{names['sub']}")["card"] == "impv4l2 sub (sim)"  # served by the new run
    assert serve.stop() == 0, serve.log.read_text()
    assert ns.dev() == foreign, "exit removes ours only"
    assert serve.start() == names, "and a clean restart keeps them too"
    assert serve.stop() == 0


def test_configured_name_held_by_another_program(ns, tmp_path):
    """nodes.sub names a /dev entry another program holds: it stays, the node is served on
    its FUSE file only (with a warning), the others are linked."""
    ns.run(["ln", "-s", "/elsewhere/video20", "/dev/video20"], check=True)
    s = Serve(ns, tmp_path, extra='[nodes]\nsub = "video20"\n')
    try:
        names = s.start()
        assert names["sub"] == "video20"
        assert ns.dev() == {"video20": "/elsewhere/video20",
                            **{n: f"{s.mount}/{n}" for r, n in names.items() if r != "sub"}}
        assert "cannot create /dev/video20" in s.log.read_text()
        assert querycap(ns, f"{s.mount}/video20")["card"] == "impv4l2 sub (sim)"
        assert s.stop() == 0
        assert ns.dev() == {"video20": "/elsewhere/video20"}
    finally:
        s.kill()


def test_dev_links_off(ns, tmp_path):
    s = Serve(ns, tmp_path, extra="dev_links = false\n")
    try:
        assert set(s.start()) == {"main", "sub", "encoder"}
        assert ns.dev() == {}
        assert s.stop() == 0
    finally:
        s.kill()


# ------------------------------------------------------------ Chromium

PAGE = """<!doctype html><meta charset="utf-8"><title>impv4l2 desktop</title><script>
const SECONDS = %(seconds)s;
function frames(track) {  // requestVideoFrameCallback frames over SECONDS, and the size seen
  return new Promise(resolve => {
    const v = document.createElement("video");
    v.muted = true; v.srcObject = new MediaStream([track]); document.body.appendChild(v);
    let n = 0, t0 = 0, w = 0, h = 0;
    const cb = (now, meta) => {
      if (!t0) t0 = now; else n++;
      w = meta.width; h = meta.height;
      if (now - t0 < SECONDS * 1000) v.requestVideoFrameCallback(cb);
      else resolve({frames: n, seconds: (now - t0) / 1000, width: w, height: h});
    };
    v.requestVideoFrameCallback(cb);
    v.play();
  });
}
async function main() {
  const out = {cameras: [], errors: []};
  try {
    // Labels are listed only once a permission was granted: one getUserMedia first.
    (await navigator.mediaDevices.getUserMedia({video: true})).getTracks().forEach(t => t.stop());
    const devices = (await navigator.mediaDevices.enumerateDevices()).filter(d => d.kind == "videoinput");
    for (const d of devices) {
      const cam = {label: d.label};
      try {
        const s = await navigator.mediaDevices.getUserMedia({video: {deviceId: {exact: d.deviceId},
          width: {ideal: 1280}, height: {ideal: 720}, frameRate: {ideal: 25}}});
        const track = s.getVideoTracks()[0];
        cam.settings = track.getSettings();
        Object.assign(cam, await frames(track));
        s.getTracks().forEach(t => t.stop());
      } catch (e) { cam.error = String(e); }
      out.cameras.push(cam);
    }
  } catch (e) { out.errors.push(String(e)); }
  await fetch("/result", {method: "POST", body: JSON.stringify(out)});
}
main();
</script><body></body>
"""


class _Page(http.server.BaseHTTPRequestHandler):
    """GET / is the page; POST /result hands the page's JSON to the test."""

    page = b""
    results: list = []

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.page)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()
        self.results.append(json.loads(body))

    def log_message(self, *args):
        pass


CHROMIUM_SECONDS = 3
# Issue 11's goal is 20 fps of the 25 the sim sends; measured 21-25 on the 2-core VM at load 5
# and 12.3 at load 7 (the sim renders in Python, and CI runs the MIPS guest beside), so the
# test asserts a floor that a stall or a trickle fails; the goal is measured, not timed
# (IMPV4L2_DESKTOP_FPS_FLOOR).
FPS_FLOOR = float(os.environ.get("IMPV4L2_DESKTOP_FPS_FLOOR", "8"))
SIZES = {"main": (1280, 720), "sub": (640, 360)}  # the channels' own sizes, asked as ideal


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (scripts/apt-test.txt)")
def test_chromium_getusermedia_finds_both_cameras(ns, serve, tmp_path):
    names = serve.start()
    handler = type("Page", (_Page,), {"page": (PAGE % {"seconds": CHROMIUM_SECONDS}).encode(), "results": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    chrome_log = tmp_path / "chromium.log"
    chrome = ns.popen(["chromium", "--headless=new", "--no-sandbox", "--use-fake-ui-for-media-stream",
                       "--enable-logging=stderr", "--disable-gpu", "--no-first-run", "--mute-audio",
                       f"--user-data-dir={tmp_path / 'profile'}", f"http://127.0.0.1:{httpd.server_port}/"],
                      stdout=subprocess.DEVNULL, stderr=chrome_log.open("wb"), start_new_session=True)
    try:
        deadline = time.monotonic() + 45
        while not handler.results and time.monotonic() < deadline:
            assert chrome.poll() is None, chrome_log.read_text()[-3000:]
            time.sleep(0.2)
        assert handler.results, "the page reported nothing in 45 s:\n" + chrome_log.read_text()[-3000:]
    finally:
        if chrome.poll() is None:
            os.killpg(chrome.pid, signal.SIGKILL)
        chrome.wait(10)
        httpd.shutdown()
    res = handler.results[0]
    print("chromium:", json.dumps(res))
    assert not res["errors"], res
    cams = {c["label"]: c for c in res["cameras"]}
    # The encoder (M2M, no VIDEO_CAPTURE) is not a camera; main and sub are, by card name.
    assert set(cams) == {"impv4l2 main (sim)", "impv4l2 sub (sim)"}, res
    for role in ("main", "sub"):
        cam = cams[f"impv4l2 {role} (sim)"]
        assert "error" not in cam, cam
        fps = cam["frames"] / cam["seconds"]
        print(f"chromium {role} ({names[role]}): {cam['width']}x{cam['height']} {fps:.1f} fps")
        assert (cam["width"], cam["height"]) == SIZES[role], cam
        assert fps >= FPS_FLOOR, cam
    assert serve.stop() == 0, serve.log.read_text()
