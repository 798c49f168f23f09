"""Training memory: measuring the peak, and estimating it before you start.

Measuring (``PeakMemory``): on a GPU, torch.cuda.max_memory_allocated above what
was allocated at the start. On the CPU, the growth of the process's peak
resident set (VmHWM) above its resident set at the start; Linux resets VmHWM
when "5" is written to /proc/self/clear_refs, so the peak is exact and costs
nothing. Elsewhere a thread samples the RSS (psutil) every millisecond. RSS
only follows live tensors if freed ones go back to the OS: see
``return_freed_memory_to_os``.

Estimating (``estimate``): full fine-tuning, LoRA and QLoRA of a Llama-shaped
decoder, broken down as

  weights      the frozen base: 16-bit (or --weight-bytes); QLoRA: NF4 linears,
               4 bits + double-quantized absmax = 4.127 bits, the rest 16-bit
  trainable    full: every weight; (Q)LoRA: r·(in + out) per adapted linear
  gradients    one per trainable weight, in its dtype
  optimizer    AdamW: two fp32 moments per trainable weight (8 bytes); plus an
               fp32 master copy (4 bytes) when 16-bit weights train under mixed
               precision
  activations  what autograd keeps from the forward until the backward uses it,
               per layer per token (model below), plus the LM head's logits for
               the tokens that get a loss

The activation model: what autograd keeps from the forward until the backward,
per layer per token, counted by storage with saved-tensor hooks on SmolLM2's
LlamaDecoderLayer (transformers 5.24, SDPA, no padding mask so no GQA copy of
k/v), with h the hidden size, kv = kv_heads·head_dim, m the MLP width, r the
adapter rank:

  6h            layer input, RMSNorm inputs/outputs, attention output, o_proj input
  2kv           rotated k, v (attention's inputs)
  4m            gate, silu(gate), up, silu·up
  heads + 2     attention's logsumexp per head, the two RMSNorm 1/rms
  7r            x·Aᵀ of each of the 7 adapted linears ((Q)LoRA only)

  = 6h + 2kv + 4m + heads + 2 + 7r elements (SmolLM2, r=8: 10051, 40 KB in
  fp32). Full fine-tuning saves the same tensors (the linears' inputs serve
  the weight gradients too). With gradient checkpointing a layer keeps its
  input (h) and one layer at a time is recomputed in full. A padding mask makes
  transformers copy k and v to every head (+2h).
"""
from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass
from typing import Optional

import torch

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # double-quantized absmax (DESIGN §2)
GB = 1e9


# ---- measuring ----

def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_memory_to_os() -> bool:
    """Fixes glibc's mmap threshold at 128 KiB so freed tensors above it are unmapped.

    glibc serves blocks above the threshold with mmap and unmaps them on free,
    but raises the threshold to the largest block freed (up to 32 MiB); after
    that, freed activations stay in the heap and peak RSS shows the allocator's
    history rather than the training step. SmolLM2 QLoRA, 384 tokens: the
    second step's RSS peak was 224 MB above an RSS the first had already raised
    by 616 MB; with the threshold fixed, 467 MB above the first step's end.
    Process-wide; returns False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes``: the peak
    memory above the start, and ``peak.kind`` saying what was measured."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.bytes: Optional[int] = None
        self.kind = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.kind = "torch.cuda.max_memory_allocated growth"
            return self
        return_freed_memory_to_os()
        self._start = self._rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._sampler = None
            self.kind = "peak RSS growth (VmHWM)"
        except OSError:
            self._samples = [self._start]
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
            self.kind = "peak RSS growth (sampled every 1 ms)"
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self._samples.append(self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            return _read_status_kib("VmRSS") * 1024
        except OSError:
            import psutil
            return psutil.Process().memory_info().rss

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._sampler is None:
            self.bytes = _read_status_kib("VmHWM") * 1024 - self._start
        else:
            self._stop.set()
            self._sampler.join()
            self.bytes = max(self._samples + [self._rss()]) - self._start
        return False


# ---- estimating ----

@dataclass
class Shape:
    """A Llama-style decoder: what the estimate needs to know of a model."""
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of q, k, v, o, gate, up, down of one layer."""
        h, kv, m = self.hidden, self.kv_dim, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linears())

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = (2 * self.layers + 1) * self.hidden
        return self.linear_params + embeddings + norms


# The LLaMA shapes the commonly quoted figures refer to; --params picks the nearest.
LLAMA_SHAPES = [
    Shape("LLaMA-7B", 32, 4096, 11008, 32, 32, 32000),
    Shape("LLaMA-13B", 40, 5120, 13824, 40, 40, 32000),
    Shape("LLaMA-33B", 60, 6656, 17920, 52, 52, 32000),
    Shape("LLaMA-65B", 80, 8192, 22016, 64, 64, 32000),
]


def shape_for_params(params: float) -> Shape:
    return min(LLAMA_SHAPES, key=lambda s: abs(math.log(s.params / params)))


def shape_from_config(config, name: str = "") -> Shape:
    """From a transformers LlamaConfig (or anything with its field names)."""
    return Shape(name or getattr(config, "model_type", "model"), config.num_hidden_layers,
                 config.hidden_size, config.intermediate_size, config.num_attention_heads,
                 getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                 config.vocab_size, bool(getattr(config, "tie_word_embeddings", False)))


def activation_elements_per_token(shape: Shape, method: str, rank: int) -> int:
    """Elements one layer saves for the backward, per token (module docstring)."""
    h, kv, m = shape.hidden, shape.kv_dim, shape.intermediate
    adapters = 7 * rank if method in ("lora", "qlora") else 0
    return 6 * h + 2 * kv + 4 * m + shape.heads + 2 + adapters


@dataclass
class Estimate:
    shape: Shape
    method: str
    tokens: int
    weights: float
    trainable_params: int
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def training_state(self) -> float:
        """What training adds on top of the loaded model."""
        return self.gradients + self.optimizer + self.activations + self.logits

    @property
    def total(self) -> float:
        return self.weights + self.training_state

    def rows(self) -> list[tuple[str, float]]:
        return [("weights (frozen base + adapters)", self.weights),
                ("gradients", self.gradients), ("optimizer state (AdamW)", self.optimizer),
                ("activations", self.activations), ("logits (loss tokens)", self.logits),
                ("total", self.total)]


def estimate(shape: Shape, method: str = "qlora", rank: int = 16, seq: int = 512, batch: int = 1,
             weight_bytes: int = 2, act_bytes: int = 2, adapter_bytes: int = 4,
             master_weights: Optional[bool] = None, checkpointing: bool = False,
             loss_tokens: Optional[int] = None) -> Estimate:
    """Bytes to fine-tune ``shape`` with ``method`` ('full', 'lora', 'qlora').

    weight_bytes: the frozen / trained weights' dtype (2: bf16/fp16, 4: fp32).
    act_bytes: activations' dtype. adapter_bytes: the adapters' dtype.
    master_weights: keep an fp32 copy of 16-bit trainable weights (mixed
    precision); default: for full fine-tuning with 16-bit weights.
    loss_tokens: tokens per sequence whose logits are computed (default: all,
    as a language-model loss does; classification heads need 1)."""
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be 'full', 'lora' or 'qlora', got {method!r}")
    tokens = seq * batch
    other = shape.params - shape.linear_params
    if method == "qlora":
        base = shape.linear_params * NF4_BITS / 8 + other * weight_bytes
    else:
        base = shape.params * weight_bytes
    if method == "full":
        trainable, train_bytes = shape.params, weight_bytes
        adapters = 0.0
    else:
        trainable = shape.layers * rank * sum(i + o for i, o in shape.linears())
        train_bytes = adapter_bytes
        adapters = trainable * adapter_bytes
    if master_weights is None:
        master_weights = method == "full" and weight_bytes < 4
    optimizer = trainable * (8 + (4 if master_weights and train_bytes < 4 else 0))
    per_layer = activation_elements_per_token(shape, method, rank) * act_bytes
    final_norm = shape.hidden * act_bytes
    if checkpointing:
        activations = tokens * (shape.layers * shape.hidden * act_bytes + per_layer + final_norm)
    else:
        activations = tokens * (shape.layers * per_layer + final_norm)
    # The head's output in act_bytes, its fp32 log-softmax, and that one's gradient.
    scored = batch * (seq if loss_tokens is None else loss_tokens)
    logits = scored * shape.vocab * (act_bytes + 4 + 4)
    return Estimate(shape, method, tokens, base + adapters, trainable,
                    trainable * train_bytes, optimizer, activations, logits)


# Commonly quoted figures (QLoRA paper, Dettmers et al. 2023) for LLaMA-65B.
QUOTED_65B = {"full": 780 * GB, "qlora": 48 * GB}
QUOTED_NOTES = {
    "full": "the 780 GB quote is 12 bytes/param (16-bit weights + 16-bit gradients + two fp32 "
            "Adam moments) with no fp32 master copy and no activations; mixed precision adds "
            "4 bytes/param of master weights (1040 GB) and activations come on top",
    "qlora": "the 48 GB quote is a 48 GB GPU that fits it: NF4 weights (~33.5 GB) + adapters "
             "+ checkpointed activations at a small batch, with paged optimizers absorbing "
             "spikes; the estimate here is the steady state of the same setup",
}


def format_bytes(n: float) -> str:
    for unit, scale in (("GB", GB), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def report(est: Estimate) -> str:
    s = est.shape
    lines = [f"{s.name}: {s.params / 1e9:.3g} B params, {s.layers} layers, hidden {s.hidden}, "
             f"MLP {s.intermediate}, {s.heads} heads ({s.kv_heads} kv), vocab {s.vocab}",
             f"{est.method}: {est.trainable_params:,} trainable params "
             f"({100 * est.trainable_params / s.params:.3g}%), {est.tokens} tokens per step"]
    lines += [f"  {name:34s} {format_bytes(value):>12s}" for name, value in est.rows()]
    return "\n".join(lines)


def quoted_comparison(shape: Shape, rank: int = 64, seq: int = 512, batch: int = 1) -> str:
    """The estimates beside the commonly quoted 65B figures, and why they differ."""
    full_bare = estimate(shape, "full", seq=seq, batch=batch, master_weights=False)
    full_mixed = estimate(shape, "full", seq=seq, batch=batch)
    qlora = estimate(shape, "qlora", rank=rank, seq=seq, batch=batch, checkpointing=True)
    rows = [
        ("full, 16-bit + Adam (weights, grads, moments)", full_bare.weights + full_bare.gradients
         + full_bare.optimizer, QUOTED_65B["full"]),
        (f"full, mixed precision, + activations (seq {seq})", full_mixed.total, QUOTED_65B["full"]),
        (f"QLoRA r={rank}, checkpointing (seq {seq})", qlora.total, QUOTED_65B["qlora"]),
    ]
    lines = [f"\n{'65B comparison':50s} {'estimate':>10s} {'quoted':>9s}"]
    lines += [f"{name:50s} {value / GB:8.1f} GB {quoted / GB:6.0f} GB" for name, value, quoted in rows]
    lines += ["- " + QUOTED_NOTES["full"], "- " + QUOTED_NOTES["qlora"]]
    return "\n".join(lines)
