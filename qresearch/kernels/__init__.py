"""Kernels for packed quantized linears: `dispatch` picks one per layer (Triton on CUDA when supported, else the
pure-torch `reference`; on CPU the low-bit kernels of `cpu_packed`, registered on import here); `triton_wq` (W{2..8}A16 group-dequant GEMM + split-K decode) and `triton_w8a8`
(per-token int8 activation quantization + int8 GEMM) import triton lazily, only when chosen."""

from . import cpu_packed  # noqa: E402,F401 - registers the CPU kernels (backend "cpu") in dispatch.KERNELS
