"""Many bottleneck adapters in one model on the CPU: a mixed batch of 8 Pfeiffer
adapters (each batch row its own, MultiBottleneckAdapter) against the same batch
through one adapter, on the Llama-7B-shaped block of bench_bottleneck.

- The block: bench_bottleneck's (hidden 4096, FFN 11008, 32 heads, bf16), a batch
  of 8 rows x 64 tokens (--quick: hidden 256, 8 rows x 8 tokens). 8 named
  adapters of reduction 16 (m = 256), relu, after the FFN, put in by
  add_bottleneck_adapters(name=...), up weights random so each one matters.
- Sides: the block alone; one adapter for every row (ids all 0: one
  consecutive group); 8 adapters, rows in a shuffled order (ids: 8 groups of
  one row each); the rows alternating between 2 adapters (2 groups of 4 rows,
  gathered and scattered: index_select / index_copy_); each of these one
  ops.multi_bottleneck call, which groups the rows natively and runs the fused
  pipeline per group; the peer: the plain per-row loop a user writes (each row
  through its adapter as nn.Linear layers, torch.cat).
- Ratios: mixed 8 / one adapter, for the whole block and for the adapter
  alone (the grouping's own cost, which the block hides), and the peer / ours.
  For scale: the bytes the adapter alone moves (weights + h in + out), 8 mixed
  / 1: 8 adapters read 8 adapters' weights, each used by 1/8 of the tokens (the
  flops are the same), so a bandwidth-bound adapter pays about this ratio
  (less while one adapter's weights stay in cache, as in a timing loop).

Measured here (2 shared cores, load 2.6-3.1, --threads 1, thread CPU time,
min of calls), one op call per forward: the block with 8 mixed adapters / with
1: 0.97 (median 1.03: the adapter is ~3% of the block); the adapter alone, 8
mixed / 1: 2.44 (6.10 / 2.50 ms; bytes ratio 3.33); 2 alternating, gathered
/ 1: 1.76; the plain per-row loop / ours: 1.26 (adapter alone). The Python
per-group loop it replaced, timed by this script in the same session: 8 mixed
/ 1: 2.64 (6.95 / 2.64 ms), plain loop / it: 0.92.

Timing: common.measure (interleaved, median and min), thread CPU time with
--threads 1. Outputs are checked against the per-row plain adapters first.

    python bench/bench_multi_bottleneck.py [--quick] [--threads 1]
"""
from __future__ import annotations

import time

import common  # first: it quiets the peers' import-time logging

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_bottleneck import DTYPE, REDUCTION, PlainAdapter  # noqa: E402
from pykernels.nn import add_bottleneck_adapters  # noqa: E402

N_ADAPTERS = 8
BLOCK, ONE, MIXED, ALTERNATING, PLAIN = (
    "block alone", "block + 1 adapter (all rows)", "block + 8 adapters (mixed rows)",
    "block + 2 adapters (alternating rows, gathered)", "block + plain per-row loop")


class PlainPerRow(nn.Module):
    """What users write without row grouping: each row through its adapter."""

    def __init__(self, multi):
        super().__init__()
        self.adapters = [PlainAdapter(a) for a in multi.adapters.values()]
        self.ids: list[int] = []

    def forward(self, h):
        return torch.cat([self.adapters[a](h[i:i + 1]) for i, a in enumerate(self.ids)])


def run(args) -> list[dict]:
    hidden, ffn, heads, tokens = (256, 688, 4, 8) if args.quick else (4096, 11008, 32, 64)
    layer, rotary = common.llama_block(hidden, ffn, heads, DTYPE)
    layer.eval()
    base_mlp = layer.mlp
    for i in range(N_ADAPTERS):
        (item,) = add_bottleneck_adapters(layer, "pfeiffer", reduction=REDUCTION, name=f"t{i}")
        nn.init.normal_(item.adapter.up.weight, std=0.02)
        nn.init.normal_(item.adapter.up.bias, std=0.02)
    ours_mlp = layer.mlp
    multi = ours_mlp.adapter
    plain = PlainPerRow(multi)
    plain_mlp = type(ours_mlp)(base_mlp, plain)
    mixed_ids = torch.randperm(N_ADAPTERS, generator=torch.Generator().manual_seed(0))
    alternating_ids = torch.arange(N_ADAPTERS) % 2

    def inputs(rows):
        x = torch.randn(rows, tokens, hidden, dtype=DTYPE)
        pos = torch.arange(tokens).unsqueeze(0)
        return x, pos, rotary(x, pos)

    x8 = inputs(N_ADAPTERS)

    def forward(mlp, ids, xs):
        x, pos, rope = xs
        layer.mlp = mlp
        multi.row_ids = ids
        plain.ids = ids.tolist()
        return layer(x, position_ids=pos, position_embeddings=rope)

    one_ids = torch.zeros(N_ADAPTERS, dtype=torch.int64)
    with torch.no_grad():
        for ids in (mixed_ids, alternating_ids):
            want = forward(plain_mlp, ids, x8).float()
            got = forward(ours_mlp, ids, x8).float()
            err = (got - want).abs().max().item() / (1 + want.abs().max().item())
            if err > 2e-2:
                raise RuntimeError(f"bench_multi_bottleneck: ours and the plain per-row adapters "
                                   f"differ ({err:.3g})")
    shape = f"{N_ADAPTERS}x{tokens}x{hidden} m{hidden // REDUCTION}"
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    h8 = torch.randn_like(x8[0])
    with torch.no_grad():
        fns = {BLOCK: lambda: forward(base_mlp, one_ids, x8),
               ONE: lambda: forward(ours_mlp, one_ids, x8),
               MIXED: lambda: forward(ours_mlp, mixed_ids, x8),
               ALTERNATING: lambda: forward(ours_mlp, alternating_ids, x8),
               PLAIN: lambda: forward(plain_mlp, mixed_ids, x8),
               "1 adapter alone": lambda: multi(h8, adapter_ids=one_ids),
               "8 adapters alone": lambda: multi(h8, adapter_ids=mixed_ids),
               "2 adapters alone, alternating": lambda: multi(h8, adapter_ids=alternating_ids),
               "plain per-row loop alone": lambda: plain(h8)}
        timings = common.measure(fns, min_time=0.2 if args.quick else 4.0, clock=clock)
    layer.mlp = base_mlp
    rows = [{"kind": "time", "bench": "multi_bottleneck", "op": "forward", "impl": impl,
             "shape": shape, "dtype": common.dtype_name(DTYPE), **t.fields()}
            for impl, t in timings.items()]
    m = hidden // REDUCTION
    weights, activations = 2 * hidden * m * DTYPE.itemsize, 2 * h8.numel() * DTYPE.itemsize
    floor = (N_ADAPTERS * weights + activations) / (weights + activations)
    return rows + ratios(timings, shape) + [
        {"kind": "ratio", "bench": "multi_bottleneck", "shape": shape, "value": floor,
         "ratio": "adapter alone: bytes moved, 8 mixed / 1 (weights + h)", "target": "",
         "met": ""}]


def ratios(t, shape):
    pairs = (("block: 8 adapters mixed / 1 adapter", MIXED, ONE),
             ("block: 8 adapters mixed / block alone", MIXED, BLOCK),
             ("block: plain per-row loop / ours, 8 mixed", PLAIN, MIXED),
             ("adapter alone: 8 mixed / 1", "8 adapters alone", "1 adapter alone"),
             ("adapter alone: 2 alternating, gathered / 1", "2 adapters alone, alternating",
              "1 adapter alone"),
             ("adapter alone: plain per-row loop / ours, 8 mixed", "plain per-row loop alone",
              "8 adapters alone"))
    return [{"kind": "ratio", "bench": "multi_bottleneck", "ratio": f"{name} ({stat})",
             "shape": shape, "value": getattr(t[a], stat) / getattr(t[b], stat), "target": "",
             "met": ""}
            for name, a, b in pairs for stat in ("min_s", "median_s")]


if __name__ == "__main__":
    common.main({"multi_bottleneck": __name__})
