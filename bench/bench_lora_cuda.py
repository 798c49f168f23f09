"""LoRA and NF4 linear on CUDA: pykernels vs peft vs the base layer, and the fused
NF4 kernel vs the device's copy bandwidth.

- LoRA training step (forward + backward, x requiring grad), bf16, a 4096x4096
  layer (1024 with --quick), r = 16, alpha = 32: pykernels' LoRALinear vs peft's
  lora.Linear (when peft is installed) vs the frozen base nn.Linear alone, at
  1 / 32 / 512 / 2048 tokens, and one dropout row (p = 0.1, 512 tokens): the
  fused kernels against peft's nn.Dropout. Target, as on the CPU: pykernels at
  most 1.05x the base layer from 32 tokens on.
- NF4 linear, bf16, the same shape, double-quantized, with a bias: the forward
  at 1 token against reading the packed codes once at the device's copy
  bandwidth (target: within 1.2x); the forward either side of the handover from
  the fused kernel to the tiles + cuBLAS (16 and 17 tokens) and at 512, and the
  input gradient at 1 and 16 tokens, each against a dense nn.Linear holding the
  decoded weight (4x the memory: the time to beat); bitsandbytes' Linear4bit at
  1 token when installed.

Timing: CUDA events around each call, median and IQR of 30 calls after a
warm-up (bench_nf4_cuda.measure_cuda: a 256 MiB buffer is zeroed before every
call, so weights come from device memory and the host has queued the call
before the device reaches it). A training step's time includes any wait for
the host (Python and autograd dispatch), on every side alike. Results are
checked against peft or the reference before anything is timed. Without a CUDA
device run() returns no rows, so bench/run.py can import this module anywhere.

    python bench/bench_lora_cuda.py [--quick] [--out DIR]
"""
from __future__ import annotations

import copy

import common  # first: it quiets the peers' import-time logging

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_nf4_cuda import FLUSH_BYTES, copy_row, measure_cuda  # noqa: E402
from pykernels import ops, reference  # noqa: E402
from pykernels.nn import LoRALinear, NF4Linear  # noqa: E402

try:  # peft's layers as bench_lora.py builds them
    import bench_lora
except ImportError:
    bench_lora = None

DTYPE = torch.bfloat16
RANK, ALPHA = 16, 32
BASE, OURS, PEFT = "base nn.Linear", "pykernels", "peft"


def _check(ok: bool, what: str) -> None:
    # Timing a wrong answer is worse than no timing.
    if not ok:
        raise RuntimeError(f"bench_lora_cuda: {what} differ; fix the kernels before timing them")


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 5e-2) -> bool:
    scale = 1 + want.float().abs().max().item()
    return (got.float() - want.float()).abs().max().item() <= tol * scale


# ---- LoRA ----

def lora_layers(d: int, dropout: float):
    """(base, pykernels LoRALinear, peft model or None) on the GPU, the same W, b, A, B."""
    if bench_lora is not None:
        layers = bench_lora._layers(d, DTYPE, dropout)
    else:
        base = nn.Linear(d, d, dtype=DTYPE).requires_grad_(False)
        ours = LoRALinear.from_linear(copy.deepcopy(base), r=RANK, alpha=ALPHA, dropout=dropout)
        nn.init.normal_(ours.lora_B.weight, std=0.02)
        layers = (base, ours, None)
    return tuple(None if m is None else m.cuda() for m in layers)


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """forward + backward, grads cleared first (no accumulation on any side)."""
    def run():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)
    return run


def bench_lora_step(d: int, tokens: int, dropout: float, flush: torch.Tensor) -> list[dict]:
    base, ours, theirs = lora_layers(d, dropout)
    x = torch.randn(tokens, d, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn(tokens, d, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        ours.eval()
        y = ours(x)
        ours.train()
        want = (reference.lora_linear(x.float(), base.weight.float(), base.bias.float(),
                                      ours.lora_A.weight.float(), ours.lora_B.weight.float(),
                                      ours.scaling))
        _check(_close(y, want), "pykernels and the reference")
        if theirs is not None:
            theirs.eval()
            _check(_close(y, theirs(x)), "pykernels and peft outputs")
            theirs.train()
    steps = {BASE: _step(base, x, dy), OURS: _step(ours, x, dy)}
    if theirs is not None:
        steps[PEFT] = _step(theirs, x, dy)
    return [{"kind": "time", "bench": "lora_cuda", "op": "fwd+bwd", "impl": impl,
             "shape": f"{tokens}x{d}x{d} r{RANK}", "dtype": common.dtype_name(DTYPE),
             "dropout": dropout, **measure_cuda(fn, flush).fields()}
            for impl, fn in steps.items()]


# ---- NF4 linear ----

def _bnb_layer(dense: nn.Linear):
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    peer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=True, compute_dtype=DTYPE,
                             quant_type="nf4", compress_statistics=True)
    peer.load_state_dict({k: v.cpu() for k, v in dense.state_dict().items()})
    return peer.cuda().eval().requires_grad_(False)  # .cuda() quantizes


def bench_nf4(d: int, flush: torch.Tensor) -> list[dict]:
    dense = nn.Linear(d, d).to(DTYPE).cuda().requires_grad_(False)
    peer = _bnb_layer(dense)
    ours = NF4Linear.from_linear(dense, double_quant=True).requires_grad_(False)
    dense.weight.copy_(ours.dequantize(DTYPE))  # the same numbers, decoded
    state = (ours.packed, ours.absmax, d, ours.blocksize, ours.absmax_scale, ours.absmax_code,
             ours.absmax_offset)
    rows = []
    for op, token_counts in (("forward", (1, 16, 17, 512)), ("grad_input", (1, 16))):
        for tokens in token_counts:
            x = torch.randn(tokens, d, device="cuda", dtype=DTYPE)
            with torch.no_grad():
                if op == "forward":
                    impls = {OURS: lambda: ours(x), "dense nn.Linear": lambda: dense(x)}
                    if peer is not None and tokens == 1:
                        impls["bitsandbytes"] = lambda: peer(x)
                else:
                    impls = {OURS: lambda: ops.nf4_linear_grad_input(x, *state),
                             "dense x·W": lambda: x @ dense.weight}
                want = impls[list(impls)[1]]().float()
                for impl, fn in impls.items():
                    _check(_close(fn(), want), f"{op}: {impl} and the dense layer")
                for impl, fn in impls.items():
                    rows.append({"kind": "time", "bench": "lora_cuda", "op": f"nf4 {op}",
                                 "impl": impl, "shape": f"{tokens}x{d}x{d}",
                                 "dtype": common.dtype_name(DTYPE),
                                 **measure_cuda(fn, flush).fields()})
    return rows


# ---- ratios ----

def ratios(rows: list[dict], copy_gbps: float, d: int) -> list[dict]:
    timed = {(r["op"], r["impl"], r["shape"], r.get("dropout")): r for r in rows
             if r["kind"] == "time"}
    out = []

    def add(name, shape, value, target=None):
        row = {"kind": "ratio", "bench": "lora_cuda", "ratio": name, "shape": shape, "value": value,
               "target": "", "met": ""}
        if target is not None:
            sign, bound = target
            row["target"] = f"{sign} {bound:.3g}"
            row["met"] = value <= bound if sign == "<=" else value >= bound
        out.append(row)

    for op, impl, shape, dropout in timed:
        if impl != OURS:
            continue
        ours = timed[(op, impl, shape, dropout)]["median_ms"]
        peer = timed.get((op, PEFT, shape, dropout))
        if op == "fwd+bwd" and dropout:
            if peer is not None:
                add(f"dropout {dropout}: peft time / pykernels", shape, peer["median_ms"] / ours)
        elif op == "fwd+bwd":
            base = timed[(op, BASE, shape, dropout)]["median_ms"]
            at_scale = int(shape.split("x")[0]) >= 32
            add("fwd+bwd: pykernels / base", shape, ours / base, ("<=", 1.05) if at_scale else None)
            if peer is not None:
                add("fwd+bwd: peft / base", shape, peer["median_ms"] / base)
        elif op == "nf4 forward" and shape.startswith("1x"):
            packed_ms = d * d // 2 / (copy_gbps * 1e9) * 1e3
            add("nf4 forward, 1 token: packed bytes at copy bandwidth / pykernels time", shape,
                packed_ms / ours, (">=", 1 / 1.2))
            bnb = timed.get((op, "bitsandbytes", shape, None))
            if bnb is not None:
                add("nf4 forward, 1 token: bitsandbytes time / pykernels", shape,
                    bnb["median_ms"] / ours, (">=", 1))
    return out


def run(args) -> list[dict]:
    if not torch.cuda.is_available():
        print("bench_lora_cuda: no CUDA device, nothing to time")
        return []
    if bench_lora is None:
        print("bench_lora_cuda: peft not installed, timing pykernels and the base layer alone")
    d = 1024 if args.quick else 4096
    token_counts = (1, 32, 256) if args.quick else (1, 32, 512, 2048)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    rows = [copy_row(flush)]
    torch.manual_seed(0)
    for tokens in token_counts:
        rows += bench_lora_step(d, tokens, 0.0, flush)
    rows += bench_lora_step(d, token_counts[-2], 0.1, flush)
    rows += bench_nf4(d, flush)
    return rows + ratios(rows, rows[0]["value"], d)


if __name__ == "__main__":
    common.main({"lora_cuda": __name__})
