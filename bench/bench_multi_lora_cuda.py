"""Multi-LoRA on CUDA, serving: the bench_multi_lora.py comparison on the GPU (a
4096x4096 bf16 layer, 1024 with --quick, r = 16, 16 adapters on random rows vs the
same layer with one adapter vs peft's adapter_names path vs the base alone;
decode 512x1 and prefill 8x64 tokens), timed with CUDA events
(bench_nf4_cuda.measure_cuda). Targets as on the CPU. Without a CUDA device run()
returns no rows, so bench/run.py can import this module anywhere.

    python bench/bench_multi_lora_cuda.py [--quick] [--out DIR]
"""
from __future__ import annotations

import common  # first: it quiets the peers' import-time logging

import torch  # noqa: E402

from bench_multi_lora import (ADAPTERS, BASE, MANY, ONE, PEFT, RANK, SHAPES, _layers,  # noqa: E402
                              ratios)
from bench_nf4_cuda import FLUSH_BYTES, measure_cuda  # noqa: E402

DTYPE = torch.bfloat16


def bench_forward(d: int, shape: str, flush: torch.Tensor) -> list[dict]:
    rows_n, tokens = SHAPES[shape]
    base, many, one, theirs, _ = (m.cuda() for m in _layers(d, DTYPE))
    x = torch.randn(rows_n, tokens, d, dtype=DTYPE, device="cuda")
    ids = torch.randint(-1, ADAPTERS, (rows_n,), device="cuda")
    names = ["__base__" if i < 0 else f"t{i}" for i in ids.tolist()]
    one_ids = torch.zeros(rows_n, dtype=torch.int64, device="cuda")
    with torch.no_grad():
        want = theirs(x, adapter_names=names).float()
        err = (many(x, adapter_ids=ids).float() - want).abs().max().item()
        if err > 5e-2 * (1 + want.abs().max().item()):
            raise RuntimeError(f"bench_multi_lora_cuda: pykernels and peft differ by {err:.3g}")
        fns = {BASE: lambda: base(x), ONE: lambda: one(x, adapter_ids=one_ids),
               MANY: lambda: many(x, adapter_ids=ids), PEFT: lambda: theirs(x, adapter_names=names)}
        return [{"kind": "time", "bench": "multi_lora_cuda", "op": "forward", "impl": impl,
                 "shape": f"{shape} {rows_n}x{tokens}x{d} r{RANK}",
                 "dtype": common.dtype_name(DTYPE),
                 **measure_cuda(fn, flush).fields()} for impl, fn in fns.items()]


def run(args) -> list[dict]:
    if not torch.cuda.is_available():
        print("bench_multi_lora_cuda: no CUDA device, nothing to time")
        return []
    d = 1024 if args.quick else 4096
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        rows += bench_forward(d, shape, flush)
    return rows + ratios(rows)


if __name__ == "__main__":
    common.main({"multi_lora_cuda": __name__})
