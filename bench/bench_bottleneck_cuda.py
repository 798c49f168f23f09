"""Bottleneck adapters on CUDA: the inference tax of a Pfeiffer adapter on a
Llama-7B-shaped decoder block (bench_bottleneck.py's block and peer, bf16, 512
and 4096 tokens; --quick: the tiny block), pykernels vs a plain nn.Module
adapter: block with adapter / block alone, forward (target <= 1.02) and
forward + backward (the block frozen, the input requiring grad).

Timing: CUDA events, bench_nf4_cuda.measure_cuda (a 256 MiB buffer zeroed
before each call). Without a CUDA device run() returns no rows.

    python bench/bench_bottleneck_cuda.py [--quick] [--out DIR]
"""
from __future__ import annotations

import common  # first: it quiets the peers' import-time logging

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_bottleneck import BLOCK, OURS, PLAIN, PlainAdapter, REDUCTION, block  # noqa: E402
from bench_nf4_cuda import FLUSH_BYTES, measure_cuda  # noqa: E402
from pykernels.nn import AdaptedModule, add_bottleneck_adapters  # noqa: E402


def _rope(layer, x, pos):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    return LlamaRotaryEmbedding(layer.self_attn.config).to(x.device)(x, pos)


def bench_tokens(layer, mlps, x, pos, rope, flush, shape) -> list[dict]:
    def forward(mlp, inp):
        layer.mlp = mlp
        return layer(inp, position_ids=pos, position_embeddings=rope)

    with torch.no_grad():
        want, got = forward(mlps[PLAIN], x).float(), forward(mlps[OURS], x).float()
        err = (got - want).abs().max().item() / (1 + want.abs().max().item())
        if err > 2e-2:
            raise RuntimeError(
                f"bench_bottleneck_cuda: pykernels and the plain adapter differ ({err:.3g})")
    rows = []
    xg, dy = x.clone().requires_grad_(), torch.randn_like(x)

    def step(mlp):
        def go():
            xg.grad = None
            forward(mlp, xg).backward(dy)
        return go

    for op in ("forward", "fwd+bwd"):
        for impl, mlp in mlps.items():
            if op == "forward":
                def fn(mlp=mlp):
                    with torch.no_grad():
                        forward(mlp, x)
            else:
                fn = step(mlp)
            rows.append({"kind": "time", "bench": "bottleneck_cuda", "op": op, "impl": impl,
                         "shape": shape, "dtype": "bf16", **measure_cuda(fn, flush).fields()})
    base = {r["op"]: r["median_ms"] for r in rows if r["impl"] == BLOCK}
    for r in list(rows):
        if r["impl"] != BLOCK:
            ours = r["impl"] == OURS
            value = r["median_ms"] / base[r["op"]]
            rows.append({"kind": "ratio", "bench": "bottleneck_cuda",
                         "ratio": f"{r['op']}: {r['impl']} / block alone", "shape": shape,
                         "value": value, "target": "<= 1.02" if ours else "",
                         "met": value <= 1.02 if ours else ""})
    return rows


def run(args) -> list[dict]:
    if not torch.cuda.is_available():
        print("bench_bottleneck_cuda: no CUDA device, nothing to time")
        return []
    layer, x, pos, rope = block(args.quick)
    layer = layer.cuda()
    base_mlp = layer.mlp
    (inserted,) = add_bottleneck_adapters(layer, "pfeiffer", reduction=REDUCTION)
    nn.init.normal_(inserted.adapter.up.weight, std=0.02)
    mlps = {BLOCK: base_mlp, OURS: inserted.wrapper,
            PLAIN: AdaptedModule(base_mlp, PlainAdapter(inserted.adapter))}
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    rows = []
    for tokens in ((x.shape[1],) if args.quick else (512, 4096)):
        xt = torch.randn(1, tokens, x.shape[-1], dtype=x.dtype, device="cuda")
        post = torch.arange(tokens, device="cuda").unsqueeze(0)
        rows += bench_tokens(layer, mlps, xt, post, _rope(layer, xt, post), flush,
                             f"{tokens}x{x.shape[-1]}")
    return rows


if __name__ == "__main__":
    common.main({"bottleneck_cuda": __name__})
