"""``impv4l2 uvc``: the camera as a real USB webcam through Linux's UVC gadget function.

A separate process and a plain client of the daemon: :mod:`.source` reads a capture node,
:mod:`.gadget` builds the configfs gadget from its formats, :mod:`.protocol` answers the host's
UVC requests (:mod:`.controls` maps them onto the node's controls), :mod:`.pump` moves frames,
:mod:`.loopback` attaches the gadget to this machine over USB/IP, :mod:`.app` runs it all.
"""
