"""Run the impv4l2 CLI the way it runs on the camera: numpy, PyAV and pyudev
cannot be imported (thingino's uClibc root has none of them).  Any import of
them raises ImportError, so a code path that still needs one fails loudly
instead of passing on the x86 development machine.

    python camera_runtime.py serve --backend t31 ...
"""

from __future__ import annotations

import importlib.abc
import sys

ABSENT = frozenset({"numpy", "av", "pyudev"})


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ImportError(f"No module named {name!r} (not on the camera)", name=name)
        return None


sys.meta_path.insert(0, Absent())
sys.argv[0] = "impv4l2"

from impv4l2.cli import main  # noqa: E402

sys.exit(main())
