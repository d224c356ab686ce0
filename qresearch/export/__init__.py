"""Export / reload of quantized models: our qresearch-packed format and compressed-tensors pack-quantized."""
from .compressed import save_compressed_tensors
from .packed import is_qresearch_checkpoint, load_quantized, save_quantized

__all__ = ["save_quantized", "load_quantized", "is_qresearch_checkpoint", "save_compressed_tensors"]
