"""Build helpers for the fake libimp and the struct-layout cross-check.

``build_fake()`` compiles libimp_fake*.c with the system gcc into a cache dir
(``$IMPV4L2_FAKE_BUILD`` or ``$TMPDIR/impv4l2-fakes``), keyed by a hash of the
sources and options.  ``omit`` hides exported symbols with a linker version
script (exact names beat the ``*`` wildcard), which is how a variant "without
IMP_ISP_Tuning_SetBrightness" is made.

``c_layout()`` compiles a generated C file with ``-S`` only (the kernel's
asm-offsets trick), so a cross compiler without a target libc is enough.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
C_FILES = (HERE / "libimp_fake.c", HERE / "libimp_fake_fs.c", HERE / "libimp_fake_enc.c")
SOURCES = (*C_FILES, HERE / "libimp_fake.h", HERE / "imp_abi.h")


def build_dir() -> Path:
    d = Path(os.environ.get("IMPV4L2_FAKE_BUILD") or Path(tempfile.gettempdir()) / "impv4l2-fakes")
    d.mkdir(parents=True, exist_ok=True)
    return d


def build_fake(omit: tuple[str, ...] = (), cflags: tuple[str, ...] = (), cc: str = "gcc") -> Path:
    """Path of libimp_fake (built if needed).  The file is named libimp.so
    inside a per-variant directory so lookups by standard name work too."""
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(repr((sorted(omit), cflags, cc)).encode())
    out_dir = build_dir() / h.hexdigest()[:16]
    lib = out_dir / "libimp.so"
    if lib.exists():
        return lib
    tmp = Path(tempfile.mkdtemp(dir=build_dir()))
    cmd = [cc, "-shared", "-fPIC", "-O2", "-g", "-Wall", "-Werror", "-pthread", *cflags,
           "-I", str(HERE), "-o", str(tmp / "libimp.so"), *map(str, C_FILES)]
    if omit:
        script = tmp / "omit.map"
        script.write_text("{ global: *; local: %s; };\n" % "; ".join(omit))
        cmd.insert(1, f"-Wl,--version-script={script}")
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    try:
        (tmp).rename(out_dir)
    except OSError:  # built concurrently by another process: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return lib


def c_layout(fields: dict[str, list[str]], cc: list[str]) -> dict[str, dict[str, int]]:
    """sizeof/offsetof for ``{struct: [field, "a.b", ...]}`` as the compiler
    ``cc`` (argv prefix, e.g. ["mipsel-linux-gnu-gcc", "-mabi=32"]) lays them out."""
    lines = ['#include <stddef.h>', '#include "imp_abi.h"',
             '#define DEF(sym, val) asm volatile("\\n.ascii \\"->" #sym " %0\\"" :: "i"(val))',
             "void layout(void) {"]
    for struct, names in fields.items():
        lines.append(f"DEF({struct}:sizeof, sizeof({struct}));")
        for n in names:
            lines.append(f"DEF({struct}:{n}, offsetof({struct}, {n}));")
    lines.append("}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "layout.c"
        src.write_text("\n".join(lines) + "\n")
        res = subprocess.run([*cc, "-ffreestanding", "-S", "-o", "-", "-I", str(HERE), str(src)],
                             check=True, capture_output=True, text=True)
    out: dict[str, dict[str, int]] = {}
    for struct, name, val in re.findall(r"->(\w+):([\w.]+) \$?(-?\d+)", res.stdout):
        out.setdefault(struct, {})[name] = int(val)
    return out
