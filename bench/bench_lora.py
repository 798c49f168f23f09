"""LoRA over a dense base on the CPU: pykernels' LoRALinear vs peft's lora.Linear
vs the frozen base nn.Linear alone, forward + backward, side by side.

Targets, checked in the "ratio" rows against peers timed in the same run:
- LoRA forward + backward at most 1.05x the base layer's forward + backward at
  32 tokens and more (peft: 1.05-1.57x);
- merge at least 8x faster than peft's merge_and_unload.

Shapes: a 4096x4096 layer (1024x1024 with --quick), r = 16, alpha = 32, no
dropout; tokens 1 / 32 / 512, and 2048 in bf16; x with and without
requires_grad (without it, the base layer's backward is empty and the adapter's
backward is all the extra work). One dropout row (p = 0.1) shows the fused mask
against peft's nn.Dropout. peft's adapters keep the base dtype
(autocast_adapter_dtype=False), so both sides do the same math in the same
precision. Every side allocates its outputs and clears .grad before each call.

Each training step is timed twice: with torch's threads and wall time, and with
one thread and that thread's CPU time ("cpu" rows). On a shared machine the
first counts, for every OpenMP region, a wait for the second core (a LoRA step
has 8 regions to the base layer's 2, so at small T the wall-time ratios measure
the load); the second is what the code costs whatever else runs. With it, the
"adapter cost, paired" rows give what the adapter adds as a fraction of the base
step from the differences of calls timed side by side, which the base layer's own
drift between rounds does not move.

    python bench/bench_lora.py [--quick] [--out DIR]
"""
from __future__ import annotations

import contextlib
import copy
import gc
import statistics
import time
import warnings

import common  # first: it quiets the peers' import-time logging

import peft  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pykernels.nn import LoRALinear  # noqa: E402

RANK, ALPHA = 16, 32
DTYPES = (torch.bfloat16, torch.float32)
BASE, OURS, PEFT = "base nn.Linear", "pykernels", "peft"


class _Model(nn.Module):
    """The smallest model peft wraps: one target linear named ``proj``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _peft_model(base: nn.Linear, ours: LoRALinear, dropout: float = 0.0):
    """peft around a copy of ``base``, holding ``ours``' A and B."""
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=dropout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Model(copy.deepcopy(base)), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    return model


def _layers(d: int, dtype: torch.dtype, dropout: float = 0.0):
    """(base, pykernels LoRALinear, peft model) with the same W, b, A, B (B nonzero)."""
    base = nn.Linear(d, d, dtype=dtype).requires_grad_(False)
    ours = LoRALinear.from_linear(copy.deepcopy(base), r=RANK, alpha=ALPHA, dropout=dropout)
    nn.init.normal_(ours.lora_B.weight, std=0.02)
    return base, ours, _peft_model(base, ours, dropout)


def _check(ok: bool, what: str) -> None:
    # Timing a wrong answer is worse than no timing.
    if not ok:
        raise RuntimeError(f"bench_lora: {what} differ; fix the kernels before timing them")


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """forward + backward, grads cleared first (no accumulation on any side)."""
    def run():
        x.grad = None
        module.zero_grad(set_to_none=True)
        y = module(x)
        if y.requires_grad:  # the frozen base with x not requiring grad has no backward
            y.backward(dy)
    return run


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_train_step(d: int, dtype: torch.dtype, tokens: int, x_grad: bool, dropout: float,
                     min_time: float) -> list[dict]:
    base, ours, theirs = _layers(d, dtype, dropout)
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=x_grad)
    dy = torch.randn(tokens, d, dtype=dtype)
    if dropout == 0.0:
        with torch.no_grad():
            want = theirs(x).float()
            err = (ours(x).float() - want).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        _check(err <= tol * (1 + want.abs().max().item()), "pykernels and peft outputs")
    steps = {BASE: _step(base, x, dy), OURS: _step(ours, x, dy), PEFT: _step(theirs, x, dy)}
    rows = []
    for threads, clock in ((None, time.perf_counter), (1, time.thread_time)):
        with _threads(threads):
            timings = common.measure(steps, min_time, clock)
        labels = {"bench": "lora", "shape": f"{tokens}x{d}x{d} r{RANK}",
                  "dtype": common.dtype_name(dtype), "x_grad": x_grad, "dropout": dropout,
                  "clock": "wall" if threads is None else "cpu, 1 thread"}
        for impl, t in timings.items():
            rows.append({"kind": "time", "op": "fwd+bwd", "impl": impl, **labels, **t.fields()})
        if not dropout and threads == 1:  # wall-time pairs would measure waits for a core
            rows.append(_paired_cost(timings[OURS], timings[BASE], labels))
    return rows


def _paired_cost(ours: common.Timing, base: common.Timing, labels: dict) -> dict:
    """What the adapter adds, as a fraction of the base step: the median of the
    differences between the calls of each round (ours and the base ran side by
    side), over the base's median; in thread CPU time. Steadier than the ratio of
    medians where the base layer's own time drifts between runs (bf16 T = 32 on a
    shared host: 7.1-7.9 ms, against an adapter of ~0.6 ms)."""
    pairs = [o - b for o, b in zip(ours.samples, base.samples)]
    value = statistics.median(pairs) / base.median_s
    return {"kind": "ratio", "ratio": "fwd+bwd: adapter cost, paired: (pykernels - base) / base",
            **{k: v for k, v in labels.items() if k != "dropout"}, "value": value,
            "value (min)": "", "target": "", "met": ""}


def _measure_with_setup(cases: dict, rounds: int) -> dict[str, common.Timing]:
    """Like common.measure, for calls that consume their state: each case is
    (setup, fn); setup runs untimed before every timed call. Interleaved rounds."""
    for setup, fn in cases.values():
        setup()
        fn()
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (setup, fn) in cases.items():
            setup()
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    result = {}
    for name, t in times.items():
        q1, _, q3 = statistics.quantiles(t, n=4)
        result[name] = common.Timing(statistics.median(t), q3 - q1, len(t), min(t))
    return result


def bench_merge(d: int, dtype: torch.dtype, rounds: int, copy_gbps: float) -> list[dict]:
    """pykernels LoRALinear.merge() vs peft merge_and_unload() on a d x d layer."""
    base, ours, _ = _layers(d, dtype)
    want = base.weight.float() + ours.scaling * ours.lora_B.weight.float() @ ours.lora_A.weight.float()
    ours.merge()
    err = (ours.base_layer.weight.float() - want).abs().max().item()
    _check(err <= (1e-5 if dtype == torch.float32 else 1e-2) * want.abs().max().item(), "merged weights")
    models = []

    def fresh_peft():
        models.clear()
        gc.collect()
        models.append(_peft_model(base, ours))

    cases = {"pykernels merge()": (ours.unmerge, ours.merge),
             "peft merge_and_unload()": (fresh_peft, lambda: models[0].merge_and_unload())}
    rows = []
    moved = 2 * base.weight.numel() * base.weight.element_size()  # W read + written
    for impl, t in _measure_with_setup(cases, rounds).items():
        gbps = moved / t.median_s / 1e9
        rows.append({"kind": "time", "bench": "lora", "op": "merge", "impl": impl,
                     "shape": f"{d}x{d} r{RANK}", "dtype": common.dtype_name(dtype),
                     "clock": "wall", **t.fields(), "GB/s": gbps, "% copy": 100 * gbps / copy_gbps})
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """The targets per group, from median times (``met``) and from the best calls
    (``value (min)``)."""
    keys = ("op", "shape", "dtype", "x_grad", "dropout", "clock")
    timed = {(r["impl"], *(r.get(k) for k in keys)): r for r in rows if r["kind"] == "time"}
    out = []
    for group in dict.fromkeys(key[1:] for key in timed):
        op, shape, dtype, x_grad, dropout, clock = group

        def add(name, num, den, target=None):
            def value(stat):
                return timed[(num, *group)][stat] / timed[(den, *group)][stat]
            row = {"kind": "ratio", "bench": "lora", "ratio": name, "shape": shape, "dtype": dtype,
                   "x_grad": "" if x_grad is None else x_grad, "clock": clock,
                   "value": value("median_ms"), "value (min)": value("min_ms"), "target": "",
                   "met": ""}
            if target is not None:
                sign, bound = target
                row["target"] = f"{sign} {bound}"
                row["met"] = row["value"] <= bound if sign == "<=" else row["value"] >= bound
            out.append(row)

        if op == "merge":
            add("merge: peft time / pykernels", "peft merge_and_unload()", "pykernels merge()",
                (">=", 8))
        elif dropout:
            add(f"dropout {dropout}: peft time / pykernels", PEFT, OURS)
        else:
            at_scale = int(shape.split("x")[0]) >= 32
            add("fwd+bwd: pykernels / base", OURS, BASE, ("<=", 1.05) if at_scale else None)
            add("fwd+bwd: peft / base", PEFT, BASE)
    return out


def run(args) -> list[dict]:
    d = 1024 if args.quick else 4096
    token_counts = (1, 32, 256) if args.quick else (1, 32, 512, 2048)
    min_time = 0.1 if args.quick else 0.3
    copy_gbps = common.machine_limits(args.quick)[0]["value"]
    torch.manual_seed(0)
    rows = []
    for dtype in DTYPES:
        for tokens in token_counts:
            if tokens == 2048 and dtype == torch.float32:
                continue  # ~1 s a call per side on 2 cores: bf16 covers the large-T case
            for x_grad in (True, False):
                rows += bench_train_step(d, dtype, tokens, x_grad, 0.0, min_time)
        rows += bench_train_step(d, dtype, token_counts[-2], True, 0.1, min_time)
        rows += bench_merge(d, dtype, 3 if args.quick else 5, copy_gbps)
    return rows + ratios(rows)


if __name__ == "__main__":
    common.main({"lora": __name__})
