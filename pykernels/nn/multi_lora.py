"""MultiLoRALinear: many LoRA adapters resident in one layer, each batch row picking
its own (the "10+ tasks in one model" case), on one gathered op (ops.multi_lora).

    y[i] = base(x[i]) + scaling[a]·lora_B[a](lora_A[a](dropout(x[i]))),   a = adapter of row i

The base is a frozen nn.Linear or NF4Linear. Adapters are peft's: ``lora_A[name]`` /
``lora_B[name]`` are nn.Linear modules in ModuleDicts (state_dict keys
``lora_A.<name>.weight``, as a peft LoRA layer holds them), A kaiming-uniform, B
zeros, scaling alpha / r (rsLoRA alpha / √r). Every adapter of a layer shares one
rank and dtype, so they stack into one [n, r, in] / [n, out, r] pair.

Which adapter each row uses: per-row ids, set as for every multi-adapter layer
(row_ids.py: ``forward(x, adapter_ids=...)``, ``set_adapter_ids(model, ids)``, the
``adapter_ids(model, ids)`` block, or ``set_adapter(name)`` for every row). x is
[rows, ..., in]; all tokens of a row share its adapter.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from .. import ops
from .nf4 import NF4Linear
from .row_ids import (BASE_ONLY, AdapterIds, RowAdapterLayer, adapter_ids,  # noqa: F401
                      group_rows, set_adapter_ids)


class MultiLoRALinear(RowAdapterLayer):
    """Many LoRA adapters over one frozen ``base_layer`` (nn.Linear or NF4Linear,
    shared, not copied)."""

    def __init__(self, base_layer: Union[nn.Linear, NF4Linear]):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, NF4Linear)):
            raise TypeError("MultiLoRALinear: base_layer must be an nn.Linear or an NF4Linear, "
                            f"got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: Optional[int] = None
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.active_adapter: Optional[str] = None
        self.merged_adapter: Optional[str] = None
        self.row_ids: AdapterIds = None  # set by set_adapter_ids / adapter_ids
        # Every adapter's weights live in two stacks, A_all [n, r, in] and B_all^T
        # [n, r, out]; each lora_A / lora_B weight is a view of its slice, so serving
        # passes the stacks to the op with no copy (stacking 16 adapters of a 4096 x
        # 4096 layer, and transposing B, cost ~2 ms a call of a ~60 ms bf16 forward).
        self._stacks: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.register_buffer("merged_weight", None, persistent=False)  # NF4 base, merged

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantize: bool = False,
                    blocksize: int = ops.NF4_DEFAULT_BLOCKSIZE,
                    double_quant: bool = True) -> "MultiLoRALinear":
        """Wraps ``linear`` (``quantize=True``: quantized to NF4 first, as
        bitsandbytes would); add adapters with add_adapter."""
        base = NF4Linear.from_linear(linear, blocksize, double_quant) if quantize else linear
        return cls(base)

    # ---- the base ----
    def _base_dtype(self) -> torch.dtype:
        base = self.base_layer
        return base.weight_dtype if isinstance(base, NF4Linear) else base.weight.dtype

    def _base_device(self) -> torch.device:
        base = self.base_layer
        return base.packed.device if isinstance(base, NF4Linear) else base.weight.device

    # ---- adapters ----
    @property
    def adapter_names(self) -> list[str]:
        """Adapter names in index order (the indices ids refer to)."""
        return list(self.lora_A.keys())

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return next(iter(self.lora_A.values())).weight.dtype if len(self.lora_A) else None

    def add_adapter(self, name: str, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False, dtype: Optional[torch.dtype] = None) -> int:
        """Adds adapter ``name`` (B zeros: it changes nothing until trained); returns
        its index. Every adapter shares the layer's rank and dtype (the base's
        dtype unless given)."""
        if r < 1:
            raise ValueError(f"add_adapter({name!r}): r must be >= 1, got {r}")
        dtype = dtype or self.dtype or self._base_dtype()
        factory = {"device": self._base_device(), "dtype": dtype}
        lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        return self.attach_adapter(name, lora_A, lora_B, scaling, dropout)

    def attach_adapter(self, name: str, lora_A: nn.Linear, lora_B: nn.Linear, scaling: float,
                       dropout: float = 0.0) -> int:
        """Adds adapter ``name`` made of existing modules (a LoRALinear's or
        QLoRALinear's lora_A / lora_B, shared, not copied; their weights become
        views of this layer's stacks); returns its index."""
        self._check_new_name(name)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"add_adapter({name!r}): dropout must be in [0, 1), got {dropout}")
        r = lora_A.out_features
        if (lora_A.in_features, lora_B.in_features, lora_B.out_features) != (
                self.in_features, r, self.out_features):
            raise ValueError(f"add_adapter({name!r}): lora_A must be [r, {self.in_features}] and "
                             f"lora_B [{self.out_features}, r], got {list(lora_A.weight.shape)} "
                             f"and {list(lora_B.weight.shape)}")
        if self.r is not None and r != self.r:
            raise ValueError(f"add_adapter({name!r}): rank {r} differs from the layer's rank "
                             f"{self.r}; all adapters of a layer share one rank")
        dtype = lora_A.weight.dtype
        if self.dtype is not None and dtype != self.dtype:
            raise TypeError(f"add_adapter({name!r}): dtype {dtype} differs from the layer's "
                            f"adapter dtype {self.dtype}; all adapters of a layer share one dtype")
        self.lora_A[name], self.lora_B[name] = lora_A, lora_B
        self.r = r
        self.scaling[name] = scaling
        self.lora_dropout[name] = dropout
        self._restack()
        return len(self.lora_A) - 1

    def delete_adapter(self, name: str) -> None:
        """Removes ``name``; the adapters after it move down one index."""
        self._index(name)
        if self.merged_adapter == name:
            raise RuntimeError(f"delete_adapter({name!r}): it is merged; unmerge() first")
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.lora_dropout[name]
        if self.active_adapter == name:
            self.active_adapter = None
        if not len(self.lora_A):
            self.r = None
        self._restack()

    def _check_dtypes(self) -> None:
        for n in self.adapter_names:
            for kind, mod in (("lora_A", self.lora_A[n]), ("lora_B", self.lora_B[n])):
                if mod.weight.dtype != self.dtype:
                    raise TypeError(f"MultiLoRALinear: {kind}[{n!r}] is {mod.weight.dtype}, "
                                    f"expected the layer's adapter dtype {self.dtype}")

    @torch.no_grad()
    def _restack(self) -> None:
        """Copies every adapter's weights into fresh stacks and makes them views of it."""
        names = self.adapter_names
        if not names:
            self._stacks = None
            return
        self._check_dtypes()
        a_all = torch.stack([self.lora_A[n].weight for n in names])
        bt_all = torch.stack([self.lora_B[n].weight.t() for n in names])
        for i, n in enumerate(names):
            self.lora_A[n].weight.data = a_all[i]
            self.lora_B[n].weight.data = bt_all[i].t()
        self._stacks = (a_all, bt_all)

    def _stacked_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_all, B_all^T), restacked first if a weight left its slice (.to(), a
        replaced .data)."""
        names = self.adapter_names
        stacks = self._stacks
        if stacks is None or any(
                self.lora_A[n].weight.data_ptr() != stacks[0][i].data_ptr()
                or self.lora_B[n].weight.data_ptr() != stacks[1][i].data_ptr()
                or self.lora_A[n].weight.dtype != stacks[0].dtype
                for i, n in enumerate(names)):
            self._restack()
        return self._stacks

    # ---- forward ----
    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged_adapter is not None and self.merged_weight is not None:
            bias = base.bias
            return nn.functional.linear(x, self.merged_weight.to(x.dtype),
                                        None if bias is None else bias.to(x.dtype))
        return base(x)

    def _dropout(self, ids: torch.Tensor, names: list[str]) -> float:
        if not self.training:
            return 0.0
        ps = {self.lora_dropout[n] for n in names}
        if len(ps) > 1:  # the op draws one dropout per call
            present = ids.unique().tolist()
            ps = {self.lora_dropout[names[i]] for i in present if i >= 0}
            if len(ps) > 1:
                raise ValueError("MultiLoRALinear: the adapters in this batch have different "
                                 f"dropout {self.lora_dropout}; train them in separate batches")
        return ps.pop() if ps else 0.0

    def _adapters_for(self, ids: torch.Tensor, dtype: torch.dtype):
        """(lora_A, lora_B, scales, ids, names) for the op."""
        names = self.adapter_names
        if torch.compiler.is_compiling():
            return (*self.stacked(dtype), ids, names)
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            a_all, bt_all = self._stacked_views()
            return (a_all.to(dtype), bt_all.to(dtype).transpose(1, 2), self._scales(names),
                    ids, names)
        # Training: only the adapters some row uses, so the others get no gradient at
        # all (None, as in peft) and an optimizer with weight decay leaves them alone.
        used = [a for a, _ in group_rows(ids, len(names), "MultiLoRALinear") if a >= 0]
        remap = torch.full((len(names) + 1,), -1, dtype=torch.int64, device=ids.device)
        remap[torch.tensor(used, dtype=torch.int64, device=ids.device)] = torch.arange(
            len(used), device=ids.device)
        names = [names[i] for i in used]
        return (*self.stacked(dtype, names), remap[ids], names)  # remap[-1]: -1 again

    def forward(self, x: torch.Tensor, adapter_ids: AdapterIds = None) -> torch.Tensor:
        if adapter_ids is None:
            adapter_ids = self.row_ids
        squeeze = x.dim() == 1
        if squeeze:
            x = x.unsqueeze(0)
        ids = self.resolve_ids(adapter_ids, x.shape[0], x.device) if len(self.lora_A) else None
        if self.merged_adapter is not None and ids is not None:
            if not bool((ids == self._index(self.merged_adapter)).all()):
                raise RuntimeError(f"MultiLoRALinear: adapter {self.merged_adapter!r} is merged "
                                   "and every row must use it; unmerge() to mix adapters")
            ids = None
        out = self._base_forward(x)
        if ids is not None:
            lora_A, lora_B, scales, ids, names = self._adapters_for(ids, x.dtype)
            p = self._dropout(ids, names)
            seed = (torch.randint(2**63 - 1, (), dtype=torch.int64) if p > 0.0
                    else torch.zeros((), dtype=torch.int64))
            out = ops.multi_lora(x, out, lora_A, lora_B, scales, ids, p, seed)
        return out.squeeze(0) if squeeze else out

    def _scales(self, names: list[str]) -> torch.Tensor:
        return torch.tensor([self.scaling[n] for n in names], dtype=torch.float32,
                            device=self._base_device())

    def stacked(self, dtype: Optional[torch.dtype] = None, names: Optional[list[str]] = None):
        """(lora_A [n, r, in], lora_B [n, out, r], scales [n] fp32) of ``names``
        (every adapter by default) in ``dtype``; differentiable to each adapter's weights."""
        names = self.adapter_names if names is None else names
        self._check_dtypes()
        if not names:  # no row uses an adapter
            w = self.lora_A[self.adapter_names[0]].weight
            lora_A = w.new_empty((0, self.r, self.in_features))
            lora_B = w.new_empty((0, self.out_features, self.r))
        else:
            lora_A = torch.stack([self.lora_A[n].weight for n in names])
            lora_B = torch.stack([self.lora_B[n].weight for n in names])
        if dtype is not None:
            lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        return lora_A, lora_B, self._scales(names)

    # ---- merge ----
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Folds adapter ``name`` into the base (dense: W += s·B·A in place; NF4: a
        dense merged weight is kept beside the NF4 state). While merged, every row
        must use ``name``."""
        self._index(name)
        if self.merged_adapter is not None:
            raise RuntimeError(f"merge({name!r}): {self.merged_adapter!r} is merged; "
                               "unmerge() first")
        base = self.base_layer
        weight = base.dequantize() if isinstance(base, NF4Linear) else base.weight
        ops.lora_merge_(weight, self.lora_A[name].weight.to(weight.dtype),
                        self.lora_B[name].weight.to(weight.dtype), self.scaling[name])
        if isinstance(base, NF4Linear):
            self.merged_weight = weight
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes the merged adapter out again (dense: the same fp32 delta subtracted)."""
        name = self.merged_adapter
        if name is None:
            return
        if isinstance(self.base_layer, NF4Linear):
            self.merged_weight = None
        else:
            weight = self.base_layer.weight
            ops.lora_merge_(weight, self.lora_A[name].weight.to(weight.dtype),
                            self.lora_B[name].weight.to(weight.dtype), -self.scaling[name])
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"adapters={self.adapter_names}, active={self.active_adapter!r}, "
                f"merged={self.merged_adapter!r}")

