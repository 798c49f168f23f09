"""Many bottleneck adapters at one site, each batch row picking its own (punica's
SGMV semantics over ops.bottleneck_adapter), as a typed function, fakes and autograd.

    out[i] = residual[i] + s_a·(act_a(h[i]·w_down[a]ᵀ + b_down[a])·w_up[a]ᵀ + b_up[a])
    out[i] = residual[i]   where a = ids[i] is -1

for batch row i of h [rows, ..., d] (all its tokens share the id). The adapters
come as lists (one entry per adapter, nn.Linear layouts: w_down [m_a, d], w_up
[d, m_a]), so each keeps its own bottleneck dim, activation and scale and no
weight is stacked or copied per call. One native call groups the rows by adapter
and runs the fused bottleneck pipeline on each group (csrc/torch/multi_bottleneck.cpp).

Gradients: h, residual and every adapter's weights and biases. An adapter no row
picked gets None (an optimizer step leaves it alone) in eager mode; under
torch.compile, where the ids hold no values while the graph is traced, it gets
zeros (the op's own result for it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from .bottleneck import ACTIVATIONS

_ops = torch.ops.pykernels


def multi_bottleneck(h: torch.Tensor, w_down: Sequence[torch.Tensor],
                     b_down: Sequence[torch.Tensor], w_up: Sequence[torch.Tensor],
                     b_up: Sequence[torch.Tensor], acts: Sequence[str], scales: Sequence[float],
                     ids: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + s·(act(h·w_downᵀ + b_down)·w_upᵀ + b_up)`` row by row of h with
    adapter ``ids[i]``'s weights, act and scale; ``residual`` defaults to h.

    ``ids``: int64 [rows] on h's device, each in [-1, n_adapters) (-1: the row is
    the residual). Differentiable in h, residual and every weight and bias.
    """
    w_down, b_down, w_up, b_up = list(w_down), list(b_down), list(w_up), list(b_up)
    save_pre = torch.is_grad_enabled() and any(
        t.requires_grad for t in (h, *w_down, *b_down, *w_up, *b_up))
    return _ops.multi_bottleneck(h, residual, w_down, b_down, w_up, b_up,
                                 [float(s) for s in scales], list(acts), ids, save_pre)[0]


def _max_bottleneck_dim(w_down) -> int:
    return max((w.shape[0] for w in w_down), default=0)


# ---- fake (meta) implementations ----

@torch.library.register_fake("pykernels::multi_bottleneck")
def _multi_bottleneck_fake(h, residual, w_down, b_down, w_up, b_up, scales, acts, ids, save_pre):
    for i, act in enumerate(acts):
        if act not in ACTIVATIONS:
            raise ValueError(f"multi_bottleneck: acts[{i}] must be 'relu', 'gelu' or 'silu', "
                             f"got '{act}'")
    named = [("residual", residual), ("ids", ids)] + [
        (f"{name}[{a}]", t) for name, ts in (("w_down", w_down), ("b_down", b_down),
                                             ("w_up", w_up), ("b_up", b_up))
        for a, t in enumerate(ts)]
    for name, t in named:
        if t is not None and t.device != h.device:
            raise ValueError(f"multi_bottleneck: h is on {h.device} but {name} is on "
                             f"{t.device}; move them to one device")
    if ids.dtype != torch.int64:
        raise TypeError(f"multi_bottleneck: ids must be int64, got {ids.dtype}")
    m = _max_bottleneck_dim(w_down)
    pre = h.new_empty((*h.shape[:-1], m)) if save_pre else h.new_empty((0, m))
    return h.new_empty(h.shape), pre


@torch.library.register_fake("pykernels::multi_bottleneck_backward")
def _multi_bottleneck_backward_fake(grad_out, h, pre, w_down, w_up, scales, acts, ids,
                                    need_grad_h, add_grad_out):
    grad_h = h.new_empty(h.shape) if need_grad_h else None
    return (grad_h, [w.new_empty(w.shape) for w in w_down],
            [w.new_empty((w.shape[0],)) for w in w_down], [w.new_empty(w.shape) for w in w_up],
            [w.new_empty((w.shape[0],)) for w in w_up])


# ---- autograd ----

def _setup_context(ctx, inputs, output):
    h, residual, w_down, b_down, w_up, b_up, scales, acts, ids, save_pre = inputs
    if any(t.requires_grad for t in (h, *w_down, *b_down, *w_up, *b_up)) and not save_pre:
        raise RuntimeError("multi_bottleneck: call with save_pre=True when a gradient is "
                           "needed (pykernels.ops.multi_bottleneck does)")
    ctx.save_for_backward(h, output[1], ids, *w_down, *w_up)
    ctx.n, ctx.scales, ctx.acts, ctx.residual_is_h = len(w_down), scales, acts, residual is None


def _picked(ids: torch.Tensor) -> Optional[set]:
    """The adapters some row picked, or None where the ids hold no values (while
    torch.compile traces). From a GPU: one small copy of the ids."""
    if torch.compiler.is_compiling() or is_fake(ids):
        return None
    return set(ids.tolist())


def _backward(ctx, grad_out, grad_pre):
    h, pre, ids, *weights = ctx.saved_tensors
    w_down, w_up = weights[:ctx.n], weights[ctx.n:]
    need = ctx.needs_input_grad
    grad_r = grad_out if need[1] and not ctx.residual_is_h else None
    need_weights = [any(pair) for pair in zip(need[2], need[3], need[4], need[5])]
    if not need[0] and not any(need_weights):
        return None, grad_r, [None] * ctx.n, [None] * ctx.n, [None] * ctx.n, [None] * ctx.n, \
            None, None, None, None
    grad_h, *grads = _ops.multi_bottleneck_backward(
        grad_out, h, pre, w_down, w_up, ctx.scales, ctx.acts, ids, need[0], ctx.residual_is_h)
    picked = _picked(ids)
    grads = [[g if wanted[a] and (picked is None or a in picked) else None
              for a, g in enumerate(gs)]
             for gs, wanted in zip(grads, need[2:6])]
    return (grad_h, grad_r, *grads, None, None, None, None)


torch.library.register_autograd("pykernels::multi_bottleneck", _backward,
                                setup_context=_setup_context)
