"""Sibling projections fused: packed linears that read the same input run as one packed layer.

A block's q/k/v projections read one hidden state, as do gate/up (the architecture table's `sequential` groups:
"a group's members see the same input"). Packed, each is one kernel call (and, for W8A8, one quantization of the
same input); fused, the group's output rows are concatenated into one QuantLinear, called once per input, and each
member returns its slice of that output. Every output row is the same dot product of the same stored codes and
qparams, so the outputs equal the unfused ones up to the summation order the kernel picks for the fused shape:
bit-identical where that order does not depend on the number of rows (the CPU kernels at one token), within float
rounding elsewhere.

Serving stacks fuse these projections for decode: fewer calls (224 -> 128 per Llama-7B token) and larger ones, which
read memory at a better rate. It is a runtime transform of packed models (`fuse_siblings`); exports write the
unfused layers, so a fused model is not exported.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.prepared import version
from ..quant.packing import PackedMeta, pack_zeros, unpack_zeros
from .packed import QuantLinear
from .swap import get_module, set_module


def why_not_fusable(layers: list[QuantLinear]) -> str | None:
    """None when these packed layers can run as one (same input features, format, qparam layout, activation
    quantization and dtype; no outlier columns); else why not."""
    for q in layers:
        if not isinstance(q, QuantLinear):
            return f"{type(q).__name__} is not a packed layer"
    first = layers[0]
    m0 = first.meta
    for q in layers:
        m = q.meta
        if (m.bits, m.group, m.in_features, m.sym, m.layout, m.qformat, m.scale_bits, m.scale_level2) != \
                (m0.bits, m0.group, m0.in_features, m0.sym, m0.layout, m0.qformat, m0.scale_bits, m0.scale_level2):
            return f"weight formats differ ({m0} vs {m})"
        if m.lut_shape is not None:
            return "codebook formats (per-layer palettes)"
        if q.scale2 is not None and q.scale2.shape[0] != m.out_features:
            return "a per-tensor second-level scale"
        if q.dtype != first.dtype or q.mode != first.mode:
            return "activation dtype or quantization mode differs"
        if (q.act is None) != (first.act is None) or (q.act is not None and q.act.spec != first.act.spec):
            return "activation quantization differs"
        if q.outliers is not None or q.outlier_counter is not None:
            return "outlier columns (LLM.int8()) are per layer"
        if (q.act_scale is None) != (first.act_scale is None) or (
                q.act_scale is not None and not torch.equal(q.act_scale, first.act_scale)):
            return "static activation scales differ"
        if (q.g_idx is None) != (first.g_idx is None) or (
                q.g_idx is not None and not torch.equal(q.g_idx, first.g_idx)):
            return "act-order group indices differ"
    return None


def concat_packed(layers: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear whose output rows are `layers`' rows in order (buffers on the layers' device)."""
    first, m0 = layers[0], layers[0].meta
    n = sum(q.meta.out_features for q in layers)
    meta = PackedMeta(m0.bits, m0.group, m0.in_features, n, m0.sym, m0.layout, m0.qformat, m0.scale_bits,
                      m0.scale_level2)
    has_bias = any(q.bias is not None for q in layers)
    fused = QuantLinear(meta, first.dtype, first.act, has_bias, first.g_idx is not None).to(first.qweight.device)
    fused.qweight.copy_(torch.cat([q.qweight for q in layers]))  # [n, words(in)]: rows are output features
    fused.scales.copy_(torch.cat([q.scales for q in layers]))  # [n, n_groups]
    if fused.scale2 is not None:
        fused.scale2.copy_(torch.cat([q.scale2 for q in layers]))  # [n, 1]
    if fused.qzeros is not None:  # zero codes are packed along `out`: unpack, concatenate, pack again
        zeros = torch.cat([unpack_zeros(q.qzeros, m0.bits, q.meta.out_features) for q in layers])  # [n, n_groups]
        fused.qzeros.copy_(pack_zeros(zeros, m0.bits))
    if fused.g_idx is not None:
        fused.g_idx.copy_(first.g_idx)
    if has_bias:
        fused.bias.copy_(torch.cat([q.bias if q.bias is not None else
                                    torch.zeros(q.meta.out_features, dtype=first.dtype, device=q.qweight.device)
                                    for q in layers]))
    if fused.act_scale is not None:
        fused.act_scale.copy_(first.act_scale)
    return fused


class FusedProduct(nn.Module):
    """The fused layer and its last call: `outputs(x)` runs it once per input tensor (same object, unmodified
    since) and returns each member's slice of the output (views). An inference-mode tensor keeps no version
    counter, so there "unmodified" is not checked: the siblings of a model's forward read their input unchanged."""

    def __init__(self, layer: QuantLinear, sizes: list[int]):
        super().__init__()
        self.layer, self.sizes = layer, sizes
        self._last: list | None = None  # [x, its version, slices, members served] of the last call

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        last = self._last
        if last is not None and last[0] is x and last[1] == version(x):
            last[3] += 1
            ys = last[2]
        else:
            ys = self.layer(x).split(self.sizes, dim=-1)  # [..., n_i] views of one [..., sum n_i]
            last = self._last = [x, version(x), ys, 1]
        if last[3] == len(self.sizes):  # every member served: hold no tensors between calls
            self._last = None
        return ys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class FusedSlice(nn.Module):
    """Stands where one member of a fused group stood: its slice of the group's product. The first member holds
    the product as a submodule (so `.to()`, memory counts and state dicts see it once); the others refer to it."""

    def __init__(self, product: FusedProduct, index: int, owner: bool):
        super().__init__()
        if owner:
            self.product = product
        else:
            object.__setattr__(self, "_shared", product)  # not a submodule: registered once, under the owner
        self.index = index
        self.in_features, self.out_features = product.layer.in_features, product.sizes[index]

    @property
    def fused(self) -> FusedProduct:
        return self._modules["product"] if "product" in self._modules else self.__dict__["_shared"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.outputs(x)[self.index]

    @property
    def kernel_name(self) -> str:
        return f"{self.fused.layer.kernel_name}+fused"

    def extra_repr(self) -> str:
        return f"out={self.out_features}, slice {self.index} of {len(self.fused.sizes)}"


def fuse_siblings(model: nn.Module, arch) -> dict[str, str]:
    """Fuse every sequential group of packed siblings in `model`'s blocks, in place (`arch`: the model's entry of
    the architecture table, models/arch.py: `blocks` path and `sequential` groups). Returns {member name: kernel}
    for the fused members and {'<block>.<group>': 'not fused: why'} for groups left as they were."""
    out = {}
    for i, block in enumerate(model.get_submodule(arch.blocks)):
        for group in arch.sequential:
            members = [(n, m) for n in group if (m := get_module(block, n)) is not None]
            if len(members) < 2:
                continue
            layers = [m for _, m in members]
            why = why_not_fusable(layers)
            label = f"{arch.blocks}.{i}.{'+'.join(n for n, _ in members)}"
            if why is not None:
                out[label] = f"not fused: {why}"
                continue
            product = FusedProduct(concat_packed(layers), [q.meta.out_features for q in layers])
            for j, (name, _) in enumerate(members):
                member = FusedSlice(product, j, owner=j == 0)
                set_module(block, name, member)
                out[f"{arch.blocks}.{i}.{name}"] = member.kernel_name
    return out


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FusedSlice) for m in model.modules())
