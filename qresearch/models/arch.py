"""Architecture facts as data: where blocks are, what runs before them, which op feeds which linears.

Adding a model family = adding an entry to ARCHS. Methods never branch on model classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from ..nn.swap import get_module  # noqa: F401 - the table's lookups (re-exported: callers import it from here)


@dataclass(frozen=True)
class ScalePair:
    """`prev` (a norm or linear inside the block) feeds `linears`; a per-input-channel scale s can be folded as
    prev.out /= s, linear.in *= s (AWQ, SmoothQuant). `kind` says how prev is rescaled: 'norm' or 'linear'."""

    prev: str
    linears: tuple[str, ...]
    kind: str = "norm"
    inspect: str | None = None  # submodule whose output AWQ's grid search compares (None: the whole block)


@dataclass(frozen=True)
class ArchInfo:
    model_type: str
    blocks: str  # dotted path of the ModuleList of decoder blocks
    pre: tuple[str, ...]  # modules that run before block 0 (embeddings, positions, rotary)
    post: tuple[str, ...]  # modules after the last block (final norm, head)
    # linears in execution order, grouped: a group's members see the same input (true-sequential GPTQ order)
    sequential: tuple[tuple[str, ...], ...]
    pairs: tuple[ScalePair, ...] = field(default=())
    rotary: str | None = None  # model-level rotary module whose output blocks take as position_embeddings
    no_clip: tuple[str, ...] = ()  # linears AWQ does not clip (q/k: their error is amplified by the q.k product)


_LLAMA = dict(
    blocks="model.layers",
    pre=("model.embed_tokens", "model.rotary_emb"),
    post=("model.norm", "lm_head"),
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    pairs=(ScalePair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     inspect="self_attn"),
           ScalePair("self_attn.v_proj", ("self_attn.o_proj",), "linear"),  # only when v and o shapes match
           ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
           ScalePair("mlp.up_proj", ("mlp.down_proj",), "linear")),
    rotary="model.rotary_emb",
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

ARCHS: dict[str, ArchInfo] = {
    "llama": ArchInfo("llama", **_LLAMA),
    "mistral": ArchInfo("mistral", **_LLAMA),
    "qwen2": ArchInfo("qwen2", **_LLAMA),
    "opt": ArchInfo(
        "opt",
        blocks="model.decoder.layers",
        pre=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
        post=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
        sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                    ("fc1",), ("fc2",)),
        pairs=(ScalePair("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         inspect="self_attn"),
               ScalePair("self_attn.v_proj", ("self_attn.out_proj",), "linear"),
               ScalePair("final_layer_norm", ("fc1",)),
               ScalePair("fc1", ("fc2",), "linear")),  # ReLU between is positively homogeneous
        no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    ),
    "gpt_neox": ArchInfo(
        "gpt_neox",
        blocks="gpt_neox.layers",
        pre=("gpt_neox.embed_in", "gpt_neox.rotary_emb"),
        post=("gpt_neox.final_layer_norm", "embed_out"),
        sequential=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                    ("mlp.dense_4h_to_h",)),
        pairs=(ScalePair("input_layernorm", ("attention.query_key_value",), inspect="attention"),
               ScalePair("post_attention_layernorm", ("mlp.dense_h_to_4h",), inspect="mlp")),  # GELU: no fc1->fc2 pair
        rotary="gpt_neox.rotary_emb",
    ),
    "phi3": ArchInfo(  # fused qkv and gate_up; up is half of gate_up, so there is no up -> down pair
        "phi3",
        blocks="model.layers",
        pre=("model.embed_tokens", "model.rotary_emb"),
        post=("model.norm", "lm_head"),
        sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        pairs=(ScalePair("input_layernorm", ("self_attn.qkv_proj",), inspect="self_attn"),
               ScalePair("post_attention_layernorm", ("mlp.gate_up_proj",), inspect="mlp")),
        rotary="model.rotary_emb",
    ),
}


def arch_for(model: nn.Module) -> ArchInfo:
    """The table entry for a HF model; a clear error names the class and the table to extend."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ARCHS:
        raise ConfigError(f"architecture {type(model).__name__} (model_type={mt!r}) is not in the table; "
                          f"supported: {', '.join(sorted(ARCHS))} (extend qresearch/models/arch.py ARCHS)")
    return ARCHS[mt]


def blocks_of(model: nn.Module, arch: ArchInfo) -> nn.ModuleList:
    blocks = get_module(model, arch.blocks)
    assert isinstance(blocks, nn.ModuleList), f"{arch.blocks} is not a ModuleList in {type(model).__name__}"
    return blocks


def block_linears(block: nn.Module, arch: ArchInfo) -> dict[str, nn.Linear]:
    """Linears of a block in the table's execution order (names relative to the block)."""
    out = {}
    for group in arch.sequential:
        for name in group:
            mod = get_module(block, name)
            if isinstance(mod, nn.Linear):
                out[name] = mod
    return out


def present_groups(block: nn.Module, arch: ArchInfo) -> list[list[str]]:
    """The table's sequential groups, restricted to the linears this block has (empty groups dropped)."""
    groups = [[n for n in grp if isinstance(get_module(block, n), nn.Linear)] for grp in arch.sequential]
    return [g for g in groups if g]


def quantizable_linears(model: nn.Module, arch: ArchInfo) -> dict[str, nn.Linear]:
    """All linears inside decoder blocks, by full module name. lm_head / embeddings are not included."""
    out = {}
    for i, block in enumerate(blocks_of(model, arch)):
        for name, mod in block_linears(block, arch).items():
            out[f"{arch.blocks}.{i}.{name}"] = mod
    return out


def target_linears(model: nn.Module, arch: ArchInfo, lm_head: bool = False) -> dict[str, nn.Linear]:
    """Linears a weight method quantizes: every block linear, plus the output head when asked."""
    out = quantizable_linears(model, arch)
    head = arch.post[-1]
    if lm_head and isinstance(get_module(model, head), nn.Linear):
        out[head] = get_module(model, head)
    return out


def _heads_dim(c: dict) -> int:
    return c["num_attention_heads"] * (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])


# in_features of each block linear, from the HF config alone (pre-flight checks before a model loads)
_IN_FEATURES = {
    "llama": lambda c: {"self_attn.q_proj": c["hidden_size"], "self_attn.k_proj": c["hidden_size"],
                        "self_attn.v_proj": c["hidden_size"], "self_attn.o_proj": _heads_dim(c),
                        "mlp.gate_proj": c["hidden_size"], "mlp.up_proj": c["hidden_size"],
                        "mlp.down_proj": c["intermediate_size"]},
    "opt": lambda c: {"self_attn.q_proj": c["hidden_size"], "self_attn.k_proj": c["hidden_size"],
                      "self_attn.v_proj": c["hidden_size"], "self_attn.out_proj": c["hidden_size"],
                      "fc1": c["hidden_size"], "fc2": c["ffn_dim"]},
    "gpt_neox": lambda c: {"attention.query_key_value": c["hidden_size"], "attention.dense": c["hidden_size"],
                           "mlp.dense_h_to_4h": c["hidden_size"], "mlp.dense_4h_to_h": c["intermediate_size"]},
    "phi3": lambda c: {"self_attn.qkv_proj": c["hidden_size"], "self_attn.o_proj": _heads_dim(c),
                       "mlp.gate_up_proj": c["hidden_size"], "mlp.down_proj": c["intermediate_size"]},
}
_IN_FEATURES["mistral"] = _IN_FEATURES["qwen2"] = _IN_FEATURES["llama"]


def linear_in_features(model_config: dict) -> dict[str, int]:
    """{block linear (relative name): in_features} of an architecture in ARCHS, from its config dict."""
    mt = model_config.get("model_type")
    if mt not in _IN_FEATURES:
        raise ConfigError(f"model_type={mt!r} is not in the table; supported: {', '.join(sorted(_IN_FEATURES))}")
    return _IN_FEATURES[mt](model_config)
