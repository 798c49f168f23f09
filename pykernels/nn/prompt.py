"""Prompt tuning (peft's PromptTuning, task CAUSAL_LM): ``n`` trainable virtual
token embeddings prepended to the input embeddings of a frozen model.

    PromptEmbedding(n, dim, init=...)   the virtual tokens; forward(input_ids, word_embeddings)
                                        gives [B, n + S, dim] in one pass (ops.prompt_embed)
    prompt_tuning(model, n, ...)        wraps a transformers causal LM: a PromptTuningLM whose
                                        forward and generate take input_ids as before

The same numbers as peft: ``PromptEmbedding.embedding.weight`` is peft's
``prompt_encoder.<adapter>.embedding.weight`` (in a saved peft adapter, the
``prompt_embeddings`` tensor), kept in fp32 and cast to the embeddings' dtype on
use; the attention mask gets ones and the labels -100 for the virtual
positions; position ids run over the whole n + S sequence.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from .. import ops

INITS = ("random", "vocab", "text")


def _embedding_weight(word_embeddings) -> torch.Tensor:
    return word_embeddings.weight if isinstance(word_embeddings, nn.Module) else word_embeddings


class PromptEmbedding(nn.Module):
    """``num_virtual_tokens`` trainable embeddings of size ``token_dim`` (fp32).

    init (peft's PromptTuningInit):
      * ``"random"``: N(0, 1), nn.Embedding's default (peft's RANDOM);
      * ``"vocab"``: rows of ``word_embeddings`` at ids drawn uniformly from the
        vocabulary with torch's generator (peft's SAMPLE_VOCAB);
      * ``"text"``: the embeddings of ``tokenizer(init_text)["input_ids"]``,
        cropped to n, or repeated and cropped when shorter (peft's TEXT).
        ``tokenizer`` is a tokenizer object or a name/path for AutoTokenizer.
    ``word_embeddings``: an nn.Embedding or its weight [vocab, token_dim].
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, init: str = "random",
                 word_embeddings=None, init_text: Optional[str] = None, tokenizer=None,
                 device=None):
        super().__init__()
        if num_virtual_tokens < 1:
            raise ValueError(f"PromptEmbedding: num_virtual_tokens must be >= 1, got "
                             f"{num_virtual_tokens}")
        if init not in INITS:
            raise ValueError(f"PromptEmbedding: init must be one of {INITS}, got {init!r}")
        self.num_virtual_tokens = num_virtual_tokens
        self.token_dim = token_dim
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device)
        if init == "random":
            return
        if word_embeddings is None:
            raise ValueError(f"PromptEmbedding: init={init!r} needs word_embeddings")
        weight = _embedding_weight(word_embeddings)
        if weight.dim() != 2 or weight.shape[1] != token_dim:
            raise ValueError(f"PromptEmbedding: word_embeddings must be [vocab, {token_dim}], got "
                             f"{list(weight.shape)}")
        if init == "vocab":
            ids = torch.randint(0, weight.shape[0], (num_virtual_tokens,), dtype=torch.long)
        else:
            ids = torch.tensor(self._text_ids(init_text, tokenizer), dtype=torch.long)
        with torch.no_grad():
            self.embedding.weight.copy_(weight.detach()[ids.to(weight.device)].float())

    def _text_ids(self, init_text: Optional[str], tokenizer) -> list:
        if not init_text or tokenizer is None:
            raise ValueError("PromptEmbedding: init='text' needs init_text (non-empty) and tokenizer")
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        ids = list(tokenizer(init_text)["input_ids"])
        if not ids:
            raise ValueError(f"PromptEmbedding: init_text {init_text!r} tokenizes to no tokens")
        n = self.num_virtual_tokens
        return (ids * math.ceil(n / len(ids)))[:n]

    def forward(self, input_ids: torch.Tensor, word_embeddings) -> torch.Tensor:
        """``[B, n + S, token_dim]`` in the word embeddings' dtype: the virtual tokens,
        then the embeddings of ``input_ids [B, S]``."""
        weight = _embedding_weight(word_embeddings)
        return ops.prompt_embed(input_ids, weight, self.embedding.weight.to(weight.dtype))


def check_prompt_length(prompt: PromptEmbedding, config, seq: int, new_tokens: int = 0) -> None:
    """ValueError when n virtual + ``seq`` input + ``new_tokens`` tokens exceed the
    context of the model ``config`` describes."""
    n = prompt.num_virtual_tokens
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and n + seq + new_tokens > context:
        extra = f" + {new_tokens} new tokens" if new_tokens else ""
        raise ValueError(f"prompt tuning: {n} virtual tokens + {seq} input tokens{extra} = "
                         f"{n + seq + new_tokens} exceeds the model's context of {context} "
                         "(config.max_position_embeddings)")


def prompt_inputs(prompt: PromptEmbedding, word_embeddings, input_ids: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None,
                  labels: Optional[torch.Tensor] = None) -> dict:
    """A causal LM's arguments with the prompt in front: ``inputs_embeds``
    [B, n + S, dim], the mask widened with ones and the labels with -100."""
    if input_ids is None:
        raise ValueError("prompt tuning: input_ids is required (the prompt is prepended to "
                         "their embeddings)")
    batch, n = input_ids.shape[0], prompt.num_virtual_tokens
    inputs = {"inputs_embeds": prompt(input_ids, word_embeddings)}
    if attention_mask is not None:
        ones = attention_mask.new_ones((batch, n))
        inputs["attention_mask"] = torch.cat([ones, attention_mask], dim=1)
    if labels is not None:
        ignore = labels.new_full((batch, n), -100)
        inputs["labels"] = torch.cat([ignore, labels], dim=1)
    return inputs


class PromptTuningLM(nn.Module):
    """A transformers causal LM with a PromptEmbedding in front.

    ``forward(input_ids, attention_mask=None, labels=None, **kwargs)`` runs the
    model on the prompt-prepended embeddings: the mask is extended with ones and
    the labels with -100 for the n virtual positions (the loss ignores them);
    ``position_ids`` are dropped, as peft does (they would not count the virtual
    tokens). The logits cover all n + S positions, as peft's do.
    ``generate(input_ids, attention_mask=None, **kwargs)`` prepends the prompt once,
    at the first step (the KV cache holds it after that) and returns input_ids
    followed by the new tokens, as generating from input_ids does.
    Inputs longer than the model's context less n raise a ValueError.
    """

    def __init__(self, model: nn.Module, prompt: PromptEmbedding):
        super().__init__()
        self.model = model
        self.prompt = prompt

    @property
    def config(self):
        return self.model.config

    def _check_length(self, seq: int, new_tokens: int = 0) -> None:
        check_prompt_length(self.prompt, self.model.config, seq, new_tokens)

    def _inputs(self, input_ids: torch.Tensor, attention_mask, labels=None) -> dict:
        return prompt_inputs(self.prompt, self.model.get_input_embeddings(), input_ids,
                             attention_mask, labels)

    def forward(self, input_ids: torch.Tensor = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **kwargs):
        if kwargs.pop("position_ids", None) is not None:
            warnings.warn("PromptTuningLM: position_ids are ignored with prompt tuning (as in peft)")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("PromptTuningLM: pass input_ids, not inputs_embeds")
        self._check_length(input_ids.shape[1] if input_ids is not None else 0)
        return self.model(**self._inputs(input_ids, attention_mask, labels), **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 **kwargs) -> torch.Tensor:
        self._check_length(input_ids.shape[1], kwargs.get("max_new_tokens") or 0)
        new_tokens = self.model.generate(**self._inputs(input_ids, attention_mask), **kwargs)
        return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)


def prompt_tuning(model: nn.Module, num_virtual_tokens: int, init: str = "random",
                  init_text: Optional[str] = None, tokenizer=None) -> PromptTuningLM:
    """Freezes ``model`` (a transformers causal LM) and returns it behind a new
    PromptEmbedding (token_dim = the input embeddings' size; see PromptEmbedding
    for ``init``). Only ``prompt.embedding.weight`` trains."""
    model.requires_grad_(False)
    word_embeddings = model.get_input_embeddings()
    prompt = PromptEmbedding(num_virtual_tokens, word_embeddings.weight.shape[1], init,
                             word_embeddings, init_text, tokenizer,
                             device=word_embeddings.weight.device)
    return PromptTuningLM(model, prompt)
