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

Many adapters at one site (the "10+ tasks in one model" case):
``add_bottleneck_adapters(model, ..., name="task")`` adds a named adapter to a
``MultiBottleneckAdapter`` at each site (made on first use), and each batch row
picks its adapter by per-row ids, the mechanism MultiLoRALinear shares
(row_ids.py: ``set_adapter_ids(model, ids)`` sets both kinds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .. import ops
from ..ops.bottleneck import ACTIVATIONS
from .row_ids import AdapterIds, RowAdapterLayer, check_adapter_name

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


class MultiBottleneckAdapter(RowAdapterLayer):
    """Many named BottleneckAdapters over one feature size ``d``; each batch row of
    ``h`` [rows, ..., d] goes through its own (per-row ids, row_ids.py; -1: none,
    the row passes through as the residual). ``forward(h, residual=None,
    adapter_ids=None)``.

    One native call (ops.multi_bottleneck) groups the rows by adapter and runs
    the fused bottleneck pipeline on each group with that adapter's own weights:
    serving copies no weights and gathers only the rows of groups that are not
    consecutive. The adapters may differ in bottleneck_dim, act and scale; each
    must be in h's dtype (the op checks). In training, an adapter no row picked
    gets no gradient (None), so an optimizer step leaves it alone; under
    torch.compile (fullgraph: the same op) it gets zeros.
    """

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.adapters = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.row_ids: AdapterIds = None  # set by set_adapter_ids / adapter_ids

    @property
    def adapter_names(self) -> list[str]:
        """Adapter names in index order (the indices ids refer to)."""
        return list(self.adapters.keys())

    def add_adapter(self, name: str, reduction: int = 16, bottleneck_dim: Optional[int] = None,
                    act: str = "relu", scale: float = 1.0, device=None, dtype=None) -> int:
        """Adds a fresh adapter ``name`` (the identity until trained; device and
        dtype those of the first adapter unless given); returns its index."""
        if len(self.adapters):
            first = next(iter(self.adapters.values())).down.weight
            device, dtype = device or first.device, dtype or first.dtype
        return self.attach_adapter(name, BottleneckAdapter(self.d, reduction, bottleneck_dim, act,
                                                           scale, device=device, dtype=dtype))

    def attach_adapter(self, name: str, adapter: BottleneckAdapter) -> int:
        """Adds an existing adapter (shared, not copied) as ``name``; returns its index."""
        self._check_new_name(name)
        if adapter.d != self.d:
            raise ValueError(f"add_adapter({name!r}): the adapter's d is {adapter.d}, the "
                             f"layer's {self.d}")
        self.adapters[name] = adapter
        return len(self.adapters) - 1

    def delete_adapter(self, name: str) -> None:
        """Removes ``name``; the adapters after it move down one index."""
        self._index(name)
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, h: torch.Tensor, residual: Optional[torch.Tensor] = None,
                adapter_ids: AdapterIds = None) -> torch.Tensor:
        if adapter_ids is None:
            adapter_ids = self.row_ids
        if adapter_ids is None:  # one adapter (or none) for every row: no grouping
            if self.active_adapter is None:
                return h if residual is None else residual
            return self.adapters[self.active_adapter](h, residual)
        squeeze = h.dim() == 1
        if squeeze:
            h = h.unsqueeze(0)
            residual = None if residual is None else residual.unsqueeze(0)
        ids = self.resolve_ids(adapter_ids, h.shape[0], h.device)
        adapters = list(self.adapters.values())
        out = ops.multi_bottleneck(
            h, [a.down.weight for a in adapters], [a.down.bias for a in adapters],
            [a.up.weight for a in adapters], [a.up.bias for a in adapters],
            [a.act for a in adapters], [a.scale for a in adapters], ids, residual)
        return out.squeeze(0) if squeeze else out

    def extra_repr(self) -> str:
        return f"d={self.d}, adapters={self.adapter_names}, active={self.active_adapter!r}"


class AdaptedModule(nn.Module):
    """``base_layer`` with an adapter (one, or many picked per row) after it
    (``adapter(base(x))``) or beside it (``parallel``: ``adapter(x, residual=base(x))``)."""

    def __init__(self, base_layer: nn.Module,
                 adapter: Union[BottleneckAdapter, MultiBottleneckAdapter], parallel: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.parallel = parallel

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        return self.adapter(x, residual=y) if self.parallel else self.adapter(y)


@dataclass
class InsertedAdapter:
    """One adapter put in place: ``getattr(parent, name)`` is ``wrapper``; a named
    adapter (``adapter_name``) is one of the wrapper's MultiBottleneckAdapter."""
    layer: int      # index among the model's decoder layers
    site: str       # "attention" (after o_proj) or "ffn" (after / beside the mlp)
    parent: nn.Module
    name: str
    wrapper: AdaptedModule
    adapter_name: Optional[str] = None

    @property
    def adapter(self) -> BottleneckAdapter:
        if self.adapter_name is None:
            return self.wrapper.adapter
        return self.wrapper.adapter.adapters[self.adapter_name]


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
                            scale: float = 1.0, layers: Optional[Iterable[int]] = None,
                            name: Optional[str] = None) -> list[InsertedAdapter]:
    """Inserts fresh adapters (the identity until trained) into the decoder layers
    given by index (default: all) at ``placement`` ("houlsby", "pfeiffer",
    "parallel"); returns what was inserted, in layer order.

    ``name``: the adapters are named and join a MultiBottleneckAdapter at each
    site (made on first use), beside the adapters other calls put there, each
    batch row picking its own (set_adapter_ids); the adapters of one site share
    its placement (serial or parallel). Without a name, one plain adapter per
    site. Everything is checked before the model is changed."""
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
    sites = []
    for i in chosen:
        layer = all_layers[i]
        o_proj = layer.self_attn.o_proj  # wrapped when a named Houlsby adapter is there
        d = (o_proj.base_layer if isinstance(o_proj, AdaptedModule) else o_proj).out_features
        p = _float_param(layer)
        places = [("attention", layer.self_attn, "o_proj", False)] if placement == "houlsby" else []
        places.append(("ffn", layer, "mlp", placement == "parallel"))
        for site, parent, attr, parallel in places:
            _check_site(i, getattr(parent, attr), attr, parallel, name)
            sites.append((i, site, parent, attr, parallel, p, d))
    inserted = []
    for i, site, parent, attr, parallel, p, d in sites:
        args = (reduction, bottleneck_dim, act, scale)
        wrapper = getattr(parent, attr)
        if not isinstance(wrapper, AdaptedModule):
            adapter = (BottleneckAdapter(d, *args, device=p.device, dtype=p.dtype) if name is None
                       else MultiBottleneckAdapter(d))
            wrapper = AdaptedModule(wrapper, adapter, parallel)
            setattr(parent, attr, wrapper)
        if name is not None:
            wrapper.adapter.add_adapter(name, *args, device=p.device, dtype=p.dtype)
        inserted.append(InsertedAdapter(i, site, parent, attr, wrapper, name))
    return inserted


def _check_site(layer: int, current: nn.Module, attr: str, parallel: bool,
                name: Optional[str]) -> None:
    """Raises unless an adapter (named: ``name``) can go at this site."""
    if not isinstance(current, AdaptedModule):
        if name is not None:
            check_adapter_name(name)
        return
    if name is None or not isinstance(current.adapter, MultiBottleneckAdapter):
        raise ValueError(f"add_bottleneck_adapters: layer {layer}'s {attr} already has an "
                         "adapter; remove it first, or give every adapter a name to hold many")
    if current.parallel != parallel:
        held = "parallel" if current.parallel else "serial"
        raise ValueError(f"add_bottleneck_adapters: layer {layer}'s {attr} holds {held} "
                         f"adapters; the named adapters of one site share its placement")
    current.adapter._check_new_name(name)


def remove_bottleneck_adapters(inserted: Iterable[InsertedAdapter]) -> None:
    """Takes out what add_bottleneck_adapters put in: a named adapter leaves its
    site's MultiBottleneckAdapter; a site left without adapters gets its base
    module back."""
    for item in inserted:
        multi = item.wrapper.adapter
        if item.adapter_name is not None:
            if item.adapter_name in multi.adapters:
                multi.delete_adapter(item.adapter_name)
            if len(multi.adapters):
                continue
        if getattr(item.parent, item.name) is item.wrapper:
            setattr(item.parent, item.name, item.wrapper.base_layer)
