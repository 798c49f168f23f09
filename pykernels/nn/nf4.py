"""NF4Linear: a frozen linear layer whose weight is stored as NF4 (the QLoRA base layer)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..nf4 import NF4Tensor

# The fp32 parts of the quantization state: moved between devices, never cast.
_FP32_STATE = ("absmax", "absmax_scale", "absmax_code", "absmax_offset")


class NF4Linear(nn.Module):
    """``y = x·Wᵀ + b`` with ``W [out_features, in_features]`` stored as NF4: 4 bits
    per weight plus absmax (4.127 bits with double quantization), bit-compatible
    with bitsandbytes' ``Linear4bit(quant_type="nf4")``.

    W is frozen: its state lives in buffers (``packed``, ``absmax`` and, when
    double-quantized, ``absmax_scale``, ``absmax_code``, ``absmax_offset``), so
    ``state_dict`` / ``load_state_dict`` carry it and ``.to(device)`` moves it;
    ``.to(dtype)`` casts the bias only. Only the bias can train. The forward never
    decodes the whole weight (ops.nf4_linear); inputs may be fp32, fp16 or bf16.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 blocksize: int = ops.NF4_DEFAULT_BLOCKSIZE, double_quant: bool = True,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.weight_dtype = dtype  # of the weight that was quantized: dequantize()'s default
        n = in_features * out_features
        blocks = -(-n // blocksize)
        self.register_buffer("packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            groups = -(-blocks // ops.DOUBLE_QUANT_BLOCKSIZE)
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(groups, device=device))
            self.register_buffer("absmax_code", torch.zeros(256, device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, device=device))
            for name in _FP32_STATE[1:]:
                self.register_buffer(name, None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_nf4(cls, weight: NF4Tensor, bias: Optional[torch.Tensor] = None) -> "NF4Linear":
        """Wraps a 2-D NF4Tensor (and an optional bias) without re-quantizing."""
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear.from_nf4: weight must be 2-D [out, in], got shape "
                             f"{tuple(weight.shape)}")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, blocksize=weight.blocksize,
                    double_quant=weight.double_quant, dtype=weight.dtype, device="meta")
        for name in ("packed",) + _FP32_STATE:
            value = getattr(weight, name)
            if value is not None:
                setattr(layer, name, value.detach().reshape(getattr(layer, name).shape))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = ops.NF4_DEFAULT_BLOCKSIZE,
                    double_quant: bool = True) -> "NF4Linear":
        """Quantizes ``linear.weight`` (as bitsandbytes would) and keeps its bias."""
        weight = NF4Tensor.quantize(linear.weight.detach(), blocksize, double_quant=double_quant)
        return cls.from_nf4(weight, linear.bias)

    def nf4_weight(self) -> NF4Tensor:
        """The weight as an NF4Tensor sharing this layer's buffers."""
        shape = torch.Size((self.out_features, self.in_features))
        return NF4Tensor(self.packed, self.absmax, shape, self.weight_dtype, self.blocksize,
                         self.absmax_scale, self.absmax_code, self.absmax_offset)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight [out_features, in_features] (the layer's weight dtype by default)."""
        return self.nf4_weight().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return ops.nf4_linear(x, self.packed, self.absmax, self.out_features, self.blocksize, bias,
                              self.absmax_scale, self.absmax_code, self.absmax_offset)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every floating buffer; the fp32 state keeps
        # its bits and follows only the device.
        originals = {name: self._buffers[name] for name in _FP32_STATE
                     if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, value in originals.items():
            self._buffers[name] = value.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, weight_dtype={self.weight_dtype}")
