"""Bottleneck adapters as an adapter method: the config and its insertion into
Llama-family decoder layers (nn.bottleneck: houlsby / pfeiffer / parallel).

An adapter is an extra layer with a nonlinearity, not a change of a weight, so
merge_and_unload refuses it (``unload()`` takes it out; serving keeps the
wrapper). peft has no bottleneck adapters: our file format only.

Each inserted adapter is one Replacement: the wrapped module (a decoder layer's
``mlp``, and for houlsby also its ``self_attn.o_proj``) and the AdaptedModule
around it; tensors are named ``<path>.adapter.down.weight`` and so on. In a
hybrid, list a BottleneckConfig after configs that adapt layers inside the
modules it wraps (LoRA on the MLP projections): the wrapper does not re-target
layers under a path an earlier config of the adapter replaced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import nn

from ..nn import add_bottleneck_adapters
from ..nn.bottleneck import PLACEMENTS
from ..ops.bottleneck import ACTIVATIONS
from .registry import AdapterConfig, AdapterMethod, Replacement, register_method


@dataclass
class BottleneckConfig(AdapterConfig):
    """``h + scale·up(act(down(h)))`` adapters of ``d // reduction`` features
    (``bottleneck_dim`` when given) in the decoder layers listed in ``layers``
    (indices; None: all), at ``placement`` "pfeiffer" (after the FFN), "houlsby"
    (after attention and after the FFN) or "parallel" (beside the FFN).
    target_modules is not used (placement says where)."""
    method: ClassVar[str] = "bottleneck"
    placement: str = "pfeiffer"
    reduction: int = 16
    act: str = "relu"
    scale: float = 1.0
    layers: Optional[list] = None
    bottleneck_dim: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules is not None:
            raise ValueError("BottleneckConfig: target_modules is not used (placement and layers "
                             f"say where adapters go), got {self.target_modules!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"BottleneckConfig: placement must be one of {', '.join(PLACEMENTS)}, "
                             f"got {self.placement!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"BottleneckConfig: act must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {self.act!r}")
        if self.layers is not None:
            self.layers = sorted(set(int(i) for i in self.layers))


class BottleneckMethod(AdapterMethod):
    config_class = BottleneckConfig
    no_merge_reason = ("a bottleneck adapter is an extra layer with a nonlinearity, not a "
                       "change of a weight; unload() removes it, or serve the wrapped model")

    def resolve(self, model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
        return config

    def attach(self, model: nn.Module, config: BottleneckConfig,
               skip: tuple[str, ...] = ()) -> list[Replacement]:
        paths = {id(m): p for p, m in model.named_modules()}
        inserted = add_bottleneck_adapters(model, config.placement, config.reduction,
                                           config.bottleneck_dim, config.act, config.scale,
                                           config.layers)
        replacements = []
        for item in inserted:
            parent = paths[id(item.parent)]
            path = f"{parent}.{item.name}" if parent else item.name
            replacements.append(Replacement(path, item.wrapper.base_layer, item.wrapper))
        return replacements


register_method(BottleneckMethod())

__all__ = ["BottleneckConfig", "BottleneckMethod"]
