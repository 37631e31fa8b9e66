"""``impv4l2 uvc``: the gadget's lifetime and its event loop.

Order matters: the UVC function only connects to the bus once an application subscribes to
UVC_EVENT_SETUP on its output node, so the loop subscribes before the loopback attaches.  One
thread polls the gadget node (POLLPRI: UVC events; POLLOUT: sent buffers) and the camera node
(POLLIN: a frame).  Everything made is undone in ``finally`` (SIGTERM/SIGINT end the loop).
"""

from __future__ import annotations

import ctypes
import faulthandler
import fcntl
import logging
import os
import select
import signal
import threading

from linuxpy.video import raw

from ..v4l2 import abi as v4l2abi
from . import abi
from .controls import ControlMap
from .gadget import (STREAMING_MAXPACKET, Gadget, GadgetError, mount_configfs, pick_udc, stream_formats,
                     umount_configfs)
from .loopback import GADGET_MODULES, UDC as LOOPBACK_UDC, Loopback, LoopbackError, Modules
from .protocol import Protocol
from .pump import Pump
from .source import NodeError, SourceNode

log = logging.getLogger("impv4l2.uvc")


def resolve_node(node: str, mount: str) -> str:
    """``main``/``sub`` (a role of the running daemon, found under ``mount``) or a path."""
    if os.sep in node:
        return node
    from ..cli import list_nodes

    for n in list_nodes(mount):
        if n["role"] == node:
            return n["paths"]["fuse"]
    raise NodeError(0, f"no {node!r} node under {mount} (is `impv4l2 serve` running?)")


class UvcApp:
    """The UVC gadget for one camera node, alive between :meth:`run`'s start and return."""

    def __init__(self, node_path: str, udc: str | None, loopback: bool, gadget_name: str = "impv4l2") -> None:
        self.node_path, self.udc_wanted, self.use_loopback = node_path, udc, loopback
        self.gadget_name = gadget_name
        self.stop_requested = False
        self.failed = False
        self.pump: Pump | None = None
        self.fd = -1

    def _event_ioctl(self, name: str, st) -> None:
        fcntl.ioctl(self.fd, v4l2abi.VIDIOC[name], st)

    def run(self) -> int:
        node = gadget = loop = None
        modules, mounted = Modules(), False
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            node = SourceNode(self.node_path)
            formats = stream_formats(node.formats())
            if self.use_loopback:
                loop = Loopback(modules)
                loop.load_modules()
            else:
                modules.load(GADGET_MODULES, required=False)
            mounted = mount_configfs()
            udc = pick_udc(self.udc_wanted or (LOOPBACK_UDC if self.use_loopback else None))
            gadget = Gadget(self.gadget_name, node.card, formats)
            gadget.build()
            gadget.bind(udc)
            dev = gadget.output_node()
            self.fd = os.open(dev, os.O_RDWR | os.O_NONBLOCK)
            for t in abi.EVENTS:
                self._event_ioctl("SUBSCRIBE_EVENT", raw.v4l2_event_subscription(type=t))
            controls = ControlMap(node, gadget.func)
            self.proto = Protocol(gadget.formats, controls, STREAMING_MAXPACKET)
            self.node = node
            log.info("gadget %s on %s, output node %s, formats %s", node.card, udc, dev,
                     ", ".join(f"{f.index}:{f.fourcc}({len(f.frames)} sizes)" for f in gadget.formats))
            if loop is not None:  # attach while the loop answers: uvcvideo probes at once
                attach = threading.Thread(target=self._attach, args=(loop,), name="usbip-attach", daemon=True)
                attach.start()
            self._loop()
            return 1 if self.failed else 0
        except (GadgetError, LoopbackError, NodeError) as e:
            log.error("%s", e)
            return 1
        except OSError as e:
            log.error("%s", e, exc_info=log.isEnabledFor(logging.DEBUG))
            return 1
        finally:
            self._stop_stream()
            if loop is not None:
                loop.detach()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if gadget is not None:
                gadget.remove()
            if loop is not None:
                loop.close()
            if mounted:
                umount_configfs()
            modules.unload()
            if node is not None:
                node.close()
            for s, h in old.items():
                signal.signal(s, h)
            log.info("gadget removed")

    def _attach(self, loop: Loopback) -> None:
        try:
            loop.attach()
        except LoopbackError as e:
            log.error("%s", e)
            self.failed = True
            self.stop_requested = True

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLPRI | select.POLLOUT)
        node_fd = self.node.fd
        registered = False
        while not self.stop_requested:
            want = self.pump is not None
            if want != registered:
                (poller.register(node_fd, select.POLLIN) if want else poller.unregister(node_fd))
                registered = want
            try:
                ready = poller.poll(500)
            except InterruptedError:
                continue
            for fd, ev in ready:
                if fd == self.fd:
                    if ev & select.POLLPRI:
                        self._events()
                    if ev & select.POLLOUT and self.pump is not None:
                        self.pump.gadget_ready()
                elif fd == node_fd and self.pump is not None:
                    self.pump.node_ready()

    def _events(self) -> None:
        batch = []
        while True:
            ev = raw.v4l2_event()
            try:
                self._event_ioctl("DQEVENT", ev)
            except OSError:
                break
            batch.append((ev.type, ctypes.string_at(ctypes.addressof(ev.u), 64)))  # char[] in linuxpy: NUL-cut
        for i, (type_, data) in enumerate(batch):
            # A SETUP followed by another is stale: the host gave up on it (5 s timeout) and moved on.
            # Answering it anyway leaves a request on ep0 that no transfer consumes; the next
            # answer then queues the same request twice (list corruption in usbip-vudc, 6.1).
            if type_ == abi.EVENT_SETUP and any(t == abi.EVENT_SETUP for t, _ in batch[i + 1:]):
                log.warning("stale SETUP (the host timed out) not answered")
                continue
            try:
                self._event(type_, data)
            except (OSError, ValueError) as e:  # one bad request must not end the gadget
                log.warning("handling %s: %s", abi.EVENT_NAMES.get(type_, hex(type_)), e,
                            exc_info=log.isEnabledFor(logging.DEBUG))

    def _event(self, type_: int, data: bytes) -> None:
        name = abi.EVENT_NAMES.get(type_, hex(type_))
        if type_ == abi.EVENT_SETUP:
            req = abi.UsbCtrlRequest.from_buffer_copy(data[:ctypes.sizeof(abi.UsbCtrlRequest)])
            self._respond(self.proto.setup(req))
        elif type_ == abi.EVENT_DATA:
            # the status stage is the UDC's; a refused value shows in bRequestErrorCode only
            rd = abi.UvcRequestData.from_buffer_copy(data)
            self.proto.data(bytes(rd.data[:max(rd.length, 0)]))
        elif type_ == abi.EVENT_STREAMON:
            log.info("%s", name)
            self._start_stream()
        elif type_ in (abi.EVENT_STREAMOFF, abi.EVENT_DISCONNECT):
            log.info("%s", name)
            self._stop_stream()
        else:
            log.info("%s", name)

    def _respond(self, resp) -> None:
        rd = abi.UvcRequestData()
        if isinstance(resp, bytes):
            rd.length = len(resp)
            ctypes.memmove(rd.data, resp, len(resp))
        else:
            rd.length = resp  # data-stage length for a SET, or STALL
        try:
            fcntl.ioctl(self.fd, abi.UVCIOC_SEND_RESPONSE, rd)
        except OSError as e:
            log.warning("SEND_RESPONSE: %s", e)

    def _start_stream(self) -> None:
        self._stop_stream()
        c = self.proto.committed
        if c is None:  # a host that streams without committing gets the default probe
            log.warning("STREAMON without a commit; streaming the default format")
            c = self.proto.commit_current()
        try:
            self.pump = Pump(self.fd, self.node, c)
        except OSError as e:
            log.error("cannot start %s %dx%d: %s", c.fmt.fourcc, c.size.width, c.size.height, e)
            self.pump = None

    def _stop_stream(self) -> None:
        if self.pump is not None:
            self.pump.stop()
            self.pump = None


def main(node: str, udc: str | None, loopback: bool, mount: str) -> int:
    try:
        path = resolve_node(node, mount)
    except NodeError as e:
        log.error("%s", e)
        return 1
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it hangs, on demand
    return UvcApp(path, udc, loopback).run()
