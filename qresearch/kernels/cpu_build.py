"""Builds csrc/lowbit_cpu.c (our fused dequant-matmul) with the system C compiler once per machine and loads it
through ctypes. No compiler, or a failed build, is a reason the kernel cannot run (reported, never silent).

The library links OpenMP by soname (libgomp.so.1), so in a process that imported torch it shares torch's own
libgomp and thread pool instead of starting a second one. Override the compiler with CC=...
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SRC = Path(__file__).with_name("csrc") / "lowbit_cpu.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC")
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {  # name -> (restype, argtypes), as declared in lowbit_cpu.c
    "qr_lowbit_mm": (_F, [_P, _I, _I, _P, _I, _I, _I, _F, _P, _P, _P, _P, _P, _F]),
    "qr_lowbit_dequant": (None, [_P, _I, _I, _I, _F, _P, _P, _P, _F]),
}


def cache_dir() -> Path:
    return Path(os.environ.get("QRESEARCH_CACHE", Path.home() / ".cache" / "qresearch")) / "kernels"


def _cpu_flags() -> str:
    """This CPU's feature flags: part of the build key, since -march=native code may not run elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(cc: str, out_dir: Path) -> Path:
    """Compile the kernel (if this source + flags + CPU has no library yet) and return the .so path."""
    src = SRC.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), cc.encode(), _cpu_flags().encode()]))
    so = out_dir / f"lowbit_cpu_{key.hexdigest()[:16]}.so"
    if so.exists():
        return so
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # build aside, then rename: concurrent runs are safe
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, str(SRC), "-o", tmp], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {SRC.name}: {r.stderr.strip()[-500:]}")
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


@functools.lru_cache(maxsize=None)
def load() -> tuple[ctypes.CDLL | None, str]:
    """(library, '') or (None, why it is unavailable). Built on first call, cached per process."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc!r} not on PATH) to build {SRC.name}"
    try:
        lib = ctypes.CDLL(str(build(cc, cache_dir())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"building/loading {SRC.name} failed: {e}"
    for name, (res, args) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib, ""
