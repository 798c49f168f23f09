"""NF4 linear: y = x·Wᵀ (+ bias) with W [out_features, in_features] stored as NF4,
and its input gradient, without ever decoding the whole of W.

Few tokens run fused dequantize-matrix-vector kernels straight from the packed
codes; many tokens decode W one tile at a time and hand each tile to a GEMM
(csrc/torch/nf4_linear.h). The weight's state is the one ``NF4Tensor`` holds:
``absmax`` fp32, or uint8 codes with ``absmax_scale``, ``absmax_code`` and
``absmax_offset`` when double-quantized.

Autograd: ``x`` gets ``nf4_linear_grad_input(grad, ...)``, ``bias`` the sum of
``grad`` over tokens; the quantized weight never gets a gradient (it is frozen,
as in QLoRA). ``nf4_linear_grad_input`` is itself differentiable (it is linear
in ``grad_out``), so double backward works.
"""
from __future__ import annotations

from typing import Optional

import torch

from .nf4 import NF4_DEFAULT_BLOCKSIZE, _check_same_device

_ops = torch.ops.pykernels


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
               out_features: int, blocksize: int = NF4_DEFAULT_BLOCKSIZE,
               bias: Optional[torch.Tensor] = None, absmax_scale: Optional[torch.Tensor] = None,
               absmax_code: Optional[torch.Tensor] = None,
               absmax_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [..., in] -> [..., out_features]`` in x's dtype (fp32/fp16/bf16), accumulated in fp32."""
    return _ops.nf4_linear(x, packed, absmax, blocksize, out_features, bias, absmax_scale,
                           absmax_code, absmax_offset)


def nf4_linear_grad_input(grad_out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                          in_features: int, blocksize: int = NF4_DEFAULT_BLOCKSIZE,
                          absmax_scale: Optional[torch.Tensor] = None,
                          absmax_code: Optional[torch.Tensor] = None,
                          absmax_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``grad_out [..., out] -> grad_out·W [..., in_features]`` in grad_out's dtype."""
    return _ops.nf4_linear_grad_input(grad_out, packed, absmax, blocksize, in_features,
                                      absmax_scale, absmax_code, absmax_offset)


# ---- fake (meta) implementations ----

def _state_tensors(packed, absmax, absmax_scale, absmax_code):
    tensors = {"packed": packed, "absmax": absmax}
    if absmax_scale is not None:
        tensors["absmax_scale"] = absmax_scale
    if absmax_code is not None:
        tensors["absmax_code"] = absmax_code
    return tensors


@torch.library.register_fake("pykernels::nf4_linear")
def _nf4_linear_fake(x, packed, absmax, blocksize, out_features, bias=None, absmax_scale=None,
                     absmax_code=None, absmax_offset=None):
    extra = {"bias": bias} if bias is not None else {}
    _check_same_device("nf4_linear", x=x, **_state_tensors(packed, absmax, absmax_scale,
                                                              absmax_code), **extra)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("pykernels::nf4_linear_grad_input")
def _nf4_linear_grad_input_fake(grad_out, packed, absmax, blocksize, in_features,
                                absmax_scale=None, absmax_code=None, absmax_offset=None):
    _check_same_device("nf4_linear_grad_input", grad_out=grad_out,
                       **_state_tensors(packed, absmax, absmax_scale, absmax_code))
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


# Autograd: csrc/torch/nf4_linear_autograd.cpp (in C++: the Python registration
# cost ~80 us a call; see csrc/torch/autograd.h).
