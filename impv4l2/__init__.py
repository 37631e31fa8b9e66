"""impv4l2: a userspace V4L2 driver for Ingenic T31 camera SoCs, served through CUSE and FUSE."""

__version__ = "0.1.0"
