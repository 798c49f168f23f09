"""LoRA over a dense base: typed functions, fake implementations, autograd.

    y = x·Wᵀ + b + scale·(drop(x)·Aᵀ)·Bᵀ,   lora_A: [r, in], lora_B: [out, r]

peft semantics: scale = alpha / r (rsLoRA: alpha / √r); dropout applies to x
before A only, the base sees x undropped. W and b are frozen: asking autograd
for their gradients raises. Dropout draws no random state: element (row, col) of
x flattened to [T, in] is kept by a hash of (seed, row, col) (csrc/include/
pykernels/dropout.h), so the backward regenerates the forward's mask from the
seed and ``lora_dropout_mask`` shows it.
"""
from __future__ import annotations

import torch

_ops = torch.ops.pykernels


def _seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor(seed, dtype=torch.int64)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                dropout_p: float = 0.0, seed: int | torch.Tensor = 0) -> torch.Tensor:
    """``x·Wᵀ + b + scale·(drop(x)·lora_Aᵀ)·lora_Bᵀ`` over any leading dims of x.

    Differentiable in x, lora_A and lora_B. ``seed`` (an int, or an int64 scalar
    tensor on the CPU) picks the dropout mask; a training loop passes a fresh one
    per step. fp32 / fp16 / bf16 run fused kernels; float64 is supported (slower,
    for gradcheck).
    """
    return _ops.lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p, _seed_tensor(seed))[0]


def lora_merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``weight += scale·lora_B·lora_A`` in place, in one pass (the delta summed in
    fp32, added with one rounding); ``-scale`` unmerges. Returns ``weight``."""
    _ops.lora_merge_(weight, lora_A, lora_B, scale)
    return weight


def lora_dropout_mask(shape, p: float, seed: int | torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The multiplier lora_linear applies to an input of ``shape`` for this seed:
    ``1 / (1 - p)`` (rounded to fp32) where kept, 0 where dropped."""
    shape = tuple(shape)
    cols = shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    keep = _ops.lora_dropout_mask(_seed_tensor(seed), rows, cols, p).reshape(shape)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    return (keep.to(torch.float32) * scale).to(dtype)


# ---- fake (meta) implementations ----

@torch.library.register_fake("pykernels::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != x.device:
            raise ValueError(f"lora_linear: x is on {x.device} but {name} is on {t.device}; "
                             "move them to one device")
    lead = x.shape[:-1]
    return x.new_empty((*lead, weight.shape[0])), x.new_empty((*lead, lora_A.shape[0]))


@torch.library.register_fake("pykernels::lora_linear_backward")
def _lora_linear_backward_fake(grad_out, grad_xa, x, weight, lora_A, lora_B, xa, scale,
                               dropout_p, seed, need_grad_x):
    grad_x = x.new_empty(x.shape) if need_grad_x else None
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


@torch.library.register_fake("pykernels::lora_merge_")
def _lora_merge_fake(weight, lora_A, lora_B, scale):
    return None


@torch.library.register_fake("pykernels::lora_dropout_mask")
def _lora_dropout_mask_fake(seed, rows, cols, p):
    return seed.new_empty((rows, cols), dtype=torch.bool)


# Autograd: csrc/torch/lora_autograd.cpp (in C++: the Python registration cost
# ~80 us a layer and step).
