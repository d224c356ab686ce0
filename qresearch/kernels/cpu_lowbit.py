"""Our fused dequant-matmul kernel for packed layers on CPU (csrc/lowbit_cpu.c, fp32 math), through ctypes.

The C source is built with the system C compiler once per machine (cached under $QRESEARCH_CACHE/kernels). No
compiler, or a failed build, is a reason the kernel cannot run (reported by cpu_packed.select, never silent).
prepare_lowbit lays out the codes once (nibbles for bits <= 4, bytes otherwise, groups padded to 32 columns), or,
for 4- / 8-bit layers whose groups and width are multiples of 32, prepare_lowbit_stored reads the layer's own
stored words (the C side runs 4-bit stream nibbles on a column-split copy of x, split_x);
lowbit_linear runs the fused kernel for few rows and, on AVX-512 builds, a loop that dequantizes each weight block
once for many (see MANY_M).

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
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..quant.packing import PackedMeta

SRC = Path(__file__).with_name("csrc") / "lowbit_cpu.c"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations it takes (computes in fp32)
# Which loop runs a call, by activation rows M (w4 g128, AMD EPYC with AVX-512, 2 threads, ms at 4096x4096 /
# 4096x11008; experiments/bench_kernels.py --m 16 64 256 2048 times them side by side):
# - M < MANY_M: the fused tiles (qr_lowbit_mm), which dequantize each weight vector once per 4 activation rows;
# - AVX-512 build, M >= MANY_M: qr_lowbit_mm_many, weight rows dequantized once per chunk of MANY_CHUNK rows into
#   a per-thread block of at most MANY_BLOCK_BYTES (L2) and reused by every row (M = 256: 25 vs 33 fused vs 43
#   dense; M = 2048 on 4096x11008: 650 vs 1608 vs 896; M = 16: 1.8 vs 2.3, M = 8: 2.4 vs 2.2). Since both loops
#   keep x in registers (5f8e4d5) the two tie at M = 16 and the many-row loop is 6-20% faster from 17 rows (576x576,
#   1536x576, 576x1536, 4096x4096; 1 and 2 threads), where the fused tiles leave a partial 4-row tile;
# - other builds, M >= PANEL_M: cpu_panels.py (weight rows dequantized a panel at a time into one reused buffer,
#   then the dense matmul; x86-64-v3 build, M = 64: fused 27 vs dense 18 ms; dequantizing the whole weight into
#   a fresh tensor cost 16 ms of page faults alone).
MANY_M, MANY_CHUNK, MANY_BLOCK_BYTES = 17, 256, 384 << 10
PANEL_M = 16
FLAGS = ("-O3", "-fopenmp", "-std=c11", "-shared", "-fPIC")  # + -march=$QRESEARCH_CPU_MARCH (native)
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {  # name -> (restype, argtypes), as declared in lowbit_cpu.c
    "qr_lowbit_mm": (_F, [_P, _I, _I, _P, _I, _I, _I, _I, _F, _P, _P, _P, _P, _P, _F]),
    "qr_lowbit_mm_many": (_F, [_P, _I, _I, _P, _I, _I, _I, _I, _F, _P, _P, _P, _P, _I, _I, _F]),
    "qr_lowbit_dequant": (None, [_P, _I, _I, _I, _I, _F, _P, _P, _P, _F]),
    "qr_lowbit_has_many": (_F, []),
    "qr_stream_dequant": (None, [_P, _I, _I, _I, _F, _P, _P, _I, _I, _P, _P, _F, _F]),
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
    codes: torch.Tensor  # uint8 [out, width / 2] (nib 1 / 2, bits <= 4) or [out, width] (nib 0)
    scale: torch.Tensor  # fp32 [out, n_groups]
    zero: torch.Tensor  # fp32 [out, n_groups]
    zero_scale: torch.Tensor  # fp32 [out, n_groups]: zero * scale, exact (integer zero x 16-bit scale)
    group: int  # our group length (columns of x per group before padding)
    gp: int  # the kernel's group length, a multiple of 32 (>= group: zero-padded)
    last: int  # the kernel's length of the last group, a multiple of 32 (<= gp)
    nib: int  # the C kernel's code layout: 0 bytes, 1 split nibbles (ours), 2 the int32_k stream's nibbles
    perm: torch.Tensor | None  # [in]: kernel column j reads input column perm[j]; None: the identity

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    @property
    def width(self) -> int:
        """Columns of the kernel's input (and of its dequantized weight): input columns plus padding."""
        return (self.n_groups - 1) * self.gp + self.last

    @property
    def weight_args(self) -> tuple:
        """qr_lowbit_mm's weight arguments (pointers into the tensors this object holds)."""
        return (self.codes.data_ptr(), self.codes.shape[0], self.n_groups, self.gp, self.last, self.nib,
                self.scale.data_ptr(), self.zero.data_ptr(), self.zero_scale.data_ptr())


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
    return LowbitPrepared(codes.reshape(n, -1).contiguous(), s, z, z * s, gs, gp, gp, int(nib), perm)


def stored_layout(meta: PackedMeta, qweight: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """The layer's stored int32_k words read as the kernel's codes without a copy: (uint8 [out, in * bits / 8], the
    kernel's nib: 2 for 4 bits (byte i of a 32-code chunk holds codes 2i and 2i + 1), 0 for 8), or None where the
    stored stream is no such layout (other widths, a group or an input width that is no multiple of 32, a big-endian
    machine)."""
    k = meta.in_features
    if meta.bits not in (4, 8) or min(meta.group, k) % 32 or k % 32 or sys.byteorder != "little":
        return None
    if not qweight.is_contiguous() or qweight.shape[1] * 32 != k * meta.bits:
        return None
    return qweight.view(torch.uint8), 2 if meta.bits == 4 else 0  # the buffer's own memory


def prepare_lowbit_stored(meta: PackedMeta, qweight, scales, zeros) -> LowbitPrepared | None:
    """LowbitPrepared over the stored codes themselves (stored_layout), so the layer's weight is held once: only the
    fp32 scales / zeros are made. None where stored_layout is None (then prepare_lowbit copies the codes)."""
    layout = stored_layout(meta, qweight)
    if layout is None:
        return None
    k, gs = meta.in_features, min(meta.group, meta.in_features)
    s, z = scales.float().contiguous(), zeros.float().contiguous()
    return LowbitPrepared(layout[0], s, z, z * s, gs, gs, k - (meta.n_groups - 1) * gs, layout[1], None)


def _lowbit_x(x: torch.Tensor, p: LowbitPrepared) -> torch.Tensor:
    """x [M, in] -> fp32 [M, width]: columns in the kernel's order (p.perm), each group's padded with zeros to gp."""
    m, ng = x.shape[0], p.n_groups
    x = x if p.perm is None else x.index_select(1, p.perm)
    x = x.float()
    if x.shape[1] == p.width:
        return x.contiguous()
    if p.gp == p.group:  # only the last group is short: pad the tail
        return F.pad(x, (0, p.width - x.shape[1]))  # [M, width]
    x = F.pad(x, (0, ng * p.group - x.shape[1])).view(m, ng, p.group)  # [M, n_groups, group]
    return F.pad(x, (0, p.gp - p.group)).reshape(m, ng * p.gp)  # [M, n_groups * gp]


def lowbit_dequant(p: LowbitPrepared) -> torch.Tensor:
    """The whole weight as fp32 [out, width], columns in the kernel's order (padded ones meet zero activations)."""
    lib = load()[0]
    w = torch.empty(p.codes.shape[0], p.width, dtype=torch.float32)
    lib.qr_lowbit_dequant(*p.weight_args[:8], w.data_ptr(), torch.get_num_threads())  # ... scale, zero (no z * s)
    return w


def many_block_rows(k: int) -> int:
    """Weight rows per block of qr_lowbit_mm_many for `k` (padded) input columns: a multiple of its 4-row tile,
    4..16, the block's fp32 rows within MANY_BLOCK_BYTES."""
    return max(4, min(16, MANY_BLOCK_BYTES // (4 * k)) // 4 * 4)


def _many(lib, xin: torch.Tensor, p: LowbitPrepared, b: torch.Tensor | None, y: torch.Tensor) -> None:
    k = xin.shape[1]
    failed = lib.qr_lowbit_mm_many(xin.data_ptr(), xin.shape[0], k, *p.weight_args[:6], p.scale.data_ptr(),
                                   p.zero_scale.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                                   many_block_rows(k), MANY_CHUNK, torch.get_num_threads())
    if failed == 1:
        raise MemoryError("qr_lowbit_mm_many could not allocate its weight blocks")
    if failed:  # 2: x's row stride is not the padded width / the block is no multiple of the tile
        raise RuntimeError(f"qr_lowbit_mm_many refused x {tuple(xin.shape)} (code {failed})")


@functools.lru_cache(maxsize=None)
def has_many() -> bool:
    """Whether this build has qr_lowbit_mm_many (AVX-512); asked once per process."""
    lib = load()[0]
    return lib is not None and bool(lib.qr_lowbit_has_many())


def kernel_loop(m: int) -> str:
    """Which loop runs a call of `m` fp32 activation rows on this build: fused, many, or panels (cpu_panels.py,
    chosen by cpu_packed.run; lowbit_linear itself runs the fused tiles then)."""
    if has_many():
        return "many" if m >= MANY_M else "fused"
    return "panels" if m >= PANEL_M else "fused"


def lowbit_linear(x: torch.Tensor, p: LowbitPrepared, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, out] in x's dtype (fp32 math)."""
    return bind_linear(p, bias, x.shape[0], x.dtype)(x)


def bind_linear(p: LowbitPrepared, bias: torch.Tensor | None, m: int, dtype: torch.dtype):
    """lowbit_linear for calls of m rows in `dtype` with the weight and bias fixed: a function of x alone (the
    bias's fp32 copy, the weight's arguments and the loop chosen once; cpu_packed.plan keeps it per layer)."""
    lib, why = load()
    if lib is None:
        raise RuntimeError(f"c_lowbit kernel unavailable: {why}")
    b = None if bias is None else bias.float().contiguous()
    b_ptr, n, args = None if b is None else b.data_ptr(), p.codes.shape[0], p.weight_args
    many = kernel_loop(m) == "many"

    def run(x: torch.Tensor) -> torch.Tensor:
        xin = _lowbit_x(x, p)  # [M, n_groups * gp] fp32
        y = torch.empty(m, n, dtype=torch.float32)  # [M, out]
        if many:
            _many(lib, xin, p, b, y)
        elif lib.qr_lowbit_mm(xin.data_ptr(), m, xin.shape[1], *args, b_ptr, y.data_ptr(), torch.get_num_threads()):
            raise MemoryError("c_lowbit kernel could not allocate its row buffers")
        return y if dtype == torch.float32 else y.to(dtype)
    return run
