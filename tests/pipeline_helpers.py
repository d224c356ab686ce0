"""Shared helpers for the calibration-engine / GPTQ / AWQ tests: tiny random models and the stories260K path."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("QRESEARCH_SHARED", REPO.parent / "shared"))


def stories260k():
    """The trained stories260K model (skips the test when ../shared is absent)."""
    from transformers import AutoModelForCausalLM

    path = shared_dir() / "models" / "stories260K"
    if not (path / "config.json").is_file():
        pytest.skip(f"stories260K not found at {path} (set QRESEARCH_SHARED)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
TINY = {
    "llama": dict(intermediate_size=96, num_key_value_heads=2),
    "mistral": dict(intermediate_size=96, num_key_value_heads=2),
    "qwen2": dict(intermediate_size=96, num_key_value_heads=2),
    "llama_mha": dict(model_type="llama", intermediate_size=96, num_key_value_heads=4),  # v->o pair applies
    "opt": dict(ffn_dim=96, word_embed_proj_dim=64, do_layer_norm_before=True),
    "gpt_neox": dict(intermediate_size=96, rotary_pct=0.5),
    "phi3": dict(intermediate_size=96, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def tiny_model(kind: str, seed: int = 0):
    """A randomly initialised tiny model of one architecture (float32, eval mode). Norm weights are randomised so
    scale folding is tested on non-trivial values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY[kind])
    model_type = kw.pop("model_type", kind)
    if model_type == "opt":
        kw.update(ffn_dim=kw.pop("ffn_dim"))
    cfg = AutoConfig.for_model(model_type, **_COMMON, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    model.config.use_cache = False
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model
