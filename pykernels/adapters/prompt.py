"""Prompt tuning as an adapter method: ``num_virtual_tokens`` trainable
embeddings prepended to the input (nn.PromptEmbedding), and peft's prompt
tuning files (peft_type "PROMPT_TUNING", task CAUSAL_LM, one tensor
``prompt_embeddings``).

The model's input embedding is swapped for a pass-through module that also
holds the PromptEmbedding (so switching adapters swaps it in and out like any
layer); ``prepare_inputs`` turns the call's input_ids into the prompt-prepended
``inputs_embeds`` and widens the attention mask and labels (nn.prompt_inputs,
the same code as PromptTuningLM). Our tensor name is peft's,
``prompt_embeddings``, whatever the model calls its embedding.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..nn import PromptEmbedding
from ..nn.prompt import INITS, check_prompt_length, prompt_inputs
from .registry import AdapterConfig, AdapterMethod, Replacement, register_method

PROMPT_KEY = "prompt_embeddings"
_PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


@dataclass
class PromptTuningConfig(AdapterConfig):
    """``num_virtual_tokens`` virtual tokens; init "random" (N(0, 1)), "vocab"
    (embeddings of random vocabulary ids) or "text" (the embeddings of
    ``init_text``, repeated or cropped to n; ``tokenizer``: a name or local path
    for AutoTokenizer). target_modules is not used. Not mergeable: the tokens
    are inputs, not weights."""
    method: ClassVar[str] = "prompt_tuning"
    num_virtual_tokens: int = 8
    init: str = "random"
    init_text: Optional[str] = None
    tokenizer: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules is not None:
            raise ValueError("PromptTuningConfig: target_modules is not used (the prompt goes in "
                             f"front of the input embeddings), got {self.target_modules!r}")
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"PromptTuningConfig: num_virtual_tokens must be an int >= 1, got "
                             f"{self.num_virtual_tokens!r}")
        if self.init not in INITS:
            raise ValueError(f"PromptTuningConfig: init must be one of {INITS}, got {self.init!r}")
        if self.init == "text" and not (self.init_text and self.tokenizer):
            raise ValueError("PromptTuningConfig: init='text' needs init_text and tokenizer "
                             "(a name or local path for AutoTokenizer)")


class PromptInput(nn.Module):
    """The model's input embedding, unchanged, with the prompt held beside it
    (and the model's config, for its context length)."""

    def __init__(self, embedding: nn.Module, prompt: PromptEmbedding, model_config=None):
        super().__init__()
        self.embedding = embedding
        self.prompt = prompt
        self.model_config = model_config

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


class PromptTuningMethod(AdapterMethod):
    config_class = PromptTuningConfig
    peft_type = "PROMPT_TUNING"
    no_merge_reason = "virtual tokens are inputs, not weights"

    def resolve(self, model: nn.Module, config: PromptTuningConfig) -> PromptTuningConfig:
        return config

    def attach(self, model: nn.Module, config: PromptTuningConfig,
               skip: tuple[str, ...] = ()) -> list[Replacement]:
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if get is not None else None
        if not isinstance(embedding, nn.Embedding):
            raise ValueError("PromptTuningConfig: the model must be a transformers model whose "
                             "get_input_embeddings() is an nn.Embedding, got "
                             f"{type(embedding).__name__}")
        path = next(p for p, m in model.named_modules() if m is embedding)
        weight = embedding.weight
        prompt = PromptEmbedding(config.num_virtual_tokens, weight.shape[1], config.init,
                                 embedding, config.init_text, config.tokenizer,
                                 device=weight.device)
        rep = Replacement(path, embedding,
                          PromptInput(embedding, prompt, getattr(model, "config", None)))
        model.set_submodule(path, rep.adapted)
        return [rep]

    def adapter_tensors(self, replacements: list[Replacement]) -> dict[str, nn.Parameter]:
        return {PROMPT_KEY: replacements[0].adapted.prompt.embedding.weight}

    def prepare_inputs(self, replacements, config, args, kwargs):
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
            args = args[1:]
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("prompt tuning: pass input_ids, not inputs_embeds")
        if kwargs.pop("position_ids", None) is not None:
            warnings.warn("prompt tuning: position_ids are ignored (as in peft)")
        layer = replacements[0].adapted
        input_ids = kwargs.pop("input_ids", None)
        check_prompt_length(layer.prompt, layer.model_config,
                            0 if input_ids is None else input_ids.shape[1],
                            kwargs.get("max_new_tokens") or 0)
        kwargs.update(prompt_inputs(layer.prompt, layer.embedding, input_ids,
                                    kwargs.pop("attention_mask", None), kwargs.pop("labels", None)))
        return args, kwargs

    def to_peft_config(self, config: PromptTuningConfig) -> dict:
        return {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                "num_virtual_tokens": config.num_virtual_tokens,
                "prompt_tuning_init": _PEFT_INITS[config.init],
                "prompt_tuning_init_text": config.init_text,
                "tokenizer_name_or_path": config.tokenizer, "inference_mode": True}

    def from_peft_config(self, data: dict, **options) -> PromptTuningConfig:
        if data.get("task_type") != "CAUSAL_LM":
            raise ValueError(f"peft prompt tuning config: task_type must be 'CAUSAL_LM', got "
                             f"{data.get('task_type')!r}")
        if (data.get("num_transformer_submodules") or 1) != 1:
            raise ValueError("peft prompt tuning config: num_transformer_submodules must be 1 "
                             "(a decoder-only model)")
        inits = {v: k for k, v in _PEFT_INITS.items()}
        init = data.get("prompt_tuning_init", "RANDOM")
        if init not in inits:
            raise ValueError(f"peft prompt tuning config: prompt_tuning_init {init!r} is not "
                             f"supported; supported: {sorted(inits)}")
        return PromptTuningConfig(num_virtual_tokens=data["num_virtual_tokens"], init=inits[init],
                                  init_text=data.get("prompt_tuning_init_text"),
                                  tokenizer=data.get("tokenizer_name_or_path"), **options)

    def peft_key(self, key: str) -> str:
        return key

    def key_from_peft(self, peft_key: str) -> str:
        return peft_key


register_method(PromptTuningMethod())

__all__ = ["PromptTuningConfig", "PromptTuningMethod"]
