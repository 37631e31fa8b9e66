"""A configfs USB gadget (libcomposite) with one UVC function, built from the node's formats.

Documentation/usb/gadget-uvc.rst and drivers/usb/gadget/function/uvc_configfs.c give the layout.
:class:`Gadget` records every directory and link it made and removes them in reverse order, so
configfs is left as it was.  Which node formats the gadget can carry is a table
(:data:`GADGET_FORMATS`): the UVC format kind in configfs and the fourcc the gadget's V4L2
output node accepts (Linux 6.1's uvc_v4l2.c knows YUYV and MJPEG only; H.264 needs the
``framebased`` format group, which 6.1's configfs does not have).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import subprocess
import time
from pathlib import Path

from .source import Format

log = logging.getLogger("impv4l2.uvc")

CONFIGFS = Path("/sys/kernel/config")
GADGETS = CONFIGFS / "usb_gadget"
UDC_CLASS = Path("/sys/class/udc")
STREAMING_MAXPACKET = 3072  # high-bandwidth isochronous: 3 x 1024 bytes per microframe


@dataclasses.dataclass(frozen=True)
class GadgetFormat:
    """How one node fourcc goes into the gadget: configfs group, its name, output-node fourcc."""

    group: str          # streaming/<group>/<name>
    name: str
    out_fourcc: str     # what S_FMT on the gadget's output node takes
    bits_per_pixel: int  # for buffer sizes (0: compressed, sized as 2 bytes per pixel)
    attrs: dict


GADGET_FORMATS: dict[str, GadgetFormat] = {
    "MJPG": GadgetFormat("mjpeg", "m", "MJPG", 0, {}),
    # guidFormat default of an uncompressed format is YUY2 with bBitsPerPixel 16
    "YUYV": GadgetFormat("uncompressed", "u", "YUYV", 16, {}),
}
# The order the host lists them (the host's first format is its default): MJPEG then YUYV.
PREFERENCE = ("MJPG", "YUYV")


class GadgetError(RuntimeError):
    """configfs, the UDC or the UVC function is missing or refused the configuration."""


@dataclasses.dataclass
class StreamFormat:
    """A format as the host sees it: its bFormatIndex and its frames by bFrameIndex (1-based)."""

    fourcc: str
    spec: GadgetFormat
    frames: list  # [FrameSize], index i is bFrameIndex i+1
    index: int = 0

    def frame_bytes(self, fi: int) -> int:
        f = self.frames[fi - 1]
        return f.width * f.height * (self.spec.bits_per_pixel or 16) // 8


def mount_configfs() -> bool:
    """Mount configfs where the kernel wants it if it is not mounted; True if this mounted it."""
    if GADGETS.is_dir():
        return False
    if not CONFIGFS.is_dir():
        raise GadgetError(f"no configfs ({CONFIGFS}): a kernel with CONFIG_CONFIGFS_FS and libcomposite is needed")
    r = subprocess.run(["mount", "-t", "configfs", "none", str(CONFIGFS)], capture_output=True, text=True)
    if r.returncode and not GADGETS.is_dir():
        raise GadgetError(f"mount -t configfs none {CONFIGFS}: {r.stderr.strip()}")
    if not GADGETS.is_dir():
        raise GadgetError(f"{GADGETS} missing after mounting configfs: modprobe libcomposite")
    return r.returncode == 0


def umount_configfs() -> None:
    r = subprocess.run(["umount", str(CONFIGFS)], capture_output=True, text=True)
    if r.returncode:
        log.warning("umount %s: %s", CONFIGFS, r.stderr.strip())


def udcs() -> list[str]:
    return sorted(os.listdir(UDC_CLASS)) if UDC_CLASS.is_dir() else []


def pick_udc(wanted: str | None) -> str:
    present = udcs()
    if wanted:
        if wanted not in present:
            raise GadgetError(f"UDC {wanted!r} not found (present: {', '.join(present) or 'none'}; "
                              "for the USB/IP loopback use --loopback)")
        return wanted
    if len(present) != 1:
        raise GadgetError(f"{'no UDC present' if not present else 'several UDCs: ' + ', '.join(present)}"
                          " — name one with --udc (dwc2 on the T31; --loopback for usbip-vudc)")
    return present[0]


def stream_formats(node_formats: list[Format]) -> list[StreamFormat]:
    by_fcc = {f.fourcc: f for f in node_formats}
    out = [StreamFormat(fcc, GADGET_FORMATS[fcc], list(by_fcc[fcc].sizes))
           for fcc in PREFERENCE if fcc in by_fcc and by_fcc[fcc].sizes]
    skipped = sorted(set(by_fcc) - set(GADGET_FORMATS))
    if skipped:
        log.info("node formats the gadget cannot carry on this kernel: %s", " ".join(skipped))
    if not out:
        raise GadgetError(f"the node offers none of {', '.join(GADGET_FORMATS)} "
                          f"(it has {', '.join(by_fcc) or 'nothing'})")
    return out


class Gadget:
    """The configfs gadget ``name``: :meth:`build` creates and binds it, :meth:`remove` undoes it."""

    def __init__(self, name: str, product: str, formats: list[StreamFormat], serial: str = "0") -> None:
        self.root = GADGETS / name
        self.product, self.serial = product, serial
        self.formats = formats
        self.made: list[Path] = []   # directories and symlinks, in creation order
        self.udc: str | None = None
        self.func = self.root / "functions" / "uvc.0"

    # ------------------------------------------------------------ building

    def _mkdir(self, p: Path) -> Path:
        p.mkdir()
        self.made.append(p)
        return p

    def _link(self, target: Path, link: Path) -> None:
        os.symlink(target, link)
        self.made.append(link)

    @staticmethod
    def _write(p: Path, value) -> None:
        try:
            p.write_text(f"{value}\n")
        except OSError as e:
            raise GadgetError(f"configfs: writing {value!r} to {p}: {e.strerror}") from None

    def build(self) -> None:
        if not GADGETS.is_dir():
            raise GadgetError(f"{GADGETS} missing: mount configfs (mount -t configfs none {CONFIGFS}) "
                              "and load libcomposite")
        if self.root.exists():
            raise GadgetError(f"gadget {self.root} exists (another `impv4l2 uvc` running?)")
        try:
            self._mkdir(self.root)
        except OSError as e:
            raise GadgetError(f"configfs: mkdir {self.root}: {e.strerror}") from None
        w = self._write
        for attr, v in (("idVendor", "0x1d6b"), ("idProduct", "0x0104"), ("bcdDevice", "0x0100"),
                        ("bcdUSB", "0x0200"), ("bDeviceClass", "0xef"), ("bDeviceSubClass", "0x02"),
                        ("bDeviceProtocol", "0x01")):
            w(self.root / attr, v)
        s = self._mkdir(self.root / "strings" / "0x409")
        w(s / "manufacturer", "impv4l2")
        w(s / "product", self.product)
        w(s / "serialnumber", self.serial)
        try:
            self._mkdir(self.func)
        except OSError as e:
            raise GadgetError(f"configfs: cannot create a UVC function ({e.strerror}): modprobe usb_f_uvc") from None
        self._control()
        self._streaming()
        w(self.func / "streaming_maxpacket", STREAMING_MAXPACKET)
        c = self._mkdir(self.root / "configs" / "c.1")
        w(c / "MaxPower", 500)
        cs = self._mkdir(c / "strings" / "0x409")
        w(cs / "configuration", "UVC")
        self._link(self.func, c / "uvc.0")

    def _control(self) -> None:
        ctl = self.func / "control"
        h = self._mkdir(ctl / "header" / "h")
        for speed in ("fs", "ss"):
            self._link(h, ctl / "class" / speed / "h")

    def _streaming(self) -> None:
        st = self.func / "streaming"
        if not (st / "framebased").exists():
            log.debug("this kernel's UVC configfs has no framebased formats (no H.264)")
        header = self._mkdir(st / "header" / "h")
        for f in self.formats:
            fdir = self._mkdir(st / f.spec.group / f.spec.name)
            for attr, v in f.spec.attrs.items():
                self._write(fdir / attr, v)
            for fs in f.frames:
                fr = self._mkdir(fdir / f"{fs.width}x{fs.height}")
                self._write(fr / "wWidth", fs.width)
                self._write(fr / "wHeight", fs.height)
                size = fs.width * fs.height * (f.spec.bits_per_pixel or 16) // 8
                self._write(fr / "dwMaxVideoFrameBufferSize", size)
                rate = size * 8 * 10_000_000 // fs.intervals[0]
                self._write(fr / "dwMinBitRate", rate // 5)
                self._write(fr / "dwMaxBitRate", rate)
                self._write(fr / "dwDefaultFrameInterval", fs.intervals[0])
                self._write(fr / "dwFrameInterval", "\n".join(map(str, fs.intervals)))
            self._link(fdir, header / f.spec.name)
        for speed in ("fs", "hs", "ss"):
            self._link(header, st / "class" / speed / "h")

    def bind(self, udc: str) -> None:
        self._write(self.root / "UDC", udc)
        self.udc = udc
        self._read_indices()

    def _read_indices(self) -> None:
        # bFormatIndex is assigned at bind in header-link order; frames keep their creation order
        # (configfs link_obj appends), which bFrameIndex confirms where the kernel exposes it.
        st = self.func / "streaming"
        for f in self.formats:
            fdir = st / f.spec.group / f.spec.name
            try:
                f.index = int((fdir / "bFormatIndex").read_text())
            except (OSError, ValueError):
                f.index = self.formats.index(f) + 1
            for i, fs in enumerate(f.frames, 1):
                p = fdir / f"{fs.width}x{fs.height}" / "bFrameIndex"
                if p.exists() and int(p.read_text()) != i:
                    raise GadgetError(f"{p} is {p.read_text().strip()}, expected {i}")
        self.formats.sort(key=lambda f: f.index)

    def unbind(self) -> None:
        if self.udc is not None:
            try:
                (self.root / "UDC").write_text("\n")
            except OSError as e:
                log.warning("unbinding %s: %s", self.udc, e)
            self.udc = None

    def remove(self) -> None:
        """Unbind and remove everything :meth:`build` made (reverse order)."""
        self.unbind()
        for p in reversed(self.made):
            try:
                p.unlink() if p.is_symlink() else p.rmdir()
            except OSError as e:
                log.warning("configfs cleanup %s: %s", p, e.strerror)
        self.made.clear()

    # ------------------------------------------------------------ the output node

    def output_node(self, timeout: float = 10.0) -> str:
        """/dev/videoN of the UVC function (registered at bind, under the UDC's parent device)."""
        if self.udc is None:
            raise GadgetError("gadget not bound")
        parent = os.path.realpath(UDC_CLASS / self.udc / "device")
        deadline = time.monotonic() + timeout
        while True:
            for d in sorted(glob.glob(f"{parent}/gadget*/video4linux/video*")):
                dev = f"/dev/{os.path.basename(d)}"
                if os.path.exists(dev):
                    return dev
            if time.monotonic() > deadline:
                raise GadgetError(f"no V4L2 output node of the UVC function under {parent}")
            time.sleep(0.05)
