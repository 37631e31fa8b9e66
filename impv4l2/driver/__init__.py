"""Hardware backends behind one interface (see :mod:`impv4l2.driver.base`)."""

from __future__ import annotations

import importlib

from .base import Backend

# name -> "module:Class", imported only when chosen (t31 needs libimp)
BACKENDS = {
    "sim": "impv4l2.driver.sim.backend:SimBackend",
    "t31": "impv4l2.driver.t31.backend:T31Backend",
}


def _backend_class(name: str) -> type:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})") from None
    module, cls = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if e.name not in ("numpy", "av"):
            raise
        # the sim renders and encodes in software; the camera has neither library
        raise RuntimeError(f"backend {name!r} needs {e.name} (not installed here); "
                           f"on a T31 camera use --backend t31") from e
    return getattr(mod, cls)


def load_backend(name: str = "sim", **options) -> Backend:
    """Create the backend ``name`` with backend-specific keyword options."""
    return _backend_class(name)(**options)


def check_backend(name: str, **options) -> None:
    """What a backend can check without its hardware (t31: libimp.so loads and has every
    required symbol), so a daemon waiting for the hardware fails now rather than never."""
    preflight = getattr(_backend_class(name), "preflight", None)
    if preflight is not None:
        preflight(**options)
