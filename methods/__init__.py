"""Quantization methods, one module each. Each is a `qresearch.method.Method` built by Hydra `_target_`."""
