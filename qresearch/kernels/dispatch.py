"""Kernel registry and the one dispatch point for packed linears.

Each `Kernel` says which layers it implements (`accepts`) and, for those, whether it can run here and why not
(`why_not`: device, dtype, format, missing package). `choose` takes the first kernel in priority order that
accepts the layer and can run; the name it returns ("triton_w4a16", "torch_ref_w8a8", ...) is recorded per layer,
and the reasons the better kernels were skipped are logged (no silent fallbacks). A new kernel family is one
`register(Kernel(...))` call.

QRESEARCH_KERNELS=<backend> keeps only that backend's kernels (`torch` = the pure-torch reference; `triton` on CPU
only under TRITON_INTERPRET=1, which is how the tests run the Triton kernels).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..quant.packing import PackedMeta
from ..quant.scales import div_rn
from ..records import ActQuant
from .launcher import INTERPRETED

TRITON_DTYPES = (torch.float16, torch.bfloat16)  # fp32 would go through TF32 tensor cores: not our reference


@dataclass(frozen=True)
class ActMode:
    """How a packed layer treats its input: 'none' (A16), 'int8' (W8A8 int GEMM), 'fake' (fake-quant + A16 ref)."""

    kind: str
    bits: int = 16
    dynamic_tensor: bool = False  # per-tensor dynamic scale (SmoothQuant O2): computed per call in torch


def act_mode(meta: PackedMeta, act: ActQuant | None, has_gidx: bool) -> ActMode:
    """Classify a layer's activation quantization; int8 only for sym per-channel 8-bit integer weights."""
    if act is None:
        return ActMode("none")
    s = act.spec
    w_ok = meta.qformat == "int" and meta.bits == 8 and meta.sym and meta.n_groups == 1 and not has_gidx
    a_ok = s.qformat == "int" and s.bits == 8 and act.static_zero is None and (
        act.static_scale is not None or (s.sym and s.granularity in ("token", "tensor")))
    if w_ok and a_ok:
        return ActMode("int8", 8, act.static_scale is None and s.granularity == "tensor")
    return ActMode("fake", s.bits)


@dataclass(frozen=True)
class LayerKey:
    """What a kernel's checks see of one call: the layer, its activation mode, the input's device and dtype."""

    meta: PackedMeta
    mode: ActMode
    device: torch.device
    dtype: torch.dtype
    has_gidx: bool

    @property
    def family(self) -> str:
        return f"w{self.meta.bits}a{self.mode.bits}" if self.mode.kind != "int8" else "w8a8"


# run(x [M, K], meta, buffers, mode) -> y [M, N]; buffers: qweight, scales, qzeros, g_idx, bias, act_scale
RunFn = Callable[[torch.Tensor, PackedMeta, dict, ActMode], torch.Tensor]


# plan(x [M, K], meta, buffers, mode) -> a function of x alone for this layer's calls like x, or None (use run)
PlanFn = Callable[[torch.Tensor, PackedMeta, dict, ActMode], Callable[[torch.Tensor], torch.Tensor] | None]


@dataclass(frozen=True)
class Kernel:
    name: str  # recorded as f"{name}_{family}", e.g. triton_w4a16
    backend: str  # what QRESEARCH_KERNELS selects: torch | triton | ...
    priority: int  # lower is tried first
    accepts: Callable[[LayerKey], bool]  # the layers this kernel implements at all
    why_not: Callable[[LayerKey], str | None]  # None = can run here; else the reason
    run: RunFn
    plan: PlanFn | None = None  # decode calls bound once per layer (QuantLinear keeps them; see plan_key)

    def label(self, key: LayerKey) -> str:
        return f"{self.name}_{key.family}"


KERNELS: list[Kernel] = []


_BACKENDS = ["auto"]  # QRESEARCH_KERNELS values: auto + the registered kernels' backends (kept by register)


def register(kernel: Kernel) -> Kernel:
    """Add a kernel to the registry (kept sorted by priority; equal priorities keep registration order)."""
    KERNELS.append(kernel)
    KERNELS.sort(key=lambda k: k.priority)
    _BACKENDS[1:] = sorted({k.backend for k in KERNELS})
    return kernel


def backend() -> str:
    b = os.environ.get("QRESEARCH_KERNELS", "auto")
    if b not in _BACKENDS:
        raise ValueError(f"QRESEARCH_KERNELS={b!r} is unknown; allowed: {', '.join(_BACKENDS)}")
    return b


def choose(key: LayerKey) -> tuple[Kernel, str]:
    """(kernel, why better-priority kernels were skipped: '' when the first choice runs)."""
    b = backend()
    reasons = []
    for k in KERNELS:
        if not k.accepts(key):
            continue
        if b != "auto" and k.backend != b:
            reasons.append(f"{k.label(key)}: QRESEARCH_KERNELS={b}")
            continue
        why = k.why_not(key)
        if why is None:
            return k, "; ".join(reasons)
        reasons.append(f"{k.label(key)}: {why}")
    raise RuntimeError(f"no kernel can run {key.family} (qformat={key.meta.qformat}) here: {'; '.join(reasons)}")


def prepare_input(x: torch.Tensor, mode: ActMode, bufs: dict) -> torch.Tensor | None:
    """The per-tensor activation scale of a call: static from the layer, or dynamic (absmax / 127) per call."""
    if mode.dynamic_tensor:  # one scale for the whole tensor, absmax / 127 as the int format computes it
        amax = x.detach().abs().amax().float()
        return torch.where(amax > 0, div_rn(amax, 127.0), torch.ones_like(amax))  # IEEE on every device
    return bufs.get("act_scale")


# --- the built-in kernels -------------------------------------------------------------------------------------

def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_MODULES: dict[str, object] = {}


def _triton(name: str):
    """The Triton kernel module `name` (imported at its first call: dispatch loads without Triton installed)."""
    mod = _MODULES.get(name)
    if mod is None:
        mod = _MODULES[name] = importlib.import_module(f"{__package__}.{name}")
    return mod


def _triton_why_not(key: LayerKey) -> str | None:
    if key.meta.qformat != "int":
        return f"qformat={key.meta.qformat} has no Triton kernel"
    if key.meta.scale_coding.coded:
        return f"two-level scales (scale_bits={key.meta.scale_bits}) have no Triton kernel"
    if key.device.type != "cuda" and not interpreting():
        return f"device {key.device.type} (Triton needs CUDA, or TRITON_INTERPRET=1)"
    if key.device.type == "cuda" and key.mode.kind != "int8" and key.dtype not in TRITON_DTYPES:
        return f"activation dtype {key.dtype} (Triton kernels take fp16/bf16)"
    if key.meta.layout != "int32_k":
        return f"layout {key.meta.layout}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


SMALL_M_PATHS = ("auto", "small", "gemv", "splitk")


def small_m_path() -> str:
    """Which Triton kernel takes calls of M <= 16 tokens (QRESEARCH_SMALL_M): 'small' (triton_small: wide GEMV
    at M = 1, tensor-core skinny GEMM at 2..16), 'gemv' (triton_gemv at M = 1, split-K above), 'splitk'
    (triton_wq's split-K tiles for every M <= 16), or 'auto' (default): the fastest measured on an H100
    (results/tune_small_m_nvidia_h100_80gb_hbm3.md): triton_gemv at M = 1, triton_small at 2..16. Layers a
    kernel does not take go to the next one, then to triton_wq."""
    p = os.environ.get("QRESEARCH_SMALL_M", "auto")
    if p not in SMALL_M_PATHS:
        raise ValueError(f"QRESEARCH_SMALL_M={p!r} is unknown; allowed: {', '.join(SMALL_M_PATHS)}")
    return p


def _small_m_order(path: str, m: int) -> tuple[str, ...]:
    """Kernels to try, in order, for a call of m tokens on this path."""
    if m > 16 or path == "splitk":
        return ()
    if path == "auto":
        return ("gemv", "small") if m == 1 else ("small",)
    return (path,) if path == "small" or m == 1 else ()


PREFILL_PATHS = ("auto", "dequant", "fused")


def prefill_path() -> str:
    """How Triton packed layers run calls of M > 16 tokens (QRESEARCH_PREFILL): 'fused' (triton_wq's GEMM with
    dequantization in its main loop), 'dequant' (triton_dequant: dequantize, then the dense GEMM), or 'auto'
    (default): dequant from triton_dequant.DEQUANT_MIN_M tokens, fused below."""
    p = os.environ.get("QRESEARCH_PREFILL", "auto")
    if p not in PREFILL_PATHS:
        raise ValueError(f"QRESEARCH_PREFILL={p!r} is unknown; allowed: {', '.join(PREFILL_PATHS)}")
    return p


ACT_ORDER_PATHS = ("permute", "gather")


def act_order_path() -> str:
    """How the Triton path runs act-order layers (QRESEARCH_ACT_ORDER): 'permute' (default: the layer's codes with
    columns sorted by group, one extra copy of its packed weight made at its first call, and x[:, perm] per call,
    so the contiguous-group kernels serve it; a g_idx that is no clean act-order assignment keeps 'gather') or
    'gather' (scales and zeros gathered per weight element by triton_wq, which spills registers on sm_90;
    dequantize-then-GEMM calls gather in any case: their dequantize kernel reads g_idx without spilling)."""
    p = os.environ.get("QRESEARCH_ACT_ORDER", "permute")
    if p not in ACT_ORDER_PATHS:
        raise ValueError(f"QRESEARCH_ACT_ORDER={p!r} is unknown; allowed: {', '.join(ACT_ORDER_PATHS)}")
    return p


def check_env() -> None:
    """Raise ValueError (one line: the variable, its value, what is allowed) for an unknown kernel-path switch:
    run before any loading, since the switches are otherwise read only at the first packed call."""
    backend(), small_m_path(), prefill_path(), act_order_path()


def _run_triton_wq(x, meta, bufs, mode):
    if bufs["g_idx"] is not None and act_order_path() == "permute" and not _dequant_call(x.shape[0]):
        from .prepared import permuted_act_order

        permuted = permuted_act_order(meta, bufs)
        if permuted is not None:
            perm, qweight = permuted
            x, bufs = x.index_select(1, perm), {**bufs, "qweight": qweight, "g_idx": None}
    name, small = _small_m_module(meta, bufs["g_idx"] is not None, x.shape[0])
    if small is not None:
        run = small.wq_gemv if name == "gemv" else small.small_m_linear
        return run(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], bufs["bias"])
    if _dequant_call(x.shape[0]):  # QRESEARCH_PREFILL: dequantize-then-GEMM for long calls
        return _triton("triton_dequant").dequant_linear(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"],
                                                        bufs["g_idx"], bufs["bias"])
    return _triton("triton_wq").wq_linear(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], bufs["g_idx"],
                                          bufs["bias"])


PLAN_MAX_M = 16  # plans serve decode-sized calls; longer ones take run()


def plan_key(x: torch.Tensor) -> tuple:
    """What a layer's kept plan for x [M, K] depends on besides its buffers: M, device, dtype and the switches that
    pick the kernel and its code path (read per call, as run() reads them; the Triton-only ones only where Triton
    can run x: CUDA, or the interpreter)."""
    if x.is_cuda or INTERPRETED:
        return (x.shape[0], x.device, x.dtype, backend(), small_m_path(), os.environ.get("QRESEARCH_GEMV_MAGIC"))
    return x.shape[0], x.device, x.dtype, backend()


def _plan_triton_wq(x, meta, bufs, mode):
    """Decode-sized calls on the GEMV or the small-M kernels (the first of QRESEARCH_SMALL_M's order that takes
    the layer, as run() picks): the call bound to the layer; act-order layers and other calls take run()."""
    _, small = (None, None) if bufs["g_idx"] is not None else _small_m_module(meta, False, x.shape[0])
    return None if small is None else small.plan(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"],
                                                 bufs["bias"])


def _small_m_module(meta, has_gidx: bool, m: int) -> tuple[str | None, object | None]:
    """(name, module) of the first kernel of QRESEARCH_SMALL_M's order for m tokens that takes this layer ('gemv':
    triton_gemv, 'small': triton_small), or (None, None): the split-K / prefill paths."""
    for name in _small_m_order(small_m_path(), m):
        mod = _triton("triton_gemv" if name == "gemv" else "triton_small")
        if mod.supports(meta, has_gidx, m) is None:
            return name, mod
    return None, None


def _plan_triton_w8a8(x, meta, bufs, mode):
    """Per-token dynamic W8A8 (decode's calls): act quant + GEMM bound to the layer; static or per-tensor
    activation scales take run()."""
    if mode.dynamic_tensor or bufs.get("act_scale") is not None:
        return None
    return _triton("triton_w8a8").plan(x, meta, bufs["qweight"], bufs["scales"], bufs["bias"])


def _dequant_call(m: int) -> bool:
    """Whether a call of m tokens goes to dequantize-then-GEMM (triton_dequant; QRESEARCH_PREFILL)."""
    if m <= 16:
        return False
    from .triton_dequant import use_dequant

    return use_dequant(m)


def _run_triton_w8a8(x, meta, bufs, mode):
    return _triton("triton_w8a8").w8a8_linear(x, meta, bufs["qweight"], bufs["scales"], bufs["bias"],
                                              prepare_input(x, mode, bufs))


def _run_reference(x, meta, bufs, mode):
    from . import reference as ref

    if mode.kind == "int8":
        return ref.w8a8_ref(x, meta, bufs["qweight"], bufs["scales"], bufs["bias"], prepare_input(x, mode, bufs))
    return ref.wa16_ref(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], bufs["g_idx"], bufs["bias"],
                        bufs.get("scale2"), bufs.get("lut"))


def _int_mm_why_not(key: LayerKey) -> str | None:
    if key.device.type != "cpu":  # CUDA: torch._int_mm needs M > 16 per call (decode breaks it); Triton serves
        return f"device {key.device.type} (torch._int_mm serves CPU here; CUDA int8 layers use Triton)"
    from .int_mm import int_mm_why_not

    return int_mm_why_not(key.device, 1, key.meta.in_features, key.meta.out_features)


def _run_int_mm(x, meta, bufs, mode):
    from .cpu_packed import prepared_for
    from .int_mm import w8a8_int_mm

    wq = prepared_for("int_mm", meta, bufs, torch.int8)  # int8 [out, in], unpacked once per layer
    return w8a8_int_mm(x, wq, bufs["scales"], bufs["bias"], prepare_input(x, mode, bufs))


def _vnni_why_not(key: LayerKey) -> str | None:
    from .cpu_int8 import why_not

    return why_not(key.meta, key.device)


def _run_vnni(x, meta, bufs, mode):
    from .cpu_int8 import w8a8_linear

    return w8a8_linear(x, meta, bufs, prepare_input(x, mode, bufs))


def _plan_vnni(x, meta, bufs, mode):
    """Decode-sized calls on the VNNI kernel: the stored bytes, fp32 weight scales and bias bound once (again when
    one is written in place); the activation scale is the call's (prepare_input), as run() takes it."""
    from .cpu_int8 import bind_linear
    from .prepared import rebinding

    m, dtype = x.shape[0], x.dtype
    bound = rebinding(bufs, ("qweight", "scales", "bias"),
                      lambda: bind_linear(meta, bufs["qweight"], bufs["scales"], bufs.get("bias"), m, dtype))
    return lambda x: bound(x, prepare_input(x, mode, bufs))


register(Kernel("triton", "triton", 10, lambda k: k.mode.kind == "none", _triton_why_not, _run_triton_wq,
                _plan_triton_wq))
register(Kernel("triton", "triton", 10, lambda k: k.mode.kind == "int8", _triton_why_not, _run_triton_w8a8,
                _plan_triton_w8a8))
# our AVX512-VNNI product on the stored codes (cpu_int8.py: the weight held once), before torch._int_mm's copy
register(Kernel("c_vnni", "cpu", 40, lambda k: k.mode.kind == "int8", _vnni_why_not, _run_vnni, _plan_vnni))
register(Kernel("torch_int_mm", "torch_int", 50, lambda k: k.mode.kind == "int8", _int_mm_why_not, _run_int_mm))
register(Kernel("torch_ref", "torch", 100, lambda k: True, lambda k: None, _run_reference))
