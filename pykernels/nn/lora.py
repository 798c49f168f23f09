"""LoRALinear: a frozen nn.Linear plus a trainable low-rank adapter, on the fused op.

    y = base_layer(x) + scaling·lora_B(lora_A(dropout(x))),   scaling = alpha / r
                                                               (rsLoRA: alpha / √r)

The same layer as peft's ``lora.Linear`` (one adapter): the same init (A
kaiming-uniform with a = √5, B zeros, so a new adapter changes nothing), the same
scaling and dropout placement, and state_dict keys a peft checkpoint uses
(``base_layer.weight``, ``base_layer.bias``, ``lora_A.weight``, ``lora_B.weight``).
The forward is one op (ops.lora_linear): the adapter is added into the base
output in place and dropout never materializes a dropped copy of x.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops


class LoRALinear(nn.Module):
    """LoRA adapter of rank ``r`` around ``base_layer`` (an nn.Linear, frozen in
    place and shared, not copied).

    ``merge()`` folds ``scaling·B·A`` into the base weight (the forward is then the
    plain linear, no adapter math) and ``unmerge()`` takes it out again, to within
    an ulp of the merged value. Dropout acts in training mode only, with a fresh
    seed drawn from torch's generator on every forward (``torch.manual_seed``
    makes runs repeatable).
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear: base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if r < 1:
            raise ValueError(f"LoRALinear: r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear: dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer.requires_grad_(False)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        self.r = r
        self.alpha = alpha
        self.dropout = dropout
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False) -> "LoRALinear":
        """Wraps ``linear`` with a new adapter (peft's defaults: r=8, alpha=16)."""
        return cls(linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if self.merged:
            return nn.functional.linear(x, weight, bias)
        p = self.dropout if self.training else 0.0
        if p > 0.0:
            seed = torch.randint(2**63 - 1, (), dtype=torch.int64)
        else:
            seed = torch.zeros((), dtype=torch.int64)
        return ops.lora_linear(x, weight, bias, self.lora_A.weight, self.lora_B.weight,
                               self.scaling, p, seed)

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling·B·A in place (one pass, summed in fp32, rounded once)."""
        if not self.merged:
            ops.lora_merge_(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight,
                            self.scaling)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= scaling·B·A: the same fp32 delta merge() added."""
        if self.merged:
            ops.lora_merge_(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight,
                            -self.scaling)
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}")
