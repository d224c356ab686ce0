"""Pre-flight check of an export request against what the export format can express (no model needed).

    check_exportable("compressed_tensors", hf_config_dict, group_size=128, act_order=False, static_groups=False,
                     act_bits=16, bits=4)

raises a one-line ConfigError before any model loads (the same limits save_compressed_tensors enforces per layer
when it writes; see export/compressed.py).
"""
from __future__ import annotations

from ..models.arch import linear_in_features
from ..quant.packing import PACK_BITS
from ..errors import ConfigError

EXPORTS = ("qresearch", "compressed_tensors")


def check_exportable(kind: str, model_config: dict, group_size: int, act_order: bool = False,
                     static_groups: bool = False, act_bits: int = 16, bits: int = 4, lm_head: bool = False) -> None:
    """None when `kind` can store this quantization of this model; ConfigError naming the obstacle otherwise."""
    if kind not in EXPORTS:
        raise ConfigError(f"export={kind!r} is unknown; allowed: null, {', '.join(EXPORTS)}")
    if bits not in PACK_BITS:
        raise ConfigError(f"export={kind} writes packed integer weights; bits={bits} packs nothing "
                          f"(allowed: {PACK_BITS[0]}..{PACK_BITS[-1]})")
    if kind == "qresearch":
        return  # our format stores partial groups, act-order indices and activation settings as they are
    fix = "use export=qresearch (our format), or change the setting"
    if act_bits < 16:
        raise ConfigError(f"export=compressed_tensors is weight-only (pack-quantized); act_bits={act_bits} "
                          f"quantizes activations; {fix}")
    if act_order and not static_groups:
        raise ConfigError("export=compressed_tensors cannot apply act-order group indices (act_order=true needs "
                          f"static_groups=true, which keeps groups contiguous); {fix}")
    if group_size == -1:
        return
    sizes = dict(linear_in_features(model_config))
    if lm_head:
        sizes["lm_head"] = model_config["hidden_size"]
    partial = {n: k for n, k in sizes.items() if group_size < k and k % group_size}
    if partial:
        name, k = sorted(partial.items())[0]
        raise ConfigError(f"export=compressed_tensors needs in_features divisible by group_size={group_size}; "
                          f"{name} has in_features={k} (a partial last group"
                          + (f"; also {', '.join(sorted(partial)[1:])}" if len(partial) > 1 else "")
                          + "); use a group_size that divides it, group_size=-1, or export=qresearch")
