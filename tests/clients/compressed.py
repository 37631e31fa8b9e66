"""A compressed-stream capture client in its own process: linuxpy's VideoCapture (MMAP).

    python tests/clients/compressed.py PATH FOURCC WIDTH HEIGHT FRAMES OUT

Writes the FRAMES buffers' bytes, in order, to OUT (an Annex-B elementary stream for H.264
and HEVC) and prints one line per frame: ``<sequence> <bytesused> <K|P|->`` (the buffer's
KEYFRAME/PFRAME flag).  For clients ffmpeg's v4l2 input cannot be (it has no HEVC).
"""

from __future__ import annotations

import sys

from linuxpy.video.device import BufferFlag, Device, VideoCapture


def main(path: str, fourcc: str, width: int, height: int, frames: int, out: str) -> None:
    with Device(path) as dev, open(out, "wb") as f:
        cap = VideoCapture(dev, size=4)
        cap.set_format(width, height, fourcc)
        with cap:
            for n, frame in enumerate(cap):
                f.write(frame.data)
                kind = "K" if frame.flags & BufferFlag.KEYFRAME else "P" if frame.flags & BufferFlag.PFRAME else "-"
                print(frame.frame_nb, len(frame.data), kind)
                if n + 1 == frames:
                    break


if __name__ == "__main__":
    p, cc, w, h, n, o = sys.argv[1:]
    main(p, cc, int(w), int(h), int(n), o)
