"""Bottleneck adapters as layers, and their insertion into Llama-family decoders.

    adapter(h) = residual + scale·up(act(down(h))),   residual = h unless given

``BottleneckAdapter`` holds down (nn.Linear d → m) and up (nn.Linear m → d) and
runs the fused op (ops.bottleneck_adapter). A fresh adapter is the identity: up
starts at zero (weight and bias), down at a small normal (std 0.02), as
Houlsby et al. and AdapterHub initialize it.

``add_bottleneck_adapters`` puts adapters into every decoder layer (a module
with ``.self_attn`` and ``.mlp``: transformers' LlamaDecoderLayer, SmolLM2,
Mistral, Qwen2) at one of the placements users know:

- ``"houlsby"``: after the attention output projection and after the FFN,
  each adapter with its own skip: o_proj(x) + s·f(o_proj(x)), mlp(x) + s·f(mlp(x));
- ``"pfeiffer"``: after the FFN only;
- ``"parallel"``: beside the FFN: mlp(x) + s·f(x).

The base modules are wrapped (``AdaptedModule``), not changed, so any linear
works inside them (nn.Linear, NF4Linear, QLoRALinear). The returned handles say
what went where; ``remove_bottleneck_adapters(handles)`` puts the base modules
back. A bottleneck adapter cannot be merged into the base weights (its
activation is not linear): "merging" it means keeping the wrapper.
Insertion does not freeze anything: call ``model.requires_grad_(False)`` first
to train the adapters alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from .. import ops
from ..ops.bottleneck import ACTIVATIONS

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")


class BottleneckAdapter(nn.Module):
    """``residual + scale·up(act(down(h)))`` over the last dim ``d`` of h, with a
    bottleneck of ``bottleneck_dim`` (default ``d // reduction``) features.

    ``act``: "relu", "gelu" (exact) or "silu". ``forward(h, residual=None)``:
    residual defaults to h (a serial adapter); pass another tensor of h's shape
    for a parallel one.
    """

    def __init__(self, d: int, reduction: int = 16, bottleneck_dim: Optional[int] = None,
                 act: str = "relu", scale: float = 1.0, device=None, dtype=None):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"BottleneckAdapter: act must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {act!r}")
        if bottleneck_dim is None:
            if reduction < 1:
                raise ValueError(f"BottleneckAdapter: reduction must be >= 1, got {reduction}")
            bottleneck_dim = max(1, d // reduction)
        if d < 1 or bottleneck_dim < 1:
            raise ValueError(f"BottleneckAdapter: d and bottleneck_dim must be >= 1, got {d} and "
                             f"{bottleneck_dim}")
        factory = {"device": device, "dtype": dtype}
        self.down = nn.Linear(d, bottleneck_dim, **factory)
        self.up = nn.Linear(bottleneck_dim, d, **factory)
        self.d, self.bottleneck_dim, self.act, self.scale = d, bottleneck_dim, act, scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.bottleneck_adapter(h, self.down.weight, self.down.bias, self.up.weight,
                                      self.up.bias, self.act, self.scale, residual)

    def extra_repr(self) -> str:
        return (f"d={self.d}, bottleneck_dim={self.bottleneck_dim}, act={self.act!r}, "
                f"scale={self.scale:g}")


class AdaptedModule(nn.Module):
    """``base_layer`` with an adapter after it (``adapter(base(x))``) or beside it
    (``parallel``: ``adapter(x, residual=base(x))``)."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter, parallel: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.parallel = parallel

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        return self.adapter(x, residual=y) if self.parallel else self.adapter(y)


@dataclass
class InsertedAdapter:
    """One adapter put in place: ``getattr(parent, name)`` is ``wrapper``."""
    layer: int      # index among the model's decoder layers
    site: str       # "attention" (after o_proj) or "ffn" (after / beside the mlp)
    parent: nn.Module
    name: str
    wrapper: AdaptedModule

    @property
    def adapter(self) -> BottleneckAdapter:
        return self.wrapper.adapter


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (modules with .self_attn and .mlp), in order."""
    return [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]


def _float_param(layer: nn.Module) -> torch.Tensor:
    for p in layer.parameters():
        if p.is_floating_point():
            return p
    raise ValueError("add_bottleneck_adapters: a decoder layer has no floating-point parameter "
                     "to take the adapter's dtype and device from")


def add_bottleneck_adapters(model: nn.Module, placement: str = "pfeiffer", reduction: int = 16,
                            bottleneck_dim: Optional[int] = None, act: str = "relu",
                            scale: float = 1.0,
                            layers: Optional[Iterable[int]] = None) -> list[InsertedAdapter]:
    """Inserts fresh adapters (the identity until trained) into the decoder layers
    given by index (default: all) at ``placement`` ("houlsby", "pfeiffer",
    "parallel"); returns what was inserted, in layer order."""
    if placement not in PLACEMENTS:
        raise ValueError(f"add_bottleneck_adapters: placement must be one of "
                         f"{', '.join(PLACEMENTS)}, got {placement!r}")
    all_layers = decoder_layers(model)
    if not all_layers:
        raise ValueError("add_bottleneck_adapters: the model has no decoder layer (a module with "
                         ".self_attn and .mlp)")
    chosen = range(len(all_layers)) if layers is None else sorted(set(layers))
    for i in chosen:
        if not 0 <= i < len(all_layers):
            raise ValueError(f"add_bottleneck_adapters: layer {i} out of range: the model has "
                             f"{len(all_layers)} decoder layers")
    inserted = []
    for i in chosen:
        layer = all_layers[i]
        p = _float_param(layer)
        d = layer.self_attn.o_proj.out_features
        sites = [("attention", layer.self_attn, "o_proj", False)] if placement == "houlsby" else []
        sites.append(("ffn", layer, "mlp", placement == "parallel"))
        for site, parent, name, parallel in sites:
            if isinstance(getattr(parent, name), AdaptedModule):
                raise ValueError(f"add_bottleneck_adapters: layer {i}'s {name} already has an "
                                 "adapter; remove it first")
            adapter = BottleneckAdapter(d, reduction, bottleneck_dim, act, scale, device=p.device,
                                        dtype=p.dtype)
            wrapper = AdaptedModule(getattr(parent, name), adapter, parallel)
            setattr(parent, name, wrapper)
            inserted.append(InsertedAdapter(i, site, parent, name, wrapper))
    return inserted


def remove_bottleneck_adapters(inserted: Iterable[InsertedAdapter]) -> None:
    """Puts back the base modules add_bottleneck_adapters wrapped."""
    for item in inserted:
        if getattr(item.parent, item.name) is item.wrapper:
            setattr(item.parent, item.name, item.wrapper.base_layer)
