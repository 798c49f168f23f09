"""Multi-LoRA on the CPU, serving: one layer holding 16 adapters, each batch row
on a random one (or the base), vs the same layer with one adapter, vs peft's
mixed-batch path (``adapter_names=[...]``) on the same weights, vs the base alone.

Targets (the "ratio" rows, from peers timed in the same run):
- 16 adapters at most 1.05x the same layer with ONE adapter (every row on it);
  LoRALinear (the single-adapter op, whose dropout-free products go to the
  matmul library) is timed beside it, without a target;
- faster than peft's adapter_names path (peft / pykernels >= 1).

Shapes: a 4096x4096 layer (1024x1024 with --quick), r = 16, alpha = 32, 512
tokens as a decode batch (512 rows x 1 token) and a prefill batch (8 rows x 64
tokens); ids uniform over the 16 adapters and -1 (base only); bf16 and fp32; eval
mode, no grad, at least 1 s of calls per side. One dense base, shared by every
side (peft's holds a copy).
With --threads 1 the times are that thread's CPU time (what the code costs
whatever else runs on this shared machine), else wall time.

    python bench/bench_multi_lora.py [--quick] [--threads 1] [--out DIR]
"""
from __future__ import annotations

import copy
import time
import warnings

import common  # first: it quiets the peers' import-time logging

import peft  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pykernels.nn import LoRALinear, MultiLoRALinear  # noqa: E402

RANK, ALPHA, ADAPTERS = 16, 32, 16
DTYPES = (torch.bfloat16, torch.float32)
SHAPES = {"decode": (512, 1), "prefill": (8, 64)}
BASE, ONE, SINGLE = "base nn.Linear", "pykernels 1 adapter", "pykernels LoRALinear"
MANY, PEFT = "pykernels 16 adapters", "peft 16 adapters"


class _Model(nn.Module):
    """The smallest model peft wraps: one target linear named ``proj``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x, **kwargs):
        return self.proj(x, **kwargs)


def _layers(d: int, dtype: torch.dtype):
    """(base, ours with 16 adapters, ours with adapter 0 alone, peft with the 16,
    LoRALinear holding adapter 0: the single-adapter op)."""
    base = nn.Linear(d, d, dtype=dtype).requires_grad_(False)
    many = MultiLoRALinear(base)
    one = MultiLoRALinear(base)
    for i in range(ADAPTERS):
        name = f"t{i}"
        many.add_adapter(name, r=RANK, alpha=ALPHA)
        nn.init.normal_(many.lora_B[name].weight, std=0.02)
    one.add_adapter("t0", r=RANK, alpha=ALPHA)
    one.load_state_dict({k: v for k, v in many.state_dict().items() if "t0" in k or "base" in k})
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_Model(copy.deepcopy(base)), config, adapter_name="t0",
                                     autocast_adapter_dtype=False)
        for i in range(1, ADAPTERS):
            theirs.add_adapter(f"t{i}", config)
    layer = theirs.base_model.model.proj
    with torch.no_grad():
        for name in many.adapter_names:
            layer.lora_A[name].weight.copy_(many.lora_A[name].weight)
            layer.lora_B[name].weight.copy_(many.lora_B[name].weight)
    single = LoRALinear(base, r=RANK, alpha=ALPHA)
    with torch.no_grad():
        single.lora_A.weight.copy_(many.lora_A["t0"].weight)
        single.lora_B.weight.copy_(many.lora_B["t0"].weight)
    for module in (many, one, theirs, single):
        module.eval()
    return base, many, one, theirs, single


def bench_forward(d: int, dtype: torch.dtype, shape: str, min_time: float) -> list[dict]:
    rows_n, tokens = SHAPES[shape]
    base, many, one, theirs, single = _layers(d, dtype)
    x = torch.randn(rows_n, tokens, d, dtype=dtype)
    ids = torch.randint(-1, ADAPTERS, (rows_n,))
    names = ["__base__" if i < 0 else f"t{i}" for i in ids.tolist()]
    one_ids = torch.zeros(rows_n, dtype=torch.int64)
    with torch.no_grad():
        want = theirs(x, adapter_names=names).float()
        err = (many(x, adapter_ids=ids).float() - want).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if err > tol * (1 + want.abs().max().item()):  # timing a wrong answer is worse than none
        raise RuntimeError(f"bench_multi_lora: pykernels and peft differ by {err:.3g}")
    fns = {BASE: lambda: base(x), SINGLE: lambda: single(x),
           ONE: lambda: one(x, adapter_ids=one_ids),
           MANY: lambda: many(x, adapter_ids=ids),
           PEFT: lambda: theirs(x, adapter_names=names)}
    one_thread = torch.get_num_threads() == 1
    with torch.no_grad():
        clock = time.thread_time if one_thread else time.perf_counter
        timings = common.measure(fns, min_time, clock)
    return [{"kind": "time", "bench": "multi_lora", "op": "forward", "impl": impl,
             "shape": f"{shape} {rows_n}x{tokens}x{d} r{RANK}", "dtype": common.dtype_name(dtype),
             "clock": "cpu, 1 thread" if one_thread else "wall", **t.fields()}
            for impl, t in timings.items()]


def ratios(rows: list[dict]) -> list[dict]:
    """The targets per shape and dtype, from median times (``met``) and, where the
    timer gives them, from the best calls (``value (min)``)."""
    timed = {(r["impl"], r["shape"], r["dtype"]): r for r in rows}
    out = []
    for shape, dtype in dict.fromkeys(key[1:] for key in timed):
        def add(name, num, den, target=None):
            def value(stat):
                return timed[(num, shape, dtype)][stat] / timed[(den, shape, dtype)][stat]
            row = {"kind": "ratio", "bench": rows[0]["bench"], "ratio": name, "shape": shape,
                   "dtype": dtype, "value": value("median_ms"), "target": "", "met": ""}
            if "min_ms" in timed[(num, shape, dtype)]:
                row["value (min)"] = value("min_ms")
            if target is not None:
                sign, bound = target
                row["target"] = f"{sign} {bound}"
                row["met"] = row["value"] <= bound if sign == "<=" else row["value"] >= bound
            out.append(row)

        add("16 adapters / 1 adapter", MANY, ONE, ("<=", 1.05))
        add("peft 16 / pykernels 16", PEFT, MANY, (">=", 1.0))
        add("pykernels 16 / base", MANY, BASE)
        if (SINGLE, shape, dtype) in timed:
            add("16 adapters / LoRALinear", MANY, SINGLE)
    return out


def run(args) -> list[dict]:
    d = 1024 if args.quick else 4096
    min_time = 0.1 if args.quick else 1.0
    torch.manual_seed(0)
    rows = []
    for dtype in DTYPES:
        for shape in SHAPES:
            rows += bench_forward(d, dtype, shape, min_time)
    return rows + ratios(rows)


if __name__ == "__main__":
    common.main({"multi_lora": __name__})
