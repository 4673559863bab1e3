"""Triton kernels, each file with its PyTorch reference, autograd support and dispatch."""
