"""Per-row adapter ids: the one mechanism every multi-adapter layer shares
(MultiLoRALinear, MultiBottleneckAdapter), so a model holding both kinds takes
one ``set_adapter_ids(model, ids)``.

A layer holding many named adapters subclasses ``RowAdapterLayer`` and keeps
its adapters in index order (``adapter_names``). Which adapter each batch row
uses, first match wins:
  1. ``forward(..., adapter_ids=...)``;
  2. the ids set for all layers at once: ``set_adapter_ids(model, ids)`` or
     ``with adapter_ids(model, ids): model(...)`` (the layer's ``row_ids``);
  3. the single active adapter, ``set_adapter(name)``, for every row;
  4. none: the base alone.
ids: an int64 tensor [rows] of adapter indices (-1: no adapter) or a list of
names (None or "__base__": no adapter, as peft's ``adapter_names``). Each layer
resolves names against its own adapters, so layers may hold them in different
orders.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

AdapterIds = Union[torch.Tensor, Sequence[Optional[str]], None]
BASE_ONLY = "__base__"  # peft's name for "no adapter" in adapter_names
RowGroup = tuple[int, Union[slice, torch.Tensor]]


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or name == BASE_ONLY or "." in name:
        raise ValueError(f"add_adapter: name must be a non-empty str without '.', not "
                         f"{BASE_ONLY!r}, got {name!r}")


class RowAdapterLayer(nn.Module):
    """Base of the layers that hold many named adapters picked per batch row.
    Subclasses define ``adapter_names`` (index order) and set ``active_adapter``
    and ``row_ids`` to None in their __init__."""

    active_adapter: Optional[str]
    row_ids: AdapterIds

    @property
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def _check_new_name(self, name: str) -> None:
        check_adapter_name(name)
        if name in self.adapter_names:
            raise ValueError(f"add_adapter: adapter {name!r} exists already")

    def _index(self, name: str) -> int:
        try:
            return self.adapter_names.index(name)
        except ValueError:
            raise KeyError(f"{type(self).__name__}: no adapter {name!r}; adapters: "
                           f"{self.adapter_names}") from None

    def set_adapter(self, name: Optional[str]) -> None:
        """One adapter for every row (None: the base alone) when no ids are given."""
        if name is not None:
            self._index(name)
        self.active_adapter = name

    def resolve_ids(self, ids: AdapterIds, rows: int,
                    device: torch.device) -> Optional[torch.Tensor]:
        """ids as an int64 tensor [rows] on ``device``, or None for base only (no ids
        and no active adapter). Checks dtype and length; the range is checked by
        ``group_rows`` or the layer's op."""
        who = type(self).__name__
        if ids is None:
            if self.active_adapter is None:
                return None
            return torch.full((rows,), self._index(self.active_adapter), dtype=torch.int64,
                              device=device)
        if isinstance(ids, torch.Tensor):
            if ids.dtype != torch.int64:
                raise TypeError(f"{who}: adapter ids must be int64, got {ids.dtype}")
            if ids.shape != (rows,):
                raise ValueError(f"{who}: adapter ids must have shape [{rows}] (one per row of "
                                 f"the input), got {list(ids.shape)}")
            return ids.to(device)
        names = list(ids)
        if len(names) != rows:
            raise ValueError(f"{who}: {len(names)} adapter names for {rows} rows of the input")
        index = [-1 if n is None or n == BASE_ONLY else self._index(n) for n in names]
        return torch.tensor(index, dtype=torch.int64, device=device)


def group_rows(ids: torch.Tensor, n_adapters: int, who: str) -> list[RowGroup]:
    """The batch rows of each adapter some row uses, in index order (-1, no adapter,
    first): ``(a, rows)``, ``rows`` a slice when they are consecutive (a view of
    the input, no gather) and an int64 index tensor on ids' device otherwise.
    One host sync (ids are per batch row: a handful of numbers)."""
    groups: dict[int, list[int]] = {}
    for i, a in enumerate(ids.tolist()):
        if not -1 <= a < n_adapters:
            raise ValueError(f"{who}: adapter ids[{i}] = {a} is out of range [-1, {n_adapters}) "
                             "(-1: no adapter)")
        groups.setdefault(a, []).append(i)
    out = []
    for a in sorted(groups):
        rows = groups[a]
        if rows[-1] - rows[0] + 1 == len(rows):
            out.append((a, slice(rows[0], rows[-1] + 1)))
        else:
            out.append((a, torch.tensor(rows, dtype=torch.int64, device=ids.device)))
    return out


def set_adapter_ids(model: nn.Module, ids: AdapterIds) -> None:
    """Sets the per-row adapter ids of every multi-adapter layer in ``model``
    (MultiLoRALinear, MultiBottleneckAdapter) for the forwards that follow (None
    clears them)."""
    for module in model.modules():
        if isinstance(module, RowAdapterLayer):
            module.row_ids = ids


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids: AdapterIds) -> Iterator[None]:
    """``with adapter_ids(model, ids): model(x)``: set_adapter_ids for the block,
    each layer's previous ids restored after."""
    layers = [m for m in model.modules() if isinstance(m, RowAdapterLayer)]
    previous = [m.row_ids for m in layers]
    try:
        for m in layers:
            m.row_ids = ids
        yield
    finally:
        for m, p in zip(layers, previous):
            m.row_ids = p
