"""Prompt tuning's input embeddings in one pass: the virtual tokens, then the
token embeddings.

    out[b, :n] = prompt,   out[b, n:] = weight[input_ids[b]]     [B, n + S, D]

peft's PromptTuning for causal LMs concatenates ``prompt.expand(B, n, D)`` with
``embed_tokens(input_ids)``; this gathers both straight into the output. Ids
outside the vocabulary raise (naming the position and the vocabulary size).

Autograd: ``grad_prompt = Σ_b grad_out[b, :n]``; the word embeddings get
``index_add`` of ``grad_out[:, n:]`` when they require grad (they are normally
frozen, as in peft).
"""
from __future__ import annotations

import torch

from .nf4 import _check_same_device

_ops = torch.ops.pykernels


def prompt_embed(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """input_ids int64 ``[B, S]``, weight ``[V, D]``, prompt ``[n, D]`` in weight's
    dtype -> ``[B, n + S, D]``."""
    return _ops.prompt_embed(input_ids, weight, prompt)


@torch.library.register_fake("pykernels::prompt_embed")
def _prompt_embed_fake(input_ids, weight, prompt):
    if input_ids.dtype != torch.int64:
        raise TypeError(f"prompt_embed: input_ids must be int64 (token ids), got {input_ids.dtype}")
    if prompt.dtype != weight.dtype:
        raise TypeError(f"prompt_embed: prompt must have weight's dtype {weight.dtype}, got "
                        f"{prompt.dtype}")
    _check_same_device("prompt_embed", weight=weight, input_ids=input_ids, prompt=prompt)
    b, s = input_ids.shape
    return weight.new_empty((b, prompt.shape[0] + s, weight.shape[1]))


def _setup(ctx, inputs, output):
    input_ids, weight, prompt = inputs
    ctx.n = prompt.shape[0]
    ctx.vocab = weight.shape[0]
    ctx.save_for_backward(input_ids)


def _backward(ctx, grad):
    (input_ids,) = ctx.saved_tensors
    n = ctx.n
    grad_weight = grad_prompt = None
    if ctx.needs_input_grad[1]:
        tokens = grad[:, n:].reshape(-1, grad.shape[-1])
        grad_weight = grad.new_zeros((ctx.vocab, grad.shape[-1])).index_add_(
            0, input_ids.reshape(-1), tokens)
    if ctx.needs_input_grad[2]:
        grad_prompt = grad[:, :n].sum(0)
    return None, grad_weight, grad_prompt


torch.library.register_autograd("pykernels::prompt_embed", _backward, setup_context=_setup)
