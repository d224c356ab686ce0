"""qresearch.kernels"""
