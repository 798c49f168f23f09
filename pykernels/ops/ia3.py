"""IA³ (peft semantics): learned vectors that rescale a frozen linear layer.

    output scaling (attention k, v)   y = (x·Wᵀ + b) ⊙ l,   l [out_features]
    input scaling  (FFN down-proj)    y = (x ⊙ l)·Wᵀ + b,   l [in_features]

The matmul stays with the matmul library (dense W) or the NF4 tile decoder;
these ops are what goes around it:

* ``ia3_scale(v, bias, l)`` = ``(v + bias) ⊙ l`` in one pass: the bias-and-scale
  epilogue of output scaling, or the input scaling of x before a dense matmul
  (scaling x, T×in, costs less than scaling W, out×in, whenever T < out).
* ``ia3_nf4_linear(x, <NF4 state>, l)`` = ``(x ⊙ l)·Wᵀ + b`` for an NF4 W: l is
  folded into every decoded tile of W (W·diag(l)), so x is never rescaled in
  memory (CPU and CUDA; with few tokens, where the fused kernels run, the few
  rows of x are scaled instead).

Gradients: ``ia3_scale`` gives ``grad_v = grad ⊙ l`` and
``grad_l = Σ_rows grad ⊙ (v + bias)`` in one pass (``ia3_scale_backward``); for
``ia3_nf4_linear``, ``g = grad·W`` (``nf4_linear_grad_input``), then
``grad_x = g ⊙ l`` and ``grad_l = Σ_rows x ⊙ g``. Sums are fp32; l may be any
float dtype (peft keeps it fp32 over a bf16 model) and is used in fp32. The
autograd is in C++ (csrc/torch/ia3_autograd.cpp).
"""
from __future__ import annotations

from typing import Optional

import torch

from .nf4 import NF4_DEFAULT_BLOCKSIZE, _check_same_device

_ops = torch.ops.pykernels


def ia3_scale(v: torch.Tensor, l: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(v + bias) ⊙ l`` over v's last dimension, in v's dtype (rounded once).

    v: ``[..., features]`` fp32/fp16/bf16/float64; l: ``[features]`` any float
    dtype; bias: ``[features]`` in v's dtype or None. Differentiable in v, l, bias.
    """
    return _ops.ia3_scale(v, bias, l)


def ia3_nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                   out_features: int, l: torch.Tensor, blocksize: int = NF4_DEFAULT_BLOCKSIZE,
                   bias: Optional[torch.Tensor] = None, absmax_scale: Optional[torch.Tensor] = None,
                   absmax_code: Optional[torch.Tensor] = None,
                   absmax_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x ⊙ l)·Wᵀ + bias`` with W stored as NF4 (state as in ``nf4_linear``),
    l ``[in_features]``. Differentiable in x, l and bias; W is frozen."""
    return _ops.ia3_nf4_linear(x, packed, absmax, blocksize, out_features, bias, absmax_scale,
                               absmax_code, absmax_offset, l)


# ---- fake (meta) implementations ----

def _check_l(op: str, l: torch.Tensor, features: int, what: str) -> None:
    if not l.dtype.is_floating_point:
        raise TypeError(f"{op}: l (the IA³ vector) must be a float tensor, got {l.dtype}")
    if l.dim() != 1 or l.shape[0] != features:
        raise ValueError(f"{op}: l (the IA³ vector) must have shape [{features}] ({what}), "
                         f"got {list(l.shape)}")


@torch.library.register_fake("pykernels::ia3_scale")
def _ia3_scale_fake(v, bias, l):
    _check_l("ia3_scale", l, v.shape[-1], "the last dimension of v")
    _check_same_device("ia3_scale", v=v, l=l, **({"bias": bias} if bias is not None else {}))
    return v.new_empty(v.shape)


@torch.library.register_fake("pykernels::ia3_scale_backward")
def _ia3_scale_backward_fake(grad, v, bias, l, need_grad_input):
    grad_input = v.new_empty(v.shape) if need_grad_input else None
    return grad_input, l.new_empty(l.shape)


@torch.library.register_fake("pykernels::ia3_nf4_linear")
def _ia3_nf4_linear_fake(x, packed, absmax, blocksize, out_features, bias, absmax_scale,
                         absmax_code, absmax_offset, l):
    _check_l("ia3_nf4_linear", l, x.shape[-1], "in_features, the last dimension of x")
    _check_same_device("ia3_nf4_linear", x=x, packed=packed, absmax=absmax, l=l)
    return x.new_empty((*x.shape[:-1], out_features))
