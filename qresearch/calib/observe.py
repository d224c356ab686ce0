"""Collect input statistics of chosen linears with forward pre-hooks over calibration batches (static act quant)."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def feed_calibration(model: nn.Module, hooks: list, calib: torch.Tensor, device, batch_size: int = 8,
                     desc: str = "observe") -> None:
    """Run calib [n, seqlen] through the model in batches, then remove the hook handles (also on error)."""
    try:
        for i in tqdm(range(0, len(calib), batch_size), desc=desc, leave=False, disable=None):
            model(input_ids=calib[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def observe_inputs(model: nn.Module, linears: dict[str, nn.Linear], calib: torch.Tensor, make, device,
                   batch_size: int = 8) -> dict:
    """Run calib [n, seqlen] through the model; feed each linear's input [.., in] to its own observer make()."""
    observers = {name: make() for name in linears}
    hooks = [lin.register_forward_pre_hook(lambda _m, args, n=name: observers[n].update(args[0].reshape(-1, args[0].shape[-1])))
             for name, lin in linears.items()]
    feed_calibration(model, hooks, calib, device, batch_size)
    return observers
