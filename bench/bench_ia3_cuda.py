"""IA³ on CUDA: bench_ia3.py's Llama-7B-shaped block (hidden 4096, FFN 11008, 32
heads, 512 tokens, bf16; --quick: hidden 256) on the GPU, one training step with
IA³ on k_proj, v_proj, down_proj (ours, and peft's when installed) against the
plain block. Target: pykernels <= 1.03x the plain block. Timing: CUDA events,
bench_nf4_cuda.measure_cuda (median of 30 calls after a warm-up). Without a CUDA
device, or without transformers, run() returns no rows.

    python bench/bench_ia3_cuda.py [--quick] [--out DIR]
"""
from __future__ import annotations

import common  # first: it quiets the peers' import-time logging

import torch  # noqa: E402

import bench_ia3  # noqa: E402
from bench_nf4_cuda import FLUSH_BYTES, copy_row, measure_cuda  # noqa: E402


def run(args) -> list[dict]:
    if not torch.cuda.is_available():
        print("bench_ia3_cuda: no CUDA device, nothing to time")
        return []
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("bench_ia3_cuda: transformers not installed (the block is its LlamaDecoderLayer)")
        return []
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    shape = (256, 688, 4, 64) if args.quick else (4096, 11008, 32, 512)
    steps, label = bench_ia3.sides(*shape, torch.bfloat16, device="cuda")
    timings = {impl: measure_cuda(step, flush) for impl, step in steps.items()}
    return [copy_row(flush)] + bench_ia3.rows_for(timings, label, torch.bfloat16, "cuda events",
                                                   bench="ia3_cuda")


if __name__ == "__main__":
    common.main({"ia3_cuda": __name__})
