"""QuantLinear: packed integer weights + qparams as buffers; forward = kernels.dispatch (Triton or reference)."""
from __future__ import annotations

import logging
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NumericalError
from ..kernels import dispatch, launcher
from ..quant.packing import PackedMeta, pack_rows, pack_zeros, packed_words, scale_dtype_for
from ..quant.scales import encode_scales
from ..quant.spec import QuantSpec
from ..records import ActQuant, LayerResult
from .fake import fake_quant_act
from .outliers import OutlierCounter, outlier_columns, weight_columns

log = logging.getLogger(__name__)
WEIGHT_BUFFERS = ("qweight", "scales", "scale2", "qzeros", "lut", "g_idx", "fp_cols")  # stored weight bytes
KERNEL_BUFFERS = ("qweight", "scales", "scale2", "qzeros", "lut", "g_idx", "bias", "act_scale")
_REPORTED: set[tuple[str, str]] = set()  # (kernel, reason) pairs already logged
_UNSET = object()


class QuantLinear(nn.Module):
    """Buffers only: qweight int32 [out, words(in)], scales [out, n_groups] fp16/bf16 (or uint8 codes of two-level
    scales, with scale2 fp32 [out | 1, 1]; none for codebook formats, which store lut fp16 [out | 1, n_groups | 1, K]),
    qzeros int32 [words(out), n_groups] (asym), g_idx int32 [in] (act-order), bias, static act scale, fp outlier
    columns (LLM.int8()-style)."""

    def __init__(self, meta: PackedMeta, dtype: torch.dtype, act: ActQuant | None = None, bias: bool = False,
                 g_idx: bool = False, n_outliers: int = 0):
        super().__init__()
        self.meta, self.dtype, self.act = meta, dtype, act
        self.in_features, self.out_features = meta.in_features, meta.out_features
        n, k, g = meta.out_features, meta.in_features, meta.n_groups
        self.register_buffer("qweight", torch.zeros(n, packed_words(k, meta.bits), dtype=torch.int32))
        coding = meta.scale_coding
        sdtype = torch.uint8 if coding.coded else scale_dtype_for(dtype)
        self.register_buffer("scales", None if meta.lut_shape else torch.zeros(n, g, dtype=sdtype))
        s2_rows = {"channel": n, "tensor": 1}.get(coding.level2)
        self.register_buffer("scale2", torch.zeros(s2_rows, 1) if s2_rows else None)
        self.register_buffer("lut", torch.zeros(meta.lut_shape, dtype=torch.float16) if meta.lut_shape else None)
        self.register_buffer("qzeros", None if meta.sym else torch.zeros(packed_words(n, meta.bits), g,
                                                                         dtype=torch.int32))
        self.register_buffer("g_idx", torch.zeros(k, dtype=torch.int32) if g_idx else None)
        self.register_buffer("bias", torch.zeros(n, dtype=dtype) if bias else None)
        static = act is not None and act.static_scale is not None
        self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32) if static else None)
        self.register_buffer("outliers", torch.zeros(k, dtype=torch.bool) if n_outliers else None)
        self.register_buffer("fp_cols", torch.zeros(n, n_outliers, dtype=dtype) if n_outliers else None)
        self.mode = dispatch.act_mode(meta, act, g_idx)
        t = None if act is None else act.outlier_threshold
        self.outlier_counter = None if t is None else OutlierCounter(meta.in_features)  # LLM.int8(), per call
        self._chosen: dict[tuple, tuple[dispatch.Kernel, str]] = {}  # (device, dtype, backend) -> kernel, reason
        # decode calls: dispatch.plan_key -> (plan or None (the kernel has none for them), the buffers seen)
        self._plans: dict[tuple, tuple] = {}
        self._plannable = n_outliers == 0 and self.outlier_counter is None and self.mode.kind != "fake"

    @classmethod
    def from_result(cls, lin: nn.Linear, res: LayerResult) -> "QuantLinear":
        """Pack one method result (codes + qparams) for `lin`; the float weight is only read for outlier columns."""
        q, spec = res.weight, res.weight.spec
        w = lin.weight.data
        out_f, in_f = w.shape
        scale, zero = q.scale, q.zero
        if spec.granularity == "tensor":  # one qparam for the whole matrix -> one per row
            scale, zero = scale.reshape(1, 1).expand(out_f, 1), zero.reshape(1, 1).expand(out_f, 1)  # [out, 1]
        meta = PackedMeta(spec.format.code_bits(spec), spec.group_for(in_f), in_f, out_f, spec.sym,
                          qformat=spec.qformat, scale_bits=spec.scale_bits, scale_level2=spec.scale_level2,
                          lut_shape=None if q.lut is None else tuple(q.lut.shape))
        assert scale.shape == (out_f, meta.n_groups), f"scale {tuple(scale.shape)} != {(out_f, meta.n_groups)}"
        n_out = 0 if res.outliers is None else int(res.outliers.sum())
        m = cls(meta, w.dtype, res.act, lin.bias is not None, q.g_idx is not None, n_out)
        m.qweight.copy_(pack_rows(q.codes.reshape(out_f, in_f), meta.bits))  # codes [out, in] -> [out, words]
        if m.scales is not None:
            m.scales.copy_(encode_scales(scale, q.scale2, meta.scale_coding))
            if not meta.scale_coding.coded and not torch.isfinite(m.scales).all() and torch.isfinite(scale).all():
                raise NumericalError(f"packed {out_f}x{in_f} linear: a group scale of {scale.abs().max().item():.4g} "
                                     f"overflows {m.scales.dtype} storage (max {torch.finfo(m.scales.dtype).max:.6g});"
                                     f" allowed: weights within its range, or model.dtype=bfloat16 (bf16 scales)")
        if m.scale2 is not None:
            m.scale2.copy_(q.scale2.expand_as(m.scale2))
        if m.lut is not None:
            m.lut.copy_(q.lut)
        if m.qzeros is not None:
            m.qzeros.copy_(pack_zeros(zero, meta.bits))
        if m.g_idx is not None:
            m.g_idx.copy_(q.g_idx)
        if m.bias is not None:
            m.bias.copy_(lin.bias.data)
        if m.act_scale is not None:
            m.act_scale.copy_(res.act.static_scale.reshape(1))
        if n_out:
            m.outliers.copy_(res.outliers)
            m.fp_cols.copy_(w[:, res.outliers])
        return m.to(w.device)

    def _key(self, device: torch.device, dtype: torch.dtype) -> dispatch.LayerKey:
        return dispatch.LayerKey(self.meta, self.mode, device, dtype, self.g_idx is not None)

    def _kernel(self, device: torch.device, dtype: torch.dtype) -> tuple[dispatch.Kernel, str]:
        """The registry's choice for inputs on `device` in `dtype` (cached; reasons logged once)."""
        cache_key = (device, dtype, dispatch.backend())
        if cache_key not in self._chosen:
            kernel, why = dispatch.choose(self._key(device, dtype))
            if why and (kernel.name, why) not in _REPORTED:
                log.info("packed layers use %s: %s", kernel.label(self._key(device, dtype)), why)
                _REPORTED.add((kernel.name, why))
            self._chosen[cache_key] = (kernel, why)
        return self._chosen[cache_key]

    @property
    def kernel_name(self) -> str:
        """Kernel this layer runs with for inputs of its model dtype on its current device."""
        kernel, _ = self._kernel(self.qweight.device, self.dtype)
        label = kernel.label(self._key(self.qweight.device, self.dtype))
        return label + ("+fp_outliers" if self.outliers is not None else "") + \
            ("+dynamic_fp_outliers" if self.outlier_counter is not None else "")

    def _apply(self, fn, *args, **kwargs):
        """.to() / .cuda() / .half() replace the buffers: drop the plans that bound the old ones (and hold them)."""
        self._plans.clear()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:
        """Deep copies and pickles (torch.save of a module) carry the layer without its kernel choices and plans:
        a plan is a closure over this layer's buffers (a copy keeping it would compute with the original's weights)
        and neither pickles; the copy chooses and plans again at its first call."""
        state = self.__dict__.copy()
        state["_plans"], state["_chosen"] = {}, {}
        return state

    def _planned(self, x2: torch.Tensor) -> torch.Tensor | None:
        """y [M, out] through the kernel's plan for calls like x2 (built at the first, kept while the layer's
        buffers are the ones it bound), or None when the kernel has none."""
        key = dispatch.plan_key(x2)
        b = self._buffers
        bound = [b[k] for k in KERNEL_BUFFERS]  # the tensors a plan may have bound (or decided on: g_idx, act_scale)
        hit = self._plans.get(key, _UNSET)
        if hit is _UNSET or any(t is not u for t, u in zip(hit[1], bound)):
            kernel, _ = self._kernel(x2.device, x2.dtype)
            fn = None if kernel.plan is None else kernel.plan(x2, self.meta, b, self.mode)
            hit = self._plans[key] = (fn, bound)
        return None if hit[0] is None else hit[0](x2.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        # decode-sized calls through the kernel's plan where it has one (none inside launcher.jit_only())
        if self._plannable and x2.shape[0] <= dispatch.PLAN_MAX_M and launcher.cached():
            y = self._planned(x2)
            if y is not None:
                return y.reshape(*lead, self.out_features)
        b = self._buffers  # all registered buffers (None where absent); skips nn.Module.__getattr__ per name
        regular = x2 if b["outliers"] is None else x2.masked_fill(b["outliers"], 0)
        dyn = None
        if self.outlier_counter is not None:  # LLM.int8(): this call's outlier columns leave the int8 path
            dyn = outlier_columns(x2, self.act.outlier_threshold, self.outlier_counter)
            regular = regular.masked_fill(dyn, 0)
        if self.mode.kind == "fake":
            static = None if self.act_scale is None else self.act_scale.reshape(1, 1)  # [1, 1] per-tensor
            regular = fake_quant_act(regular, ActQuant(self.act.spec, static))
        bufs = {k: b[k] for k in KERNEL_BUFFERS}
        kernel, _ = self._kernel(x2.device, x2.dtype)
        y = kernel.run(regular, self.meta, bufs, self.mode)  # [M, out]
        if dyn is not None and bool(dyn.any()):
            y = y + F.linear(x2[:, dyn], weight_columns(self.meta, bufs, dyn).to(x2.dtype))
        if b["outliers"] is not None:
            y = y + F.linear(x2[:, b["outliers"]], b["fp_cols"])
        return y.reshape(*lead, self.out_features)  # [..., out]

    def weight_bytes(self) -> int:
        """Bytes of stored weight data (codes, qparams, group index, fp outlier columns; not bias)."""
        return sum(b.numel() * b.element_size() for k in WEIGHT_BUFFERS if (b := getattr(self, k)) is not None)

    def config(self) -> dict:
        """JSON-able description used by export (enough to rebuild the module before loading its buffers)."""
        act = None
        if self.act is not None:
            act = {"spec": asdict(self.act.spec), "static": self.act.static_scale is not None,
                   "outlier_threshold": self.act.outlier_threshold}
        return {**asdict(self.meta), "dtype": str(self.dtype).removeprefix("torch."), "act": act,
                "bias": self.bias is not None, "g_idx": self.g_idx is not None,
                "n_outliers": 0 if self.fp_cols is None else self.fp_cols.shape[1]}

    @classmethod
    def from_config(cls, c: dict) -> "QuantLinear":
        """Empty module with the buffers `config()` describes (filled by load_state_dict)."""
        lut = c.get("lut_shape")
        meta = PackedMeta(c["bits"], c["group"], c["in_features"], c["out_features"], c["sym"], c["layout"],
                          c.get("qformat", "int"), c.get("scale_bits"), c.get("scale_level2", "channel"),
                          None if lut is None else tuple(lut))
        act = None
        if c["act"] is not None:
            spec = {("qformat" if k == "fmt" else k): v for k, v in c["act"]["spec"].items()}  # v1 wrote "fmt"
            act = ActQuant(QuantSpec(**spec), torch.ones(1, 1) if c["act"]["static"] else None,
                           outlier_threshold=c["act"].get("outlier_threshold"))
        return cls(meta, getattr(torch, c["dtype"]), act, c["bias"], c["g_idx"], c["n_outliers"])

    def extra_repr(self) -> str:
        m = self.meta
        act = "a16" if self.act is None else f"a{self.act.spec.bits}-{'static' if self.act_scale is not None else 'dynamic'}"
        return (f"in={m.in_features}, out={m.out_features}, bits={m.bits}, qformat={m.qformat}, group={m.group}, "
                f"sym={m.sym}, {act}, "
                f"layout={m.layout}, act_order={self.g_idx is not None}, kernel={self.kernel_name}")


def build_packed(lin: nn.Linear, res: LayerResult) -> nn.Module:
    """swap_linears builder for modules=packed."""
    return QuantLinear.from_result(lin, res)


def packed_weight_bytes(model: nn.Module) -> int:
    """Measured bytes of all QuantLinear weight buffers in `model`."""
    return sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinear))
