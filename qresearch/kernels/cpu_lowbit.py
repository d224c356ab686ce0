"""Our fused dequant-matmul kernel for packed layers on CPU (csrc/lowbit_cpu.c, fp32 math), through ctypes.

The C source is built with the system C compiler once per machine (cached under $QRESEARCH_CACHE/kernels). No
compiler, or a failed build, is a reason the kernel cannot run (reported by cpu_packed.select, never silent).
prepare_lowbit lays out the codes once (nibbles for bits <= 4, bytes otherwise, groups padded to 32 columns);
lowbit_linear runs the fused kernel for few rows and dequantize-once + dense matmul for many.

The library links OpenMP by soname (libgomp.so.1), so in a process that imported torch it shares torch's own
libgomp and thread pool instead of starting a second one. Override the compiler with CC=..., the target with
QRESEARCH_CPU_MARCH=... (default native; e.g. x86-64-v3 builds the portable path the tests also check).
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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..quant.packing import PackedMeta

SRC = Path(__file__).with_name("csrc") / "lowbit_cpu.c"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations it takes (computes in fp32)
# From this many rows, dequantize the whole weight once and run the dense matmul instead. Measured on a 2048x2048
# w4 g128 layer, one thread (AMD EPYC, AVX-512): fused 1.0 / 8.2 / 35 ms vs dequant + matmul 2.7 / 11.7 / 42 ms
# at M = 16 / 128 / 512; the fused kernel re-reads x once per 4 weight rows, so very long prompts go dense.
LARGE_M = 256
FLAGS = ("-O3", "-fopenmp", "-std=c11", "-shared", "-fPIC")  # + -march=$QRESEARCH_CPU_MARCH (native)
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


def flags() -> tuple[str, ...]:
    return (*FLAGS, f"-march={os.environ.get('QRESEARCH_CPU_MARCH', 'native')}")


def build(cc: str, out_dir: Path, src: Path = SRC, extra: tuple[str, ...] = ()) -> Path:
    """Compile `src` (if this source + flags + CPU has no library yet) and return the .so path."""
    code, opts = src.read_bytes(), (*flags(), *extra)
    key = hashlib.sha256(b"\0".join([code, " ".join(opts).encode(), cc.encode(), _cpu_flags().encode()]))
    so = out_dir / f"{src.stem}_{key.hexdigest()[:16]}.so"
    if so.exists():
        return so
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # build aside, then rename: concurrent runs are safe
    os.close(fd)
    try:
        r = subprocess.run([cc, *opts, str(src), "-o", tmp], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {src.name}: {r.stderr.strip()[-500:]}")
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


def load_library(src: Path, signatures: dict, extra: tuple[str, ...] = ()) -> tuple[ctypes.CDLL | None, str]:
    """(library with `signatures` declared, '') or (None, why it is unavailable): `src` built on first use."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc!r} not on PATH) to build {src.name}"
    try:
        lib = ctypes.CDLL(str(build(cc, cache_dir(), src, extra)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"building/loading {src.name} failed: {e}"
    for name, (res, args) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib, ""


@functools.lru_cache(maxsize=None)
def load() -> tuple[ctypes.CDLL | None, str]:
    """(library, '') or (None, why it is unavailable). Built on first call, cached per process."""
    return load_library(SRC, SIGNATURES)


@dataclass(frozen=True)
class LowbitPrepared:
    codes: torch.Tensor  # uint8 [out, n_groups, gp / 2] (nibbles, bits <= 4) or [out, n_groups, gp]
    scale: torch.Tensor  # fp32 [out, n_groups]
    zero: torch.Tensor  # fp32 [out, n_groups]
    zero_scale: torch.Tensor  # fp32 [out, n_groups]: zero * scale, exact (integer zero x 16-bit scale)
    group: int  # our group length (columns of x per group before padding)
    gp: int  # padded group length, a multiple of 32
    nibbles: bool
    perm: torch.Tensor | None

    @property
    def weight_args(self) -> tuple:
        """qr_lowbit_mm's weight arguments (pointers into the tensors this object holds)."""
        n, ng = self.codes.shape[:2]
        return (self.codes.data_ptr(), n, ng, self.gp, int(self.nibbles), self.scale.data_ptr(),
                self.zero.data_ptr(), self.zero_scale.data_ptr())


def prepare_lowbit(meta: PackedMeta, codes, scales, zeros, perm, dtype: torch.dtype = torch.float32):
    """codes uint8 [out, in] (act-order columns permuted), scales / zeros [out, n_groups] -> LowbitPrepared."""
    n, k, ng, gs = meta.out_features, meta.in_features, meta.n_groups, meta.group
    gs = min(gs, k)
    gp = -(-gs // 32) * 32
    codes = F.pad(codes, (0, ng * gs - k)).view(n, ng, gs)  # [out, n_groups, group]
    codes = F.pad(codes, (0, gp - gs))  # [out, n_groups, gp]
    nib = meta.bits <= 4
    if nib:  # 32-code chunk -> 16 bytes: low nibble = code i, high nibble = code 16 + i
        c = codes.view(n, ng, gp // 32, 2, 16)  # [out, n_groups, chunks, half, 16]
        codes = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(n, ng, gp // 2)  # [out, n_groups, gp / 2]
    s, z = scales.float().contiguous(), zeros.float().contiguous()
    return LowbitPrepared(codes.contiguous(), s, z, z * s, gs, gp, nib, perm)


def _lowbit_x(x: torch.Tensor, p: LowbitPrepared) -> torch.Tensor:
    """x [M, in] -> fp32 [M, n_groups * gp]: each group's columns padded with zeros to gp."""
    m, ng = x.shape[0], p.codes.shape[1]
    x = x if p.perm is None else x[:, p.perm]
    x = x.float()
    if x.shape[1] == ng * p.gp:
        return x.contiguous()
    if p.gp == p.group:  # only the last group is short: pad the tail
        return F.pad(x, (0, ng * p.gp - x.shape[1]))  # [M, n_groups * gp]
    x = F.pad(x, (0, ng * p.group - x.shape[1])).view(m, ng, p.group)  # [M, n_groups, group]
    return F.pad(x, (0, p.gp - p.group)).reshape(m, ng * p.gp)  # [M, n_groups * gp]


def lowbit_dequant(p: LowbitPrepared) -> torch.Tensor:
    """The whole weight as fp32 [out, n_groups * gp] (padded columns are multiplied by zero activations)."""
    lib = load()[0]
    n, ng = p.codes.shape[:2]
    w = torch.empty(n, ng * p.gp, dtype=torch.float32)
    lib.qr_lowbit_dequant(p.codes.data_ptr(), n, ng, p.gp, int(p.nibbles), p.scale.data_ptr(), p.zero.data_ptr(),
                          w.data_ptr(), torch.get_num_threads())
    return w


def lowbit_linear(x: torch.Tensor, p: LowbitPrepared, bias: torch.Tensor | None) -> torch.Tensor:
    lib, why = load()
    if lib is None:
        raise RuntimeError(f"c_lowbit kernel unavailable: {why}")
    xin = _lowbit_x(x, p)  # [M, n_groups * gp] fp32
    b = None if bias is None else bias.float().contiguous()
    if xin.shape[0] >= LARGE_M:  # compute-bound: one dequantization, then the dense fp32 matmul
        return F.linear(xin, lowbit_dequant(p), b).to(x.dtype)
    y = torch.empty(xin.shape[0], p.codes.shape[0], dtype=torch.float32)  # [M, out]
    failed = lib.qr_lowbit_mm(xin.data_ptr(), xin.shape[0], xin.shape[1], *p.weight_args,
                              None if b is None else b.data_ptr(), y.data_ptr(), torch.get_num_threads())
    if failed:
        raise MemoryError("c_lowbit kernel could not allocate its row buffers")
    return y.to(x.dtype)
