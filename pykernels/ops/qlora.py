"""QLoRA: a LoRA adapter over an NF4 base layer, as one op with autograd.

    y = x·Wᵀ + b + scale·(drop(x)·Aᵀ)·Bᵀ,   W [out, in] stored as NF4 (frozen)

The base is computed as ``nf4_linear`` computes it (fused kernels for few
tokens, W decoded tile by tile for many: never a dense copy of W, forward or
backward); the adapter and its dropout exactly as ``lora_linear`` does. The
weight's state is an ``NF4Tensor``'s (plain fp32 absmax or double-quantized).
"""
from __future__ import annotations

from typing import Optional

import torch

from .lora import _seed_tensor
from .nf4 import _check_same_device

_ops = torch.ops.pykernels


def qlora_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, out_features: int,
                 blocksize: int, bias: Optional[torch.Tensor], absmax_scale: Optional[torch.Tensor],
                 absmax_code: Optional[torch.Tensor], absmax_offset: Optional[torch.Tensor],
                 lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                 dropout_p: float = 0.0, seed: int | torch.Tensor = 0) -> torch.Tensor:
    """Differentiable in x, lora_A and lora_B (and nothing of the NF4 base)."""
    return _ops.qlora_linear(x, packed, absmax, blocksize, out_features, bias, absmax_scale,
                             absmax_code, absmax_offset, lora_A, lora_B, scale, dropout_p,
                             _seed_tensor(seed))[0]


# ---- fake (meta) implementations ----

@torch.library.register_fake("pykernels::qlora_linear")
def _qlora_linear_fake(x, packed, absmax, blocksize, out_features, bias, absmax_scale,
                       absmax_code, absmax_offset, lora_A, lora_B, scale, dropout_p, seed):
    _check_same_device("qlora_linear", x=x, packed=packed, absmax=absmax, lora_A=lora_A,
                       lora_B=lora_B)
    lead = x.shape[:-1]
    return x.new_empty((*lead, out_features)), x.new_empty((*lead, lora_A.shape[0]))


@torch.library.register_fake("pykernels::qlora_linear_backward")
def _qlora_linear_backward_fake(grad_out, grad_xa, x, packed, absmax, blocksize, absmax_scale,
                                absmax_code, absmax_offset, lora_A, lora_B, xa, scale, dropout_p,
                                seed, need_grad_x):
    grad_x = x.new_empty(x.shape) if need_grad_x else None
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


# Autograd: csrc/torch/lora_autograd.cpp (in C++: the Python registration cost
# ~80 us a layer and step).
