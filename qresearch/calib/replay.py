"""Replay of final submodule outputs across the repeated forwards of one block.

Sequential calibration (true-sequential GPTQ) runs a block once per linear group and once more for its output. Once
a group is quantized, the outputs of its linears (and of a child module such as self_attn once all of its linears
are) no longer change: their inputs come from earlier, already final modules, and their weights are final. This
records each such output per calibration batch the first time it is computed with final weights, and returns it
instead of recomputing it in the block's later forwards. Same tensors as a recomputation (the ops are deterministic
on the same inputs), at the cost of keeping them in memory for the block's duration (`nbytes`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..models.arch import get_module


def _clone(out):
    """Detached copy of a module output (a tensor, or a tuple/list holding tensors and Nones)."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(v) for v in out)
    return out


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(v) for v in out)
    return 0


class Replay:
    """Outputs of a block's final submodules per batch. Candidates: each linear of `linears` and each direct child
    of the block that contains some of them (e.g. self_attn); a candidate is final once all its linears are."""

    def __init__(self, block: nn.Module, linears: list[str], n_batches: int):
        self.block, self.n_batches = block, n_batches
        self.members: dict[str, set[str]] = {n: {n} for n in linears}  # candidate -> its linears
        for name in linears:
            head = name.split(".")[0]
            if head != name:
                self.members.setdefault(head, set()).add(name)
        self.final: set[str] = set()
        self.cache: dict[str, list] = {}
        self.batch = -1

    def finalize(self, names: list[str]) -> None:
        """These linears now hold their final (quantized) weights in every later forward."""
        self.final |= set(names)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(o) for outs in self.cache.values() for o in outs)

    def _plan(self, record: bool) -> tuple[list[str], list[str]]:
        """(candidates to replay, candidates to record) in the next forward. Outer candidates first: a cached one
        covers its linears; inside one being recorded, its cached linears are replayed and the others computed."""
        replay, rec = [], []
        by_replay, by_record = set(), set()  # linears covered by an outer candidate replayed / recorded
        for name in sorted(self.members, key=lambda n: (n.count("."), n)):
            linears = self.members[name]
            if linears & by_replay or not linears <= self.final:
                continue
            if name in self.cache:
                replay.append(name)
                by_replay |= linears
            elif record and not linears & by_record:
                rec.append(name)
                by_record |= linears
        return replay, rec

    @contextlib.contextmanager
    def active(self, record: bool = True) -> Iterator[None]:
        """Within: final candidates return their cached outputs, or record them if not cached yet (`record`: there
        are later forwards to use them)."""
        replay, record = self._plan(record)
        fresh: dict[str, list] = {n: [] for n in record}
        handles = [self.block.register_forward_pre_hook(lambda *_: setattr(self, "batch", self.batch + 1))]
        patched: dict[str, tuple] = {}
        self.batch = -1
        try:
            for name in record:
                def hook(_m, _a, out, name=name):
                    fresh[name].append(_clone(out))
                handles.append(get_module(self.block, name).register_forward_hook(hook))
            for name in replay:
                mod = get_module(self.block, name)
                patched[name] = (mod, mod.__dict__.get("forward"))
                mod.forward = lambda *_a, name=name, **_k: _clone(self.cache[name][self.batch])
            yield
        finally:
            for h in handles:
                h.remove()
            for mod, fwd in patched.values():
                if fwd is None:
                    del mod.forward
                else:
                    mod.forward = fwd
        self._commit(fresh)

    def _commit(self, fresh: dict[str, list]) -> None:
        """Keep complete recordings (one output per batch); drop caches an outer cached candidate makes unused."""
        for name, outs in fresh.items():
            if len(outs) == self.n_batches:
                self.cache[name] = outs
        for name in list(self.cache):
            if any(o != name and name in self.members[o] and o in self.cache for o in self.members):
                del self.cache[name]
