"""Decode with a static KV cache, one CUDA graph per decode step (what serving stacks do to remove launch overhead).

Eager HF decode is launch-bound at batch 1 (hundreds of kernel launches per token), which hides the weight-read
saving of packed kernels; replaying a captured step measures the kernels, not Python. On CPU (quick mode) the same
step runs eagerly, so the static-cache loop is exercised by the tests; the graph capture itself needs CUDA.
"""
from __future__ import annotations

import torch


def _static_cache(model, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


@torch.no_grad()
def graph_decode(model, device: torch.device, batch: int, prompt: int, steps: int, vocab: int,
                 repeats: int = 3) -> dict:
    """Median ms per decode step over `repeats` runs of `steps` greedy tokens after a `prompt`-token prefill."""
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(2)).to(device)
    cache = _static_cache(model, prompt + steps * (repeats + 1) + 4)
    out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device),
                use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)  # [B, 1]
    pos = torch.tensor([prompt], device=device)  # [1]

    def step():  # one greedy token: forward, next token, next position (all in place: graph-safe)
        logits = model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits
        tok.copy_(logits[:, -1:].argmax(-1))
        pos.add_(1)

    run = step
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (autotuning, lazy init)
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / steps)
        else:
            import time

            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            times.append((time.perf_counter() - t0) * 1e3 / steps)
    ms = sorted(times)[len(times) // 2]
    return {"ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms, "graph": device.type == "cuda", "batch": batch,
            "prompt_tokens": prompt, "steps": steps, "repeats": repeats}
