"""Kernels for packed quantized linears: `dispatch` picks one per layer (Triton on CUDA when supported, else the
pure-torch `reference`); `triton_wq` (W{2..8}A16 group-dequant GEMM + split-K decode) and `triton_w8a8`
(per-token int8 activation quantization + int8 GEMM) import triton lazily, only when chosen."""
