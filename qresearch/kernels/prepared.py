"""Per-layer derived weights (a kernel's own layout, a permuted copy) made once and kept while the layer's buffers
are unchanged: the cache holds each layer's qweight tensor weakly and stamps the buffers a value is made from
(tensor identity and in-place version), so module.to, a new tensor or load_state_dict's in-place copy makes the
next call rebuild it."""
from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..quant.packing import PackedMeta, pack_rows, unpack_rows

log = logging.getLogger(__name__)
STAMPED = ("qweight", "scales", "qzeros", "g_idx")  # the buffers a prepared value is made from
_PREPARED = WeakIdKeyDictionary()  # qweight tensor -> {key: (buffer stamps, value)}


def version(t: torch.Tensor | None) -> int | None:
    """A buffer's in-place version (None for no buffer; -1 for an inference-mode tensor, which keeps no counter
    and cannot be written outside inference mode)."""
    if t is None:
        return None
    return -1 if t.is_inference() else t._version  # (asking an inference tensor raises: ~25 us of C++ error)


def _stamp(t: torch.Tensor | None) -> tuple:
    """(weakref, in-place version) of a buffer."""
    return (None, None) if t is None else (weakref.ref(t), version(t))


def _fresh(stamps: tuple, bufs: dict) -> bool:
    return all((ref_ is None and t is None) or (ref_ is not None and ref_() is t and _stamp(t)[1] == version)
               for (ref_, version), t in zip(stamps, (bufs[k] for k in STAMPED)))


def cached(key, bufs: dict, make: Callable[[], object]):
    """make() for this layer (bufs: its buffers) and `key`, computed once while the STAMPED buffers are unchanged."""
    cache = _PREPARED.setdefault(bufs["qweight"], {})
    hit = cache.get(key)
    if hit is None or not _fresh(hit[0], bufs):
        hit = (tuple(_stamp(bufs[k]) for k in STAMPED), make())
        cache[key] = hit
    return hit[1]


def rebinding(bufs: dict, names: tuple[str, ...], bind: Callable[[], Callable]) -> Callable:
    """A call of bind()'s function, bound again whenever a buffer in `names` was written in place since (a plan's
    bound state follows load_state_dict; a replaced buffer is the plan owner's to notice: QuantLinear's plans)."""
    state = [None, None]  # [versions of the named buffers, bound function]

    def call(*args):
        versions = tuple([version(bufs.get(k)) for k in names])
        if versions != state[0]:
            state[:] = versions, bind()
        return state[1](*args)
    return call


def is_cached(qweight: torch.Tensor) -> bool:
    return qweight in _PREPARED


def _tensors(value) -> list[torch.Tensor]:
    """The tensors a prepared value holds (tensors, tuples / lists, dataclasses)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if dataclasses.is_dataclass(value):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    return []


def derived_bytes(model: torch.nn.Module) -> int:
    """Bytes the kernels hold for `model`'s packed layers beside their buffers (their own layouts, permuted copies,
    fp32 scales): storage shared with a layer's buffers is not counted, shared storage is counted once."""
    seen, total = set(), 0
    for m in model.modules():
        qweight = getattr(m, "qweight", None)
        if not isinstance(qweight, torch.Tensor) or qweight not in _PREPARED:
            continue
        own = {b.untyped_storage().data_ptr() for b in m.buffers(recurse=False)}
        for _, value in _PREPARED[qweight].values():
            for t in _tensors(value):
                st = t.untyped_storage()
                if st.data_ptr() not in own and st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
    return total


def act_order_perm(g_idx: torch.Tensor | None, meta: PackedMeta) -> tuple[torch.Tensor | None, str | None]:
    """(perm making groups contiguous or None without g_idx, reason when g_idx is not `group` columns a group).

    GPTQ act-order gives every group exactly `group` input columns (the last one the rest): sorting the columns
    by group then gives group k // group to column k, the plain layout, so a layer's codes with columns permuted
    once and its input with columns permuted per call (x[:, perm]) are a contiguous-group layer."""
    if g_idx is None:
        return None, None
    perm = torch.argsort(g_idx.long(), stable=True)
    want = torch.arange(meta.in_features) // meta.group  # sorted g_idx of a clean act-order layer
    if not torch.equal(g_idx.long().cpu()[perm.cpu()], want):
        return None, f"act-order g_idx does not give every group exactly {meta.group} columns"
    return perm, None


def permuted_act_order(meta: PackedMeta, bufs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(perm [K] int64, qweight [N, words] with columns in perm order) on the layer's device, made once per layer
    (the one extra copy of the packed weight); None when g_idx is not a clean act-order assignment."""
    def make():
        perm, why = act_order_perm(bufs["g_idx"], meta)
        if why:  # said once per layer (the None is cached too)
            log.warning("act-order layer %dx%d: %s, so it cannot be permuted to contiguous groups; triton_wq "
                        "gathers its scales and zeros per element", meta.out_features, meta.in_features, why)
            return None
        qw = bufs["qweight"]
        perm = perm.to(qw.device)
        return perm, pack_rows(unpack_rows(qw, meta.bits, meta.in_features)[:, perm], meta.bits)

    return cached("act_order_permuted", bufs, make)
