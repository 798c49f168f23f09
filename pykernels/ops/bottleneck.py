"""Bottleneck adapters: typed function and fake implementations; the autograd is in
C++ (csrc/torch/bottleneck_autograd.cpp).

    out = residual + scale·(act(h·w_downᵀ + b_down)·w_upᵀ + b_up)

w_down: [m, d], w_up: [d, m] (nn.Linear layouts of the down and up projections),
act one of "relu", "gelu" (exact, erf: torch's default), "silu". ``residual``
is h itself for a serial adapter (Houlsby, Pfeiffer) or another tensor of h's
shape (the parallel placement: the FFN's output). The forward saves the [..., m]
pre-activation for the backward only when a gradient is needed.
"""
from __future__ import annotations

import torch

_ops = torch.ops.pykernels

ACTIVATIONS = ("relu", "gelu", "silu")


def bottleneck_adapter(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor,
                       w_up: torch.Tensor, b_up: torch.Tensor, act: str = "relu",
                       scale: float = 1.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + scale·(act(h·w_downᵀ + b_down)·w_upᵀ + b_up)`` over any leading
    dims of h; ``residual`` defaults to h. Differentiable in every tensor argument.
    fp32 / fp16 / bf16 run fused kernels; float64 is supported (for gradcheck)."""
    save_pre = torch.is_grad_enabled() and any(
        t.requires_grad for t in (h, w_down, b_down, w_up, b_up))
    return _ops.bottleneck_adapter(h, residual, w_down, b_down, w_up, b_up, act, scale,
                                   save_pre)[0]


# ---- fake (meta) implementations ----

@torch.library.register_fake("pykernels::bottleneck_adapter")
def _bottleneck_adapter_fake(h, residual, w_down, b_down, w_up, b_up, act, scale, save_pre):
    if act not in ACTIVATIONS:
        raise ValueError(f"bottleneck_adapter: act must be 'relu', 'gelu' or 'silu', got '{act}'")
    for name, t in (("residual", residual), ("w_down", w_down), ("b_down", b_down),
                    ("w_up", w_up), ("b_up", b_up)):
        if t is not None and t.device != h.device:
            raise ValueError(f"bottleneck_adapter: h is on {h.device} but {name} is on "
                             f"{t.device}; move them to one device")
    m = w_down.shape[0]
    pre = h.new_empty((*h.shape[:-1], m)) if save_pre else h.new_empty((0, m))
    return h.new_empty(h.shape), pre


@torch.library.register_fake("pykernels::bottleneck_adapter_backward")
def _bottleneck_adapter_backward_fake(grad_out, h, pre, w_down, w_up, act, scale, need_grad_h,
                                      add_grad_out):
    grad_h = h.new_empty(h.shape) if need_grad_h else None
    return (grad_h, w_down.new_empty(w_down.shape), w_down.new_empty((w_down.shape[0],)),
            w_up.new_empty(w_up.shape), w_up.new_empty((w_up.shape[0],)))
