"""VIDIOC_QUERYCAP of argv[1] as JSON (driver, card, capabilities, device_caps): what ffmpeg and
Chromium ask of a /dev/videoN, which need not be a character device (tests/test_desktop.py)."""
import fcntl, json, struct, sys
buf = bytearray(104)  # struct v4l2_capability
with open(sys.argv[1], "rb", buffering=0) as f:
    fcntl.ioctl(f, 0x80685600, buf)  # VIDIOC_QUERYCAP
driver, card, bus, version, caps, dcaps = struct.unpack_from("16s32s32sIII", buf)
print(json.dumps({"driver": driver.rstrip(b"\0").decode(), "card": card.rstrip(b"\0").decode(),
                  "capabilities": caps, "device_caps": dcaps}))
