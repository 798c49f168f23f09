"""NF4 and blockwise-8 ops: typed functions and their fake implementations.

Every op here is a ``torch.library`` op (schema in csrc/torch/schemas.cpp), so it
works under ``torch.compile(fullgraph=True)``, ``torch.library.opcheck`` and FX.
Argument errors are raised by the native code as ValueError / TypeError naming
the argument.
"""
from __future__ import annotations

from typing import Sequence

import torch

_ops = torch.ops.pykernels

NF4_DEFAULT_BLOCKSIZE = 64
DOUBLE_QUANT_BLOCKSIZE = 256


def nf4_quantize(x: torch.Tensor, blocksize: int = NF4_DEFAULT_BLOCKSIZE):
    """Quantizes ``x`` (fp32/fp16/bf16, any shape) to NF4.

    Returns ``(packed, absmax)``: ``ceil(numel/2)`` uint8 bytes (even element in
    the high nibble) and one fp32 absmax per block of ``blocksize`` elements of
    the flattened tensor, bit-identical to bitsandbytes' ``quantize_4bit``.
    """
    return _ops.nf4_quantize(x, blocksize)


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: Sequence[int],
                   dtype: torch.dtype = torch.float32, blocksize: int = NF4_DEFAULT_BLOCKSIZE,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Decodes NF4 codes to ``dtype``; into ``out`` when given (no allocation)."""
    if out is not None:
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"nf4_dequantize: out has shape {tuple(out.shape)}, expected {tuple(shape)}")
        _ops.nf4_dequantize_into(packed, absmax, blocksize, out)
        return out
    return _ops.nf4_dequantize(packed, absmax, blocksize, list(shape), dtype)


def blockwise8_quantize(x: torch.Tensor, code: torch.Tensor,
                        blocksize: int = DOUBLE_QUANT_BLOCKSIZE):
    """8-bit blockwise quantization of fp32 ``x`` with a 256-entry ``code`` table."""
    return _ops.blockwise8_quantize(x, code, blocksize)


def blockwise8_dequantize(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                          offset: torch.Tensor, blocksize: int = DOUBLE_QUANT_BLOCKSIZE):
    """``code[q] * absmax[block] + offset`` in fp32."""
    return _ops.blockwise8_dequantize(q, absmax, code, offset, blocksize)


# ---- fake (meta) implementations: shapes and dtypes only ----
# A call mixing a meta tensor with real ones dispatches here, so these check
# devices too: otherwise such a call would return garbage instead of failing.

def _check_same_device(op: str, **tensors: torch.Tensor) -> None:
    (first, t0), *rest = tensors.items()
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{op}: {first} is on {t0.device} but {name} is on {t.device}; "
                             "move them to one device")


@torch.library.register_fake("pykernels::nf4_quantize")
def _nf4_quantize_fake(x, blocksize):
    n = x.numel()
    return (x.new_empty(((n + 1) // 2,), dtype=torch.uint8),
            x.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32))


@torch.library.register_fake("pykernels::nf4_dequantize")
def _nf4_dequantize_fake(packed, absmax, blocksize, shape, dtype):
    _check_same_device("nf4_dequantize", packed=packed, absmax=absmax)
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("pykernels::nf4_dequantize_into")
def _nf4_dequantize_into_fake(packed, absmax, blocksize, out):
    _check_same_device("nf4_dequantize", packed=packed, absmax=absmax, out=out)
    return None


@torch.library.register_fake("pykernels::blockwise8_quantize")
def _blockwise8_quantize_fake(x, code, blocksize):
    _check_same_device("blockwise8_quantize", x=x, code=code)
    blocks = (x.numel() + blocksize - 1) // blocksize
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((blocks,), dtype=torch.float32)


@torch.library.register_fake("pykernels::blockwise8_dequantize")
def _blockwise8_dequantize_fake(q, absmax, code, offset, blocksize):
    _check_same_device("blockwise8_dequantize", q=q, absmax=absmax, code=code)
    return q.new_empty(q.shape, dtype=torch.float32)
