"""QLoRA (LoRA over an NF4 base) on the CPU: pykernels' QLoRALinear vs its dense
LoRALinear vs peft over a bitsandbytes Linear4bit base vs torchao's NF4 with a
hand-written adapter, side by side; and NF4Linear at 1 token against the machine.

Targets, checked in the "ratio" rows against peers timed in the same run:
- QLoRA forward + backward at most 1.10x dense LoRA's at 512 tokens (256 with
  --quick) (peft over bitsandbytes: 1.29x);
- QLoRA forward + backward faster than dense LoRA's at 1 token, i.e. dense /
  QLoRA >= 1 (peft over bitsandbytes: 4.3x slower than dense);
- NF4Linear's forward at 1 token within 1.2x of the time to read its NF4 state
  (packed codes + absmax + double-quant state) once at the machine's copy
  bandwidth, in eval mode (no_grad) and in train mode (x requiring grad).
peft + bitsandbytes / pykernels and torchao / pykernels are reported without a
target.

Shapes: a 4096x4096 layer with a bias (1024x1024 with --quick), r = 16,
alpha = 32, no dropout; tokens 1 / 32 / 512 (1 / 32 / 256 with --quick); not
2048: with it the full run took 4 min on this machine (torchao and bitsandbytes'
inference path take 1-2.5 s a call there), against a 3 min budget. Every side holds
the same numbers: W is quantized once to NF4 with double quantization (pykernels
and bitsandbytes make the same bits; checked), the dense LoRA base holds that W
decoded, and every adapter holds the same A and B (B nonzero), in the input dtype
(peft's with autocast_adapter_dtype=False). torchao rounds to its own NF4 table,
so its W differs by an NF4 step here and there (loosely checked). Training
steps run forward + backward with x requiring grad (dx, dA, dB), grads cleared
first. "eval fwd" is the module in eval mode under torch.no_grad: bitsandbytes
then takes its inference path (a W repacked once for its own CPU kernel);
pykernels' QLoRA runs the same op as in training.

As in bench_lora, each step is timed twice: with torch's threads and wall time,
and with one thread and that thread's CPU time ("cpu" rows); the NF4Linear
streaming rows are wall time only (memory-bound, against the 2-thread copy
bandwidth). With --quick the weight fits in cache, so the streaming ratio there
says nothing about DRAM.

    python bench/bench_qlora.py [--quick] [--out DIR]
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import time
import warnings

import common  # first: it quiets the peers' import-time logging

import bitsandbytes as bnb  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pykernels.nn import LoRALinear, NF4Linear, QLoRALinear  # noqa: E402

RANK, ALPHA = 16, 32
BLOCKSIZE = 64
DTYPES = (torch.bfloat16, torch.float32)
QLORA, LORA = "pykernels QLoRA", "pykernels LoRA (dense)"
PEFT, TORCHAO = "peft + bnb", "torchao NF4 + LoRA"
QLORA_EVAL, PEFT_EVAL = "pykernels QLoRA eval", "peft + bnb eval"
NF4_EVAL, NF4_TRAIN = "NF4Linear eval", "NF4Linear train"
STEP, EVAL_FWD = "fwd+bwd", "eval fwd"


def _check(ok: bool, what: str) -> None:
    # Timing a wrong answer is worse than no timing.
    if not ok:
        raise RuntimeError(f"bench_qlora: {what} differ; fix the kernels before timing them")


class _Model(nn.Module):
    """The smallest model peft wraps: one target layer named ``proj``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _peft_over_bnb(linear: nn.Linear, ours: QLoRALinear, dtype: torch.dtype, train: bool):
    """peft LoRA around a bitsandbytes NF4 Linear4bit of ``linear`` (double quant),
    holding ``ours``' A and B in ``dtype``; as tests/test_qlora.py::peft_over_bnb."""
    base = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True, compute_dtype=dtype,
                             quant_type="nf4", compress_statistics=True)
    weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                               compress_statistics=True, blocksize=BLOCKSIZE)
    base.weight = weight if weight.bnb_quantized else weight._quantize("cpu")
    base.bias = nn.Parameter(linear.bias.data.to(dtype).clone(), requires_grad=False)
    return peft_around(base, ours, dtype, train)


def peft_around(base: nn.Module, ours: QLoRALinear, dtype: torch.dtype, train: bool):
    """peft LoRA around a bitsandbytes NF4 layer ``base`` (its codes checked against
    ``ours``'), holding ``ours``' A and B in ``dtype``; bench_qlora_cuda builds on this."""
    _check(torch.equal(base.weight.data.reshape(-1), ours.base_layer.packed),
           "pykernels and bitsandbytes NF4 codes")
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Model(base), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    for name in ("lora_A", "lora_B"):
        adapter = getattr(layer, name)["default"].to(dtype)
        with torch.no_grad():
            adapter.weight.copy_(getattr(ours, name).weight)
    return model.train(train)


class _TorchaoQLoRA(nn.Module):
    """torchao's NF4 base (linear_nf4: decodes W whole, then F.linear) plus the
    adapter by hand: y = linear_nf4(x, W) + b + (x·Aᵀ·Bᵀ)·s."""

    def __init__(self, linear: nn.Linear, ours: QLoRALinear):
        super().__init__()
        nf4 = importlib.import_module("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
        self.linear_nf4 = nf4.linear_nf4
        self.weight = nf4.to_nf4(linear.weight.detach(), BLOCKSIZE, 256)
        self.bias = linear.bias.detach().clone()
        self.a = nn.Parameter(ours.lora_A.weight.detach().clone())
        self.b = nn.Parameter(ours.lora_B.weight.detach().clone())
        self.scaling = ours.scaling

    def forward(self, x):
        return self.linear_nf4(x, self.weight) + self.bias + (x @ self.a.T @ self.b.T) * self.scaling


def _layers(d: int, dtype: torch.dtype) -> dict:
    """Every implementation of one layer, with the same W (NF4), b, A, B (B nonzero)."""
    linear = nn.Linear(d, d, dtype=dtype).requires_grad_(False)
    ours = QLoRALinear.from_linear(linear, r=RANK, alpha=ALPHA, adapter_dtype=dtype)
    nn.init.normal_(ours.lora_B.weight, std=0.02)
    dense = nn.Linear(d, d, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(ours.base_layer.dequantize(dtype))
        dense.bias.copy_(linear.bias)
    lora = LoRALinear.from_linear(dense, r=RANK, alpha=ALPHA)
    with torch.no_grad():
        lora.lora_A.weight.copy_(ours.lora_A.weight)
        lora.lora_B.weight.copy_(ours.lora_B.weight)
    layers = {QLORA: ours, LORA: lora, PEFT: _peft_over_bnb(linear, ours, dtype, train=True),
              QLORA_EVAL: copy.deepcopy(ours).eval(),
              PEFT_EVAL: _peft_over_bnb(linear, ours, dtype, train=False)}
    try:
        layers[TORCHAO] = _TorchaoQLoRA(linear, ours)
    except Exception as e:  # noqa: BLE001 -- any failure of the peer only drops its rows
        print(f"bench_qlora: skipping torchao ({type(e).__name__}: {e})")
    return layers


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """forward + backward, grads cleared first (no accumulation on any side)."""
    def run():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)
    return run


def _eval_forward(module: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            module(x)
    return run


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_outputs(layers: dict, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype) -> None:
    """y and dx of every side against pykernels' QLoRA: the same NF4 bits give the
    same math up to rounding; bitsandbytes' inference path (its CPU kernel runs in
    bf16 even for fp32 inputs: 0.4% of max|y| at 4096) to bf16 level; torchao's
    own NF4 rounding, loosely."""
    results = {}
    for impl, layer in layers.items():
        xi = x.detach().clone().requires_grad_(impl not in (QLORA_EVAL, PEFT_EVAL))
        if xi.requires_grad:
            y = layer(xi)
            y.backward(dy)
            results[impl] = (y.detach().float(), xi.grad.float())
        else:
            with torch.no_grad():
                results[impl] = (layer(xi).float(), None)
    y_ours, dx_ours = results.pop(QLORA)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for impl, (y, dx) in results.items():
        loose = {TORCHAO: 0.1, PEFT_EVAL: max(tol, 3e-2)}.get(impl, tol)
        for name, got, want in (("y", y, y_ours), ("dx", dx, dx_ours)):
            if got is not None:
                err = (got - want).abs().max().item()
                _check(err <= loose * want.abs().max().item(), f"{QLORA} and {impl} {name}")


def bench_train_step(layers: dict, d: int, dtype: torch.dtype, tokens: int,
                     min_time: float) -> list[dict]:
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, d, dtype=dtype)
    _check_outputs(layers, x, dy, dtype)
    x_eval = x.detach()
    fns = {impl: (_eval_forward(layer, x_eval) if impl in (QLORA_EVAL, PEFT_EVAL)
                  else _step(layer, x, dy)) for impl, layer in layers.items()}
    rows = []
    for threads, clock in ((None, time.perf_counter), (1, time.thread_time)):
        with _threads(threads):
            timings = common.measure(fns, min_time, clock)
        for impl, t in timings.items():
            rows.append({"kind": "time", "bench": "qlora",
                         "op": EVAL_FWD if impl in (QLORA_EVAL, PEFT_EVAL) else STEP, "impl": impl,
                         "shape": f"{tokens}x{d}x{d} r{RANK}", "dtype": common.dtype_name(dtype),
                         "clock": "wall" if threads is None else "cpu, 1 thread", **t.fields()})
    return rows


def bench_nf4_stream(d: int, dtype: torch.dtype, min_time: float) -> list[dict]:
    """NF4Linear forward at 1 token, eval (no_grad) and train (x requiring grad)."""
    linear = nn.Linear(d, d, dtype=dtype).requires_grad_(False)
    layer = NF4Linear.from_linear(linear).requires_grad_(False)
    x = torch.randn(1, d, dtype=dtype)
    with torch.no_grad():
        want = x.float() @ layer.dequantize(torch.float32).T + linear.bias.float()
        got = layer.eval()(x).float()
    _check((got - want).abs().max().item() <= 3e-2 * want.abs().max().item(),
           "NF4Linear and the decoded weight's linear")
    x_grad = x.clone().requires_grad_()
    train = copy.deepcopy(layer).train()
    fns = {NF4_EVAL: _eval_forward(layer, x), NF4_TRAIN: lambda: train(x_grad)}
    nbytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    rows = []
    for impl, t in common.measure(fns, min_time).items():
        rows.append({"kind": "time", "bench": "qlora", "op": "fwd", "impl": impl,
                     "shape": f"1x{d}x{d}", "dtype": common.dtype_name(dtype), "clock": "wall",
                     **t.fields(), "nf4 bytes": nbytes})
    return rows


def ratios(rows: list[dict], copy_row: dict) -> list[dict]:
    """The targets per group, from median times (``met``) and from the best calls
    (``value (min)``)."""
    timed = {(r["impl"], r["shape"], r["dtype"], r["clock"]): r for r in rows}
    out = []
    for group in dict.fromkeys(key[1:] for key in timed):
        shape, dtype, clock = group

        def add(name, num, den, target=None):
            row = {"kind": "ratio", "bench": "qlora", "ratio": name, "shape": shape, "dtype": dtype,
                   "clock": clock, "value": num("median_ms") / den("median_ms"),
                   "value (min)": num("min_ms") / den("min_ms"), "target": "", "met": ""}
            if target is not None:
                sign, bound = target
                row["target"] = f"{sign} {bound}"
                row["met"] = row["value"] <= bound if sign == "<=" else row["value"] >= bound
            out.append(row)

        def t(impl):
            return lambda stat: timed[(impl, *group)][stat]

        if (NF4_EVAL, *group) in timed:
            stream_ms = timed[(NF4_EVAL, *group)]["nf4 bytes"] / (copy_row["value"] * 1e9) * 1e3
            best_ms = stream_ms * copy_row["min_ms"] / copy_row["median_ms"]

            def stream(stat):
                return stream_ms if stat == "median_ms" else best_ms

            add("NF4Linear fwd eval / NF4 bytes at copy bandwidth", t(NF4_EVAL), stream, ("<=", 1.2))
            add("NF4Linear fwd train / NF4 bytes at copy bandwidth", t(NF4_TRAIN), stream,
                ("<=", 1.2))
            continue
        tokens = int(shape.split("x")[0])
        if tokens >= 256:  # 512; 256 with --quick
            add("fwd+bwd: QLoRA / dense LoRA", t(QLORA), t(LORA), ("<=", 1.10))
        elif tokens == 1:
            add("fwd+bwd: dense LoRA / QLoRA", t(LORA), t(QLORA), (">=", 1))
        else:
            add("fwd+bwd: QLoRA / dense LoRA", t(QLORA), t(LORA))
        add("fwd+bwd: peft + bnb / dense LoRA", t(PEFT), t(LORA))
        add("fwd+bwd: peft + bnb time / pykernels QLoRA", t(PEFT), t(QLORA))
        add("eval fwd: peft + bnb time / pykernels QLoRA", t(PEFT_EVAL), t(QLORA_EVAL))
        if (TORCHAO, *group) in timed:
            add("fwd+bwd: torchao time / pykernels QLoRA", t(TORCHAO), t(QLORA))
    return out


def run(args) -> list[dict]:
    d = 1024 if args.quick else 4096
    token_counts = (1, 32, 256) if args.quick else (1, 32, 512)
    min_time = 0.1 if args.quick else 0.3
    copy_row = common.machine_limits(args.quick)[0]
    torch.manual_seed(0)
    rows = []
    for dtype in DTYPES:
        layers = _layers(d, dtype)
        for tokens in token_counts:
            rows += bench_train_step(layers, d, dtype, tokens, min_time)
        del layers
        rows += bench_nf4_stream(d, dtype, min_time)
    return rows + ratios(rows, copy_row)


if __name__ == "__main__":
    common.main({"qlora": __name__})
