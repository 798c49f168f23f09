"""QLoRALinear: a LoRA adapter over a frozen NF4 base layer (QLoRA).

    y = base(x) + scaling·lora_B(lora_A(dropout(x))),   base: NF4Linear

The forward is one op (ops.qlora_linear): the base never decodes the whole of W
(fused kernels for few tokens, one tile at a time for many) and the adapter is
added into its output in place. The adapter's weights may be kept in fp32 while
the layer runs in bf16: they are cast to the input's dtype per call, and their
gradients come back in their own dtype.

Merging, and why deployment should merge into a dense weight:
- ``merge()`` / ``unmerge()`` switch the layer to a dense merged weight (W
  decoded from NF4 plus scaling·B·A) and back. The NF4 state is never touched,
  so unmerge is exact.
- ``merged_linear()`` returns that merged weight as an ``nn.Linear``: the model
  you trained, exactly (the adapter learned to correct the *decoded* NF4 W), at
  the cost of a dense weight. This is the right way to deploy a QLoRA adapter.
- ``merged_nf4()`` requantizes the merged weight to NF4 and reports the error that
  adds. The adapter's update is usually far smaller than an NF4 step
  (absmax·~0.08 per code), so requantizing rounds most of it away and adds a fresh
  quantization error on top: it keeps 4-bit memory but not the trained behaviour.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..nf4 import NF4Tensor
from .nf4 import NF4Linear


class QLoRALinear(nn.Module):
    def __init__(self, base_layer: NF4Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, adapter_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(base_layer, NF4Linear):
            raise TypeError(f"QLoRALinear: base_layer must be an NF4Linear, got {type(base_layer).__name__}")
        if r < 1:
            raise ValueError(f"QLoRALinear: r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"QLoRALinear: dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer.requires_grad_(False)
        factory = {"device": base_layer.packed.device,
                   "dtype": adapter_dtype or base_layer.weight_dtype}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.register_buffer("merged_weight", None, persistent=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False, blocksize: int = ops.NF4_DEFAULT_BLOCKSIZE,
                    double_quant: bool = True, adapter_dtype: Optional[torch.dtype] = None):
        """Quantizes ``linear`` to NF4 (as bitsandbytes would) and adds a new adapter."""
        base = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant)
        return cls(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                   adapter_dtype=adapter_dtype)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def merged(self) -> bool:
        return self.merged_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        bias = base.bias if base.bias is None or base.bias.dtype == x.dtype else base.bias.to(x.dtype)
        if self.merged:
            return nn.functional.linear(x, self.merged_weight.to(x.dtype), bias)
        p = self.dropout if self.training else 0.0
        seed = (torch.randint(2**63 - 1, (), dtype=torch.int64) if p > 0.0
                else torch.zeros((), dtype=torch.int64))
        return ops.qlora_linear(x, base.packed, base.absmax, base.out_features, base.blocksize,
                                bias, base.absmax_scale, base.absmax_code, base.absmax_offset,
                                self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype),
                                self.scaling, p, seed)

    @torch.no_grad()
    def merged_dense_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Decoded W + scaling·B·A, in ``dtype`` (the base's weight dtype by default)."""
        dtype = dtype or self.base_layer.weight_dtype
        weight = self.base_layer.dequantize(dtype)
        ops.lora_merge_(weight, self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype),
                        self.scaling)
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """Run on a dense merged weight (costs a dense copy of W) until unmerge()."""
        if not self.merged:
            self.merged_weight = self.merged_dense_weight()

    def unmerge(self) -> None:
        """Back to NF4 + adapter; exact, since the NF4 state was never changed."""
        self.merged_weight = None

    @torch.no_grad()
    def merged_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """The deployment form: an nn.Linear holding decoded W + scaling·B·A."""
        weight = self.merged_dense_weight(dtype)
        bias = self.base_layer.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear.requires_grad_(False)

    @torch.no_grad()
    def merged_nf4(self, blocksize: Optional[int] = None,
                   double_quant: Optional[bool] = None) -> tuple[NF4Linear, dict]:
        """Requantizes the merged weight to NF4. Returns the layer and a report of
        the error it adds: relative to the merged weight, how much of the adapter's
        update survives, and how that compares to the base's own NF4 error."""
        base = self.base_layer
        merged = self.merged_dense_weight(torch.float32)
        requantized = NF4Tensor.quantize(merged, blocksize or base.blocksize,
                                         double_quant=base.double_quant if double_quant is None
                                         else double_quant)
        back = requantized.dequantize(torch.float32)
        decoded_base = base.dequantize(torch.float32)
        delta = merged - decoded_base
        kept = back - decoded_base
        report = {
            "relative_error": float((back - merged).norm() / merged.norm()),
            "max_abs_error": float((back - merged).abs().max()),
            "update_norm": float(delta.norm()),
            # 1.0: the update survives whole; 0: rounded away entirely.
            "update_kept": float((kept * delta).sum() / delta.pow(2).sum().clamp_min(1e-30)),
        }
        layer = NF4Linear.from_nf4(requantized, base.bias)
        layer.weight_dtype = base.weight_dtype
        return layer, report

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}")
