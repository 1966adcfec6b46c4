"""Fused training kernels: the binary sign with its surrogate gradients as one torch.library op
(C++ on CPU, Triton on CUDA, PyTorch's ops as the fallback); see sign.py."""

from .sign import MODES, binary_sign, grad_torch, sign_torch

__all__ = ["MODES", "binary_sign", "grad_torch", "sign_torch"]
