"""Multi-LoRA: many adapters resident in one layer, each batch row picking its own
(punica's BGMV / SGMV semantics), as typed functions and fakes; the autograd is
in C++ (csrc/torch/lora_autograd.cpp).

    y[i] = base[i] + scales[id[i]]·(drop(x[i])·A[id[i]]ᵀ)·B[id[i]]ᵀ    (id[i] = -1: base[i])

for batch row i of x [rows, ..., in] (all its tokens share the id). The adapters
are stacked: lora_A [n, r, in], lora_B [n, out, r], scales [n] fp32 (alpha / r,
or alpha / √r for rsLoRA, per adapter). ``base`` is the base layer's output for x
(a dense or an NF4 linear), computed by its own op: its gradient flows there.
Each adapter's rows run as one skinny product (the rows grouped by adapter, never
gathered); dropout is lora_linear's hashed mask over x flattened to [T, in].
Gradients: x (the adapters' part), lora_A and lora_B (zeros for adapters no row
picked); scales and ids get none.
"""
from __future__ import annotations

import torch

from .lora import _seed_tensor

_ops = torch.ops.pykernels


def multi_lora(x: torch.Tensor, base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               scales: torch.Tensor, ids: torch.Tensor, dropout_p: float = 0.0,
               seed: int | torch.Tensor = 0) -> torch.Tensor:
    """``base + scales[id]·(drop(x)·lora_A[id]ᵀ)·lora_B[id]ᵀ`` row by row of x.

    ``ids``: int64 [rows] on x's device, each in [-1, n_adapters). Differentiable
    in x, base, lora_A and lora_B.
    """
    return _ops.multi_lora(x, base, lora_A, lora_B, scales, ids, dropout_p, _seed_tensor(seed))[0]


@torch.library.register_fake("pykernels::multi_lora")
def _multi_lora_fake(x, base, lora_A, lora_B, scales, ids, dropout_p, seed):
    for name, t in (("base", base), ("lora_A", lora_A), ("lora_B", lora_B), ("scales", scales),
                    ("ids", ids)):
        if t.device != x.device:
            raise ValueError(f"multi_lora: x is on {x.device} but {name} is on {t.device}; "
                             "move them to one device")
    if ids.dtype != torch.int64:
        raise TypeError(f"multi_lora: ids must be int64, got {ids.dtype}")
    return torch.empty_like(base), x.new_empty((*x.shape[:-1], lora_A.shape[1]))


@torch.library.register_fake("pykernels::multi_lora_backward")
def _multi_lora_backward_fake(grad_out, x, lora_A, lora_B, scales, ids, xa, dropout_p, seed,
                              need_grad_x):
    grad_x = x.new_empty(x.shape) if need_grad_x else None
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)
