"""Bottleneck adapters on the CPU: the inference tax of a Pfeiffer adapter on a
Llama-7B-shaped decoder block, pykernels vs a plain nn.Module adapter.

- The block: transformers' LlamaDecoderLayer, hidden 4096, FFN 11008, 32 heads,
  random bf16 weights, 512 tokens with its rotary embeddings (--quick: hidden
  256, FFN 688, 4 heads, 64 tokens). An adapter of reduction 16 (m = 256) after
  the FFN (Pfeiffer), relu, put in by add_bottleneck_adapters; the peer is the
  adapter as users write it (h + s·up(relu(down(h))), nn.Linear layers) on the
  same weights, wrapped the same way.
- Ratios: block with adapter / block alone (target <= 1.02, the issue's), for
  the forward (inference, no grad) and forward + backward (adapter training:
  the block frozen, the input requiring grad); and 1 + adapter alone / block
  alone, the same tax from the adapter's own time (steadier on a shared
  machine, where 2% is within the noise of one block call).

Timing: common.measure (interleaved calls, median and min), in thread CPU time
when torch runs one thread (--threads 1): what a call costs, whatever else
holds the cores of this shared machine. Outputs are checked
against the plain adapter before anything is timed.

    python bench/bench_bottleneck.py [--quick] [--threads 1]
"""
from __future__ import annotations

import time

import common  # first: it quiets the peers' import-time logging

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pykernels.nn import AdaptedModule, BottleneckAdapter, add_bottleneck_adapters  # noqa: E402

DTYPE = torch.bfloat16
REDUCTION = 16
BLOCK, OURS, PLAIN = "block alone", "block + pykernels adapter", "block + plain nn.Module adapter"


class PlainAdapter(nn.Module):
    def __init__(self, ours: BottleneckAdapter):
        super().__init__()
        self.down, self.up, self.scale = ours.down, ours.up, ours.scale  # the same weights

    def forward(self, h):
        return h + self.scale * self.up(torch.relu(self.down(h)))


def block(quick: bool):
    hidden, ffn, heads, tokens = (256, 688, 4, 64) if quick else (4096, 11008, 32, 512)
    layer, rotary = common.llama_block(hidden, ffn, heads, DTYPE)
    layer.eval()
    x = torch.randn(1, tokens, hidden, dtype=DTYPE)
    pos = torch.arange(tokens).unsqueeze(0)
    return layer, x, pos, rotary(x, pos)


def run(args) -> list[dict]:
    layer, x, pos, rope = block(args.quick)
    d, tokens = x.shape[-1], x.shape[1]
    base_mlp = layer.mlp
    (inserted,) = add_bottleneck_adapters(layer, "pfeiffer", reduction=REDUCTION)
    ours_mlp = inserted.wrapper
    adapter = inserted.adapter
    nn.init.normal_(adapter.up.weight, std=0.02)
    nn.init.normal_(adapter.up.bias, std=0.02)
    plain_mlp = AdaptedModule(base_mlp, PlainAdapter(adapter))
    mlps = {BLOCK: base_mlp, OURS: ours_mlp, PLAIN: plain_mlp}

    def forward(mlp, inp):
        layer.mlp = mlp
        return layer(inp, position_ids=pos, position_embeddings=rope)

    with torch.no_grad():
        want = forward(plain_mlp, x).float()
        got = forward(ours_mlp, x).float()
        err = (got - want).abs().max().item() / (1 + want.abs().max().item())
        if err > 2e-2:
            raise RuntimeError(
                f"bench_bottleneck: pykernels and the plain adapter differ ({err:.3g})")
    shape = f"{tokens}x{d} m{adapter.bottleneck_dim}"
    min_time = 0.2 if args.quick else 4.0
    rows = []

    def time_rows(op, fns):
        clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        for impl, t in common.measure(fns, min_time=min_time, clock=clock).items():
            rows.append({"kind": "time", "bench": "bottleneck", "op": op, "impl": impl,
                         "shape": shape, "dtype": common.dtype_name(DTYPE), **t.fields()})

    h = torch.randn(tokens, d, dtype=DTYPE)
    with torch.no_grad():
        time_rows("forward", {name: (lambda m=m: forward(m, x)) for name, m in mlps.items()}
                  | {"pykernels adapter alone": lambda: adapter(h),
                     "plain adapter alone": lambda: plain_mlp.adapter(h)})
    adapter.requires_grad_(True)

    def step(fn, inp, grad):
        inp = inp.clone().requires_grad_()

        def go():
            inp.grad = None
            adapter.zero_grad(set_to_none=True)
            fn(inp).backward(grad)
        return go

    dy, dh = torch.randn_like(x), torch.randn_like(h)
    time_rows("fwd+bwd", {name: step(lambda i, m=m: forward(m, i), x, dy)
                          for name, m in mlps.items()}
              | {"pykernels adapter alone": step(adapter, h, dh),
                 "plain adapter alone": step(plain_mlp.adapter, h, dh)})
    layer.mlp = base_mlp
    return rows + ratios(rows)


def ratios(rows):
    t = {(r["op"], r["impl"]): r for r in rows if r["kind"] == "time"}
    out = []
    for op in ("forward", "fwd+bwd"):
        for stat in ("min_ms", "median_ms"):
            base = t[(op, BLOCK)][stat]
            for impl, alone in ((OURS, "pykernels adapter alone"), (PLAIN, "plain adapter alone")):
                who = "pykernels" if impl == OURS else "plain"
                target = "<= 1.02" if impl == OURS else ""
                direct = t[(op, impl)][stat] / base
                parts = 1 + t[(op, alone)][stat] / base
                for name, value in ((f"{op}: block with {who} adapter / block ({stat})", direct),
                                    (f"{op}: 1 + {who} adapter alone / block ({stat})", parts)):
                    out.append({"kind": "ratio", "bench": "bottleneck", "ratio": name,
                                "shape": rows[-1]["shape"], "value": value, "target": target,
                                "met": (value <= 1.02) if target else ""})
    return out


if __name__ == "__main__":
    common.main({"bottleneck": __name__})
