"""Optional third-party modules (numpy, PyAV), imported on first use.

On x86 they are installed; on the camera (uClibc, no numpy or PyAV) they are
not, and what needs them (software pixel conversion, arbitrary encoder crops,
the sim backend) is simply not offered.  Import them through here, never at
module top in the t31 path, so the camera runtime is the standard library
and ctypes.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def module(name: str) -> ModuleType | None:
    """The module, or None when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def have(*names: str) -> bool:
    return all(module(n) is not None for n in names)
