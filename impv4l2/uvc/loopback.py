"""The USB/IP loopback: the gadget's virtual UDC (usbip-vudc) attached back to this machine's
virtual host controller (vhci-hcd), so the kernel's uvcvideo sees it as a real USB webcam.

:class:`Loopback` loads only the modules that are not loaded yet (and unloads only those),
runs its own ``usbipd --device`` and detaches its own port; ``usbip`` is the Debian package.
dummy_hcd is no substitute: it has no isochronous transfers, which the UVC function needs.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

log = logging.getLogger("impv4l2.uvc")

UDC = "usbip-vudc.0"
GADGET_MODULES = ("libcomposite", "usb_f_uvc")
MODULES = (*GADGET_MODULES, "usbip_vudc", "vhci_hcd", "uvcvideo")
PORT_RE = re.compile(r"^Port (\d+):.*?(?=^Port |\Z)", re.M | re.S)


class LoopbackError(RuntimeError):
    """A module, the usbip tools or the attach failed."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode:
        raise LoopbackError(f"{' '.join(cmd)}: exit {p.returncode}: {(p.stderr or p.stdout).strip()}")
    return p


class Modules:
    """Kernel modules loaded on demand; :meth:`unload` removes only the ones this loaded."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load(self, names, required: bool = True) -> None:
        for m in names:
            if Path(f"/sys/module/{m}").exists():
                continue
            p = _run("modprobe", m, check=required)
            if p.returncode == 0:
                self.loaded.append(m)
            else:
                log.info("modprobe %s: %s (built in?)", m, p.stderr.strip())

    def unload(self) -> None:
        for m in reversed(self.loaded):
            p = _run("modprobe", "-r", m, check=False)
            if p.returncode:
                log.warning("modprobe -r %s: %s", m, p.stderr.strip())
        self.loaded.clear()


class Loopback:
    """Modules and usbipd for :data:`UDC`; :meth:`attach` after the gadget is bound; :meth:`close`."""

    def __init__(self, modules: Modules) -> None:
        self.modules = modules
        self.usbipd: subprocess.Popen | None = None
        self.port: str | None = None
        self.attached = False

    def load_modules(self) -> None:
        for tool in ("usbip", "usbipd"):
            if shutil.which(tool) is None:
                raise LoopbackError(f"{tool} not found: apt-get install usbip")
        self.modules.load(MODULES)
        deadline = time.monotonic() + 10
        while not Path(f"/sys/class/udc/{UDC}").exists():
            if time.monotonic() > deadline:
                raise LoopbackError(f"/sys/class/udc/{UDC} did not appear after modprobe usbip_vudc")
            time.sleep(0.05)

    def attach(self) -> None:
        """Export the bound gadget with our own usbipd and attach it on 127.0.0.1."""
        self.usbipd = subprocess.Popen(["usbipd", "--device"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while True:
            p = _run("usbip", "attach", "-r", "127.0.0.1", "-d", UDC, check=False)
            if p.returncode == 0:
                break
            if self.usbipd.poll() is not None:
                raise LoopbackError(f"usbipd --device exited: {self.usbipd.stderr.read().strip()}")
            if time.monotonic() > deadline:
                raise LoopbackError(f"usbip attach -r 127.0.0.1 -d {UDC}: {(p.stderr or p.stdout).strip()}")
            time.sleep(0.3)  # usbipd still starting
        self.attached = True
        self.port = self._find_port()
        log.info("%s attached on 127.0.0.1 (vhci port %s)", UDC, self.port)

    @staticmethod
    def _find_port() -> str | None:
        out = _run("usbip", "port", check=False).stdout
        return next((m.group(1) for m in PORT_RE.finditer(out) if UDC in m.group(0)), None)

    def detach(self) -> None:
        if self.attached and self.port is None:
            self.port = self._find_port()
        self.attached = False
        if self.port is not None:
            p = _run("usbip", "detach", "-p", str(int(self.port)), check=False)
            if p.returncode:
                log.warning("usbip detach -p %s: %s", self.port, p.stderr.strip())
            self.port = None

    def close(self) -> None:
        """Detach and stop our usbipd (the modules go with :meth:`Modules.unload`, after the gadget)."""
        self.detach()
        if self.usbipd is not None:
            self.usbipd.terminate()
            try:
                self.usbipd.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.usbipd.kill()
                self.usbipd.wait()
            self.usbipd = None
