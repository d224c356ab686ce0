"""Export of quantized models: our qresearch-packed format (reloaded by qresearch.models.checkpoint) and
compressed-tensors pack-quantized. `export_model` is the one entry the runner calls."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models.checkpoint import is_qresearch_checkpoint, load_quantized
from .compressed import save_compressed_tensors
from .packed import save_quantized

EXPORTS = {"qresearch": save_quantized, "compressed_tensors": save_compressed_tensors}

__all__ = ["EXPORTS", "export_model", "save_quantized", "load_quantized", "is_qresearch_checkpoint",
           "save_compressed_tensors"]


def export_model(kind: str, model: nn.Module, tokenizer, path: Path, source: dict | None = None) -> dict:
    """Write the packed model in export format `kind` to `path`; returns what was written. `source`: the run
    that writes it, recorded as config.json's "qresearch_source" (a run that reloads the export reports it)."""
    EXPORTS[kind](model, path, tokenizer, source=source)
    size = sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))
    return {"format": kind, "path": str(path), "safetensors_bytes": size}
