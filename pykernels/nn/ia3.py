"""IA3Linear: a frozen linear layer (dense or NF4) rescaled by a learned IA³ vector.

    output scaling (feedforward=False, attention k / v)   y = base(x) ⊙ l        l: ia3_l [out, 1]
    input scaling  (feedforward=True, FFN down-proj)      y = base(x ⊙ l)        l: ia3_l [1, in]

The same layer as peft's ``ia3.Linear`` with one adapter: output scaling scales
the bias too, input scaling leaves it alone; ``ia3_l`` starts at ones and is kept
in fp32 (peft's default) whatever the base's dtype; state_dict keys are peft's
(``base_layer.weight``, ``base_layer.bias``, ``ia3_l``), so a peft IA³ checkpoint
(``...k_proj.ia3_l``, saved without the adapter name) loads 1:1.

Fused where it saves a pass (pykernels.ops.ia3): output scaling adds the bias and
scales in one pass over y = x·Wᵀ; input scaling over an NF4 base folds l into the
decoded tiles of W, so x is never rescaled in memory; over a dense base x is
scaled (T×in, less than W's out×in) and goes to the matmul.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nf4 import NF4Tensor
from .nf4 import _FP32_STATE, NF4Linear


class IA3Linear(nn.Module):
    """IA³ around ``base_layer`` (an ``nn.Linear`` or ``NF4Linear``, frozen in place
    and shared, not copied). Only ``ia3_l`` trains.

    ``merge()`` folds l into the base weight (the forward is then the plain base
    layer); ``unmerge()`` takes it out again:

    * dense base: W ← W ⊙ l (and b ← b ⊙ l for output scaling) computed in fp32
      and rounded once to W's dtype; unmerge divides by l in fp32. An fp32 W comes
      back to within 1 ulp, a bf16/fp16 W to within 1 ulp of its dtype (rounding
      twice is not invertible); an l with a zero entry cannot be unmerged (refused
      at merge time).
    * NF4 base (peft refuses this case): dequantize → scale → requantize with the
      base's blocksize and double quantization. The requantization adds error;
      ``merge()`` returns it and keeps it in ``merge_error``
      (``max_abs``, ``rel_rms``: the requantized weight against W ⊙ l in fp32).
      The original NF4 state is kept while merged, so unmerge() is exact
      (costs the NF4 state's memory once more, 0.52 bytes per weight).
    """

    def __init__(self, base_layer: nn.Module, feedforward: bool = False):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, NF4Linear)):
            raise TypeError(f"IA3Linear: base_layer must be an nn.Linear or NF4Linear, got "
                            f"{type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        device = next(iter(base_layer.buffers() if isinstance(base_layer, NF4Linear)
                           else base_layer.parameters())).device
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device))
        self.merged = False
        self.merge_error: Optional[dict] = None
        self._unmerged_state: Optional[dict] = None

    @classmethod
    def from_linear(cls, linear: nn.Module, feedforward: bool = False) -> "IA3Linear":
        """Wraps ``linear`` (nn.Linear or NF4Linear) with a new IA³ vector of ones:
        ``feedforward=True`` scales its input (peft's feedforward_modules, e.g.
        down_proj), False its output (k_proj, v_proj)."""
        return cls(linear, feedforward=feedforward)

    @property
    def nf4(self) -> bool:
        return isinstance(self.base_layer, NF4Linear)

    def _l(self) -> torch.Tensor:
        l = self.ia3_l
        expected = (1, self.in_features) if self.feedforward else (self.out_features, 1)
        if tuple(l.shape) != expected:
            raise ValueError(f"IA3Linear: ia3_l must have shape {list(expected)} "
                             f"({'[1, in_features]' if self.feedforward else '[out_features, 1]'}), "
                             f"got {list(l.shape)}")
        return l.reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        l = self._l()
        bias = base.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.nf4:
            state = (base.packed, base.absmax)
            quant = (base.absmax_scale, base.absmax_code, base.absmax_offset)
            if self.feedforward:
                return ops.ia3_nf4_linear(x, *state, base.out_features, l, base.blocksize, bias,
                                          *quant)
            y = ops.nf4_linear(x, *state, base.out_features, base.blocksize, None, *quant)
            return ops.ia3_scale(y, l, bias)
        if self.feedforward:
            return F.linear(ops.ia3_scale(x, l), base.weight, bias)
        return ops.ia3_scale(F.linear(x, base.weight), l, bias)

    # ---- merging ----

    @torch.no_grad()
    def merge(self) -> Optional[dict]:
        """Folds l into the base weight. Returns the added error for an NF4 base
        (also in ``merge_error``), None for a dense one."""
        if self.merged:
            raise RuntimeError("IA3Linear.merge: already merged")
        l = self.ia3_l.detach().float()
        if not torch.isfinite(l).all():
            raise ValueError("IA3Linear.merge: ia3_l holds NaN or Inf")
        if not self.nf4 and (l == 0).any():
            raise ValueError("IA3Linear.merge: ia3_l has zero entries; merging would lose "
                             "those rows/columns of the weight for good (no unmerge)")
        base = self.base_layer
        if self.nf4:
            self._unmerged_state = {name: getattr(base, name) for name in ("packed",) + _FP32_STATE}
            weight = base.nf4_weight()
            scaled = weight.dequantize(torch.float32) * l
            merged = NF4Tensor.quantize(scaled, base.blocksize, double_quant=base.double_quant)
            self._set_nf4(merged)
            err = merged.dequantize(torch.float32) - scaled
            self.merge_error = {
                "max_abs": err.abs().max().item() if err.numel() else 0.0,
                "rel_rms": (err.norm() / scaled.norm().clamp_min(1e-30)).item(),
            }
        else:
            base.weight.copy_(base.weight.float() * l)
            self.merge_error = None
        if not self.feedforward and base.bias is not None:
            base.bias.copy_(base.bias.float() * l.reshape(-1))
        self.merged = True
        return self.merge_error

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes l out of the base weight again (see the class docstring for exactness)."""
        if not self.merged:
            raise RuntimeError("IA3Linear.unmerge: not merged")
        l = self.ia3_l.detach().float()
        base = self.base_layer
        if self.nf4:
            for name, value in self._unmerged_state.items():
                setattr(base, name, value)
            self._unmerged_state = None
        else:
            base.weight.copy_(base.weight.float() / l)
        if not self.feedforward and base.bias is not None:
            base.bias.copy_(base.bias.float() / l.reshape(-1))
        self.merged = False

    def _set_nf4(self, weight: NF4Tensor) -> None:
        base = self.base_layer
        for name in ("packed",) + _FP32_STATE:
            value = getattr(weight, name)
            if value is not None:
                setattr(base, name, value.reshape(getattr(base, name).shape))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"feedforward={self.feedforward}, merged={self.merged}")
