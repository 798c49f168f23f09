"""QLoRA on CUDA: pykernels' QLoRALinear vs its dense LoRALinear vs peft over a
bitsandbytes Linear4bit base, side by side.

A training step (forward + backward, x requiring grad: dx, dA, dB; grads cleared
first), bf16, a 4096x4096 layer with a bias (1024 with --quick), r = 16,
alpha = 32, no dropout, at 1 token (the fused NF4 kernels) and 512 (W decoded
tile by tile for cuBLAS). Every side holds the same numbers: W quantized once to
NF4 with double quantization (bitsandbytes makes the same codes; checked), the
dense LoRA base holds that W decoded, and every adapter the same A and B (B
nonzero). Ratios: QLoRA / dense LoRA (what storing W in 4 bits costs a step;
target as on the CPU: at most 1.10x at 512 tokens) and peft + bitsandbytes /
pykernels QLoRA, when bitsandbytes is importable on the GPU machine.

Measured on the lent H200 (2026-11-28, torch 2.11, bitsandbytes 0.50.2 carried
as a wheel, 4096x4096 bf16), median ms of a step:
    tokens   QLoRA   dense LoRA   peft + bnb   QLoRA / dense   peft+bnb / QLoRA
    1        1.04    0.95         1.10         1.10            1.06
    512      0.78    0.62         1.56         1.25 (> 1.10)   1.99
At 1 token every side waits for the host (~1 ms of Python and autograd
dispatch against ~15 us of weight reads). At 512 the decoded tiles cost
0.16 ms over dense: the 1.10x target is not met yet.

Timing as bench_lora_cuda.py: CUDA events, median and IQR of 30 calls after a
warm-up, a 256 MiB buffer zeroed before every call (weights come from device
memory). Results are checked against the reference (and peft) before anything
is timed. Without a CUDA device run() returns no rows.

    python bench/bench_qlora_cuda.py [--quick] [--out DIR]
"""
from __future__ import annotations

import common  # first: it quiets the peers' import-time logging

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_lora_cuda import _check, _close, _step  # noqa: E402
from bench_nf4_cuda import FLUSH_BYTES, copy_row, measure_cuda  # noqa: E402
from pykernels import reference  # noqa: E402
from pykernels.nn import LoRALinear, QLoRALinear  # noqa: E402

DTYPE = torch.bfloat16
RANK, ALPHA = 16, 32
QLORA, LORA, PEFT = "pykernels QLoRA", "pykernels LoRA (dense)", "peft + bnb"


def _peft_over_bnb(linear: nn.Linear, ours: QLoRALinear):
    """peft LoRA around bitsandbytes' Linear4bit of ``linear`` (NF4, double quant,
    quantized on the GPU), holding ``ours``' A and B; None without the peers."""
    try:  # bench_qlora imports bitsandbytes and peft
        import bench_qlora
        import bitsandbytes as bnb
    except ImportError:
        return None
    base = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True,
                             compute_dtype=DTYPE, quant_type="nf4", compress_statistics=True)
    base.load_state_dict({k: v.cpu() for k, v in linear.state_dict().items()})
    base = base.cuda().requires_grad_(False)  # .cuda() quantizes
    return bench_qlora.peft_around(base, ours, DTYPE, train=True)


def _layers(d: int) -> dict:
    """Every side on the GPU, with the same W (NF4), b, A, B."""
    linear = nn.Linear(d, d, dtype=DTYPE).requires_grad_(False).cuda()
    ours = QLoRALinear.from_linear(linear, r=RANK, alpha=ALPHA, adapter_dtype=DTYPE).cuda()
    nn.init.normal_(ours.lora_B.weight, std=0.02)
    dense = nn.Linear(d, d, dtype=DTYPE, device="cuda").requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(ours.base_layer.dequantize(DTYPE))
        dense.bias.copy_(linear.bias)
    lora = LoRALinear.from_linear(dense, r=RANK, alpha=ALPHA)
    with torch.no_grad():
        lora.lora_A.weight.copy_(ours.lora_A.weight)
        lora.lora_B.weight.copy_(ours.lora_B.weight)
    layers = {QLORA: ours, LORA: lora}
    try:
        peer = _peft_over_bnb(linear, ours)
    except Exception as e:  # noqa: BLE001 -- any failure of the peers only drops their rows
        print(f"bench_qlora_cuda: skipping peft + bnb ({type(e).__name__}: {e})")
        peer = None
    if peer is not None:
        layers[PEFT] = peer
    return layers


def _check_outputs(layers: dict, x: torch.Tensor, dy: torch.Tensor) -> None:
    """y and dx of every side against the reference over the decoded W."""
    ours = layers[QLORA]
    w = ours.base_layer.dequantize(torch.float32)
    want = reference.lora_linear(x.float(), w, ours.base_layer.bias.float(),
                                 ours.lora_A.weight.float(), ours.lora_B.weight.float(),
                                 ours.scaling)
    want_dx = dy.float() @ (w + ours.scaling * ours.lora_B.weight.float() @ ours.lora_A.weight.float())
    for impl, layer in layers.items():
        xi = x.detach().clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        _check(_close(y, want), f"{impl} y and the reference")
        _check(_close(xi.grad, want_dx), f"{impl} dx and the reference")


def bench_step(layers: dict, d: int, tokens: int, flush: torch.Tensor) -> list[dict]:
    x = torch.randn(tokens, d, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn(tokens, d, device="cuda", dtype=DTYPE)
    _check_outputs(layers, x, dy)
    return [{"kind": "time", "bench": "qlora_cuda", "op": "fwd+bwd", "impl": impl,
             "shape": f"{tokens}x{d}x{d} r{RANK}", "dtype": common.dtype_name(DTYPE),
             **measure_cuda(_step(layer, x, dy), flush).fields()}
            for impl, layer in layers.items()]


def ratios(rows: list[dict], big_tokens: int) -> list[dict]:
    timed = {(r["impl"], r["shape"]): r["median_ms"] for r in rows if r["kind"] == "time"}
    out = []
    for (impl, shape), ours in timed.items():
        if impl != QLORA:
            continue
        value = ours / timed[(LORA, shape)]
        at_scale = shape.startswith(f"{big_tokens}x")
        out.append({"kind": "ratio", "bench": "qlora_cuda", "ratio": "fwd+bwd: QLoRA / dense LoRA",
                    "shape": shape, "value": value, "target": "<= 1.1" if at_scale else "",
                    "met": value <= 1.1 if at_scale else ""})
        if (PEFT, shape) in timed:
            out.append({"kind": "ratio", "bench": "qlora_cuda",
                        "ratio": "fwd+bwd: peft + bnb time / pykernels QLoRA", "shape": shape,
                        "value": timed[(PEFT, shape)] / ours, "target": "", "met": ""})
    return out


def run(args) -> list[dict]:
    if not torch.cuda.is_available():
        print("bench_qlora_cuda: no CUDA device, nothing to time")
        return []
    d = 1024 if args.quick else 4096
    token_counts = (1, 256) if args.quick else (1, 512)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    rows = [copy_row(flush)]
    torch.manual_seed(0)
    layers = _layers(d)
    if PEFT not in layers:
        print("bench_qlora_cuda: bitsandbytes or peft not importable, no peft + bnb rows")
    for tokens in token_counts:
        rows += bench_step(layers, d, tokens, flush)
    return rows + ratios(rows, token_counts[-1])


if __name__ == "__main__":
    common.main({"qlora_cuda": __name__})
