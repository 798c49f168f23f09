"""Plain-PyTorch specification of every pykernels op, computed in fp32.

Slow and obvious on purpose: the tests hold the native kernels to these, and
these to the peers (bitsandbytes, peft). Formats: csrc/include/pykernels/*.h.
"""
from __future__ import annotations

import torch

# NF4 code values (QLoRA); the same numbers as csrc/include/pykernels/nf4.h.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_ZERO_CODE = 7
ABSMAX_FLOOR = 1e-38


def nf4_code() -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32)


def nf4_midpoints() -> torch.Tensor:
    code = nf4_code()
    return (code[:-1] + code[1:]) * 0.5


def nf4_quantize(x: torch.Tensor, blocksize: int = 64):
    """(packed uint8, absmax fp32) of x, as nf4.h specifies."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1) if full else flat.new_empty(0)
    floor = torch.tensor(ABSMAX_FLOOR)
    scaled = (blocks * (1.0 / torch.maximum(absmax, floor)).unsqueeze(1)).reshape(-1)
    if full < n:  # the partial block divides and stores its floored absmax
        tail_max = torch.maximum(flat[full:].abs().amax(), floor)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, flat[full:] / tail_max])
    codes = torch.bucketize(scaled, nf4_midpoints()).to(torch.uint8)  # strict >: lower code on ties
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_CODE)])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype=torch.float32,
                   blocksize: int = 64) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= int(s)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (nf4_code()[codes] * scale).to(dtype).reshape(shape)


def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code table (256 sorted values in [-1, 1]).

    Each exponent level e = 0..6 holds 2^e + 1 linearly spaced fraction boundaries
    in [0.1, 1]; their midpoints, scaled by 10^(e-6), give 2^e positive and
    2^e negative values; 0 and 1.0 complete the table, padded with zeros to 256.
    """
    non_sign_bits = total_bits - 1
    values = []
    for e in range(max_exponent_bits):
        count = 2 ** (e + non_sign_bits - max_exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, count, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + e)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def blockwise8_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    """8-bit blockwise codes as blockwise8.h specifies (bitsandbytes' CPU LUT method)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    mids = (code[:-1] + code[1:]) * 0.5
    lut_values = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    lut = torch.searchsorted(mids, lut_values)  # midpoints strictly below each bin
    q = torch.zeros(n, dtype=torch.uint8)
    absmax = torch.zeros((n + blocksize - 1) // blocksize)
    for b in range(absmax.numel()):
        block = flat[b * blocksize:(b + 1) * blocksize]
        m = block.abs().max()
        absmax[b] = m
        if m == 0:
            continue
        v = torch.clamp(block * (1.0 / m), -1, 1)
        index = ((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
        q[b * blocksize:(b + 1) * blocksize] = lut[index].to(torch.uint8)
    return q.reshape(x.shape), absmax


def blockwise8_dequantize(q, absmax, code, offset, blocksize: int = 256):
    scale = absmax.repeat_interleave(blocksize)[:q.numel()]
    return (code[q.reshape(-1).long()] * scale + offset).reshape(q.shape)


def nf4_double_quantize(absmax: torch.Tensor):
    """(qabsmax, absmax2, code2, offset): bitsandbytes' compress_statistics state."""
    offset = absmax.mean()
    code = dynamic_code()
    q, absmax2 = blockwise8_quantize(absmax - offset, code)
    return q, absmax2, code, offset


# ---- NF4 linear ----

def nf4_weight(weight, dtype=torch.float32) -> torch.Tensor:
    """The dense weight an NF4Tensor holds (plain or double-quantized absmax), in ``dtype``."""
    absmax = weight.absmax
    if weight.absmax_scale is not None:
        absmax = blockwise8_dequantize(absmax, weight.absmax_scale, weight.absmax_code,
                                       weight.absmax_offset)
    return nf4_dequantize(weight.packed, absmax, weight.shape, dtype, weight.blocksize)


def nf4_linear(x: torch.Tensor, weight, bias=None) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) in fp32, W the decoded NF4Tensor ``weight`` [out, in]."""
    return torch.nn.functional.linear(x.float(), nf4_weight(weight),
                                      None if bias is None else bias.float())


def nf4_linear_grad_input(grad_out: torch.Tensor, weight) -> torch.Tensor:
    """grad_out·W in fp32: the gradient of nf4_linear with respect to x."""
    return grad_out.float() @ nf4_weight(weight)


# ---- LoRA ----

def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float, mask=None) -> torch.Tensor:
    """x·Wᵀ + b + scale·((x·mask)·Aᵀ)·Bᵀ, in peft's order of operations and in the
    inputs' dtype: pass fp32 tensors for the spec, low-precision ones for the
    "reference run in that dtype" of the tolerance rule. ``mask`` is the dropout
    multiplier (0 or 1/(1-p), x's shape; ops.lora_dropout_mask gives the kernels'
    one), None for no dropout. Differentiable by autograd."""
    dropped = x if mask is None else x * mask.to(x.dtype)
    base = torch.nn.functional.linear(x, weight, bias)
    return base + torch.nn.functional.linear(torch.nn.functional.linear(dropped, lora_A), lora_B) * scale


def lora_merge(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               scale: float) -> torch.Tensor:
    """W + scale·B·A computed in fp32, rounded once to W's dtype."""
    return (weight.float() + scale * (lora_B.float() @ lora_A.float())).to(weight.dtype)


def multi_lora(x: torch.Tensor, base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               scales, ids, mask=None) -> torch.Tensor:
    """base + scales[id]·((x·mask)·A[id]ᵀ)·B[id]ᵀ per batch row of x [rows, ..., in],
    a plain loop over the adapters (peft's mixed-batch order of operations), in the
    inputs' dtype; ids -1 leave the row at base. ``mask``: the dropout multiplier
    (x's shape; ops.lora_dropout_mask of x gives the kernels'), None for none."""
    dropped = x if mask is None else x * mask.to(x.dtype)
    out = base.clone()
    for a in range(lora_A.shape[0]):
        rows = (ids == a).nonzero().flatten()
        if rows.numel() == 0:
            continue
        xa = torch.nn.functional.linear(dropped[rows], lora_A[a])
        out[rows] = out[rows] + torch.nn.functional.linear(xa, lora_B[a]) * float(scales[a])
    return out

# ---- Bottleneck adapters ----

def bottleneck_adapter(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor,
                       w_up: torch.Tensor, b_up: torch.Tensor, act: str = "relu",
                       scale: float = 1.0, residual=None) -> torch.Tensor:
    """residual + scale·(act(h·w_downᵀ + b_down)·w_upᵀ + b_up) in the inputs' dtype,
    in the order a plain nn.Module adapter computes it (residual defaults to h).
    Differentiable by autograd."""
    acts = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}
    z = acts[act](torch.nn.functional.linear(h, w_down, b_down))
    return (h if residual is None else residual) + torch.nn.functional.linear(z, w_up, b_up) * scale


def multi_bottleneck(h: torch.Tensor, w_down, b_down, w_up, b_up, acts, scales, ids,
                     residual=None) -> torch.Tensor:
    """bottleneck_adapter per batch row of h [rows, ..., d] with adapter ids[i]'s
    weights (lists, one entry per adapter), a plain loop over the adapters in the
    inputs' dtype; ids -1 leave the row at the residual (h when None).
    Differentiable by autograd (an adapter no row picked gets no gradient)."""
    base = h if residual is None else residual
    out = base.clone()
    for a in range(len(w_down)):
        rows = (ids == a).nonzero().flatten()
        if rows.numel() == 0:
            continue
        out[rows] = bottleneck_adapter(h[rows], w_down[a], b_down[a], w_up[a], b_up[a], acts[a],
                                       scales[a], base[rows])
    return out


# ---- IA³ (pykernels/ops/ia3.py) ----

def ia3_scale(v: torch.Tensor, l: torch.Tensor, bias=None) -> torch.Tensor:
    """(v + bias) ⊙ l over the last dim, in fp32, rounded once to v's dtype."""
    out = v.float() if bias is None else v.float() + bias.float()
    return (out * l.float()).to(v.dtype)


def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias, l: torch.Tensor,
               feedforward: bool) -> torch.Tensor:
    """peft's IA³ linear in fp32: (x ⊙ l)·Wᵀ + b (feedforward) or (x·Wᵀ + b) ⊙ l."""
    x, w, l = x.float(), weight.float(), l.float().reshape(-1)
    b = None if bias is None else bias.float()
    if feedforward:
        return torch.nn.functional.linear(x * l, w, b)
    return torch.nn.functional.linear(x, w, b) * l


# ---- prompt tuning (pykernels/ops/prompt.py) ----

def prompt_embed(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """[B, n + S, D]: the prompt, then the rows of weight the ids pick."""
    b = input_ids.shape[0]
    return torch.cat([prompt.expand(b, *prompt.shape), weight[input_ids]], dim=1)
