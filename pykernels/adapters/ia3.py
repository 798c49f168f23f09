"""IA³ as an adapter method: the config, its layer (nn.IA3Linear over a dense or
NF4 base), merging, and peft's IA³ files (peft_type "IA3").

Merging: over a dense base W ← W ⊙ l in place (IA3Linear.merge); over an NF4
base the merged layer is a dense nn.Linear holding the decoded W ⊙ l, as a
merged QLoRA is: exactly the model that was trained (requantizing would add
NF4's error once more; IA3Linear.merge() does that, with its error report, for
whoever wants NF4 back).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import ops
from ..nn import IA3Linear, NF4Linear
from .registry import (AdapterConfig, AdapterMethod, Replacement, Targets, matches,
                       register_method)

_LLAMA_IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
_LLAMA_IA3_FEEDFORWARD = ["down_proj"]


@dataclass
class IA3Config(AdapterConfig):
    """IA³: learned vectors l (ones at first) scaling the outputs of attention's
    k / v projections and the input of the FFN's down projection (peft's
    defaults for Llama). ``feedforward_modules`` (a list of names or a regex, as
    target_modules) picks the input-scaled targets; None: down_proj.

    ``quantize``: quantize the targeted dense layers to NF4 first (QLoRA-style;
    ``blocksize``, ``double_quant`` as QLoRAConfig). Targets already NF4 are
    used as they are either way."""
    method: ClassVar[str] = "ia3"
    feedforward_modules: Targets = None
    quantize: bool = False
    blocksize: int = ops.NF4_DEFAULT_BLOCKSIZE
    double_quant: bool = True

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.feedforward_modules, (tuple, set, frozenset)):
            self.feedforward_modules = sorted(self.feedforward_modules)


# peft IA3Config fields whose non-default values this reader does not reproduce.
_PEFT_IA3_UNSUPPORTED = {"fan_in_fan_out": False, "modules_to_save": None, "exclude_modules": None}


class IA3Method(AdapterMethod):
    config_class = IA3Config
    target_types = (nn.Linear, NF4Linear)
    peft_type = "IA3"
    can_merge = True

    def resolve(self, model: nn.Module, config: IA3Config) -> IA3Config:
        if config.target_modules is None:
            super().resolve(model, config)  # raises for a model type without defaults
            config = dataclasses.replace(config, target_modules=list(_LLAMA_IA3_TARGETS))
            if config.feedforward_modules is None:
                config.feedforward_modules = list(_LLAMA_IA3_FEEDFORWARD)
        elif config.feedforward_modules is None:
            config = dataclasses.replace(config, feedforward_modules=[])
        return config

    def attach(self, model: nn.Module, config: IA3Config, skip: tuple[str, ...] = ()):
        if config.feedforward_modules:
            stray = sorted({p for p, m in model.named_modules()
                            if isinstance(m, self.target_types)
                            and matches(config.feedforward_modules, p)
                            and not matches(config.target_modules, p)})
            if stray:
                raise ValueError(f"IA3Config: feedforward_modules must be among target_modules; "
                                 f"not targeted: {stray[:5]}")
        replacements = []
        for path, module in self.find_targets(model, config, skip):
            base = module
            if config.quantize and isinstance(module, nn.Linear):
                base = NF4Linear.from_linear(module, config.blocksize, config.double_quant)
            feedforward = bool(config.feedforward_modules) and matches(config.feedforward_modules,
                                                                       path)
            replacements.append(Replacement(path, base, IA3Linear.from_linear(base, feedforward)))
        for rep in replacements:
            model.set_submodule(rep.path, rep.adapted)
        return replacements

    @torch.no_grad()
    def merge(self, replacement: Replacement) -> nn.Module:
        layer = replacement.adapted
        if layer.nf4:
            base = layer.base_layer
            dense = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                              device=base.packed.device, dtype=base.weight_dtype)
            dense.weight.copy_(base.dequantize())
            if base.bias is not None:
                dense.bias.copy_(base.bias)
            layer = IA3Linear.from_linear(dense.requires_grad_(False), layer.feedforward)
            layer.ia3_l.copy_(replacement.adapted.ia3_l)
        layer.merge()
        return layer.base_layer

    def to_peft_config(self, config: IA3Config) -> dict:
        return {"peft_type": "IA3", "task_type": "CAUSAL_LM",
                "target_modules": config.target_modules,
                "feedforward_modules": config.feedforward_modules,
                "init_ia3_weights": True, "inference_mode": True,
                **_PEFT_IA3_UNSUPPORTED}

    def from_peft_config(self, data: dict, quantized: bool = False, **nf4: Any) -> IA3Config:
        """peft's IA³ config as ours; ``quantized=True``: over NF4 bases (peft's file
        does not say), ``nf4``: blocksize / double_quant."""
        for key, default in _PEFT_IA3_UNSUPPORTED.items():
            value = data.get(key, default)
            if value != default and value not in (None, [], False):
                raise ValueError(f"peft IA3 config: {key}={value!r} is not supported "
                                 f"(expected {default!r})")
        if not data.get("target_modules"):
            raise ValueError("peft IA3 config: target_modules is missing (expected the list or "
                             "regex peft resolved when it saved)")
        return IA3Config(target_modules=data["target_modules"],
                         feedforward_modules=data.get("feedforward_modules") or [],
                         quantize=quantized, **nf4)


register_method(IA3Method())

__all__ = ["IA3Config", "IA3Method"]
