"""The model wrapper: ``wrap(model, config)`` -> AdapterModel.

An adapter is a name and a list of configs (one method each: LoRA, QLoRA, or a
hybrid such as prompt tuning + LoRA). Several adapters stay resident; one is
active, its layers in the model, the others' layers kept aside with their
weights (the same Parameter objects, so an optimizer built earlier still holds
them). Switching swaps layers in and out: no copy of any weight.

Files (no pickle anywhere):
- ours: ``adapter.safetensors`` (tensors named ``<module path>.<param>``) and
  ``adapter.json`` (the configs, any method and any hybrid);
- peft's: ``adapter_model.safetensors`` (``base_model.model.<path>.<param>``) and
  ``adapter_config.json``, for single-method adapters peft has (LoRA here), read
  from and written for ``peft.PeftModel.from_pretrained``.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..nn import NF4Linear
from . import lora  # noqa: F401  (registers the LoRA and QLoRA methods)
from .registry import AdapterConfig, Replacement, method_for, method_for_peft_type

OURS_CONFIG, OURS_WEIGHTS = "adapter.json", "adapter.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FORMAT = "pykernels-adapter"

Configs = Union[AdapterConfig, Iterable[AdapterConfig]]


def _as_list(configs: Configs) -> list[AdapterConfig]:
    configs = [configs] if isinstance(configs, AdapterConfig) else list(configs)
    if not configs:
        raise ValueError("configs: expected an AdapterConfig or a non-empty list of them")
    for config in configs:
        method_for(config)  # raises on a non-config or an unregistered method
    return configs


class AdapterModel(nn.Module):
    """A model with named adapters; the base model's own parameters are frozen.

    ``forward`` / ``generate`` pass through to the model (after methods that
    rewrite inputs, e.g. prompt tuning, have done so); attributes the wrapper
    lacks come from the model (``wrapped.config``). ``train()`` / ``eval()``
    reach every adapter, active or not.
    """

    def __init__(self, model: nn.Module, configs: Configs, adapter_name: str = "default"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.base_model = model.requires_grad_(False)
        self.training = model.training  # adapters start in the model's mode
        self.adapter_configs: dict[str, list[AdapterConfig]] = {}
        # adapter name -> one list of Replacements per config
        self._replacements: dict[str, list[list[Replacement]]] = {}
        self.active_adapter: Optional[str] = None
        self.add_adapter(adapter_name, configs)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapters ----------------------------------------------------------------

    def _attach(self, name: Optional[str]) -> None:
        for replacements in self._replacements[name] if name is not None else ():
            for rep in replacements:
                self.base_model.set_submodule(rep.path, rep.adapted.train(self.training))

    def _restore(self, per_config: list[list[Replacement]]) -> None:
        for replacements in reversed(per_config):
            for rep in reversed(replacements):
                self.base_model.set_submodule(rep.path, rep.original)

    def _detach(self, name: Optional[str]) -> None:
        if name is not None:
            self._restore(self._replacements[name])

    def _check_name(self, name: str) -> None:
        if name not in self.adapter_configs:
            raise KeyError(f"no adapter named {name!r}; adapters: {sorted(self.adapter_configs)}")

    def add_adapter(self, name: str, configs: Configs) -> None:
        """Adds adapter ``name`` (fresh weights) beside the others; the active one
        stays active. ``configs``: one config or a list (a hybrid)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name: expected a non-empty string, got {name!r}")
        if name in self.adapter_configs:
            raise ValueError(f"an adapter named {name!r} exists; delete_adapter it first")
        configs = _as_list(configs)
        active = self.active_adapter
        self._detach(active)
        resolved, attached = [], []
        try:
            for config in configs:
                method = method_for(config)
                config = method.resolve(self.base_model, config)
                method.prepare_model(self.base_model, config)
                skip = tuple(rep.path for reps in attached for rep in reps)
                attached.append(method.attach(self.base_model, config, skip))
                resolved.append(config)
                for param in method.adapter_tensors(attached[-1]).values():
                    param.requires_grad_(True)
        finally:
            self._restore(attached)
            self._attach(active)
        self._replacements[name] = attached
        self.adapter_configs[name] = resolved

    def set_adapter(self, name: Optional[str]) -> None:
        """Makes ``name`` the active adapter (None: the bare base model)."""
        if name is not None:
            self._check_name(name)
        self._detach(self.active_adapter)
        self.active_adapter = None
        self._attach(name)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Drops adapter ``name`` (if active, the base model runs bare after)."""
        self._check_name(name)
        if name == self.active_adapter:
            self.set_adapter(None)
        del self._replacements[name], self.adapter_configs[name]

    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_configs)

    def _each(self, name: Optional[str]):
        """(method, config, replacements) for each config of adapter ``name``."""
        name = self.active_adapter if name is None else name
        if name is None:
            raise ValueError("no adapter is active; pass adapter_name")
        self._check_name(name)
        for config, replacements in zip(self.adapter_configs[name], self._replacements[name]):
            yield method_for(config), config, replacements

    def adapter_tensors(self, adapter_name: Optional[str] = None) -> dict[str, nn.Parameter]:
        """Our name -> parameter for every tensor of the adapter (the active one
        by default): what trains and what ``save_adapter`` writes."""
        tensors = {}
        for method, _, replacements in self._each(adapter_name):
            for key, param in method.adapter_tensors(replacements).items():
                if key in tensors:
                    raise ValueError(f"two configs of one adapter both name a tensor {key!r}")
                tensors[key] = param
        return tensors

    # -- parameters ----------------------------------------------------------------

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts of the model as it runs now; an NF4
        weight counts as its number of elements, as a dense one would."""
        params = {id(p): p for p in self.parameters()}.values()
        nf4 = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, NF4Linear))
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return trainable, sum(p.numel() for p in params) + nf4

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() reach the adapters kept aside too.
        super()._apply(fn, recurse)
        for name, per_config in self._replacements.items():
            if name != self.active_adapter:
                for rep in (r for reps in per_config for r in reps):
                    rep.adapted._apply(fn)
        return self

    # -- running ---------------------------------------------------------------------

    def _prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.active_adapter is not None:
            for method, config, replacements in self._each(None):
                args, kwargs = method.prepare_inputs(replacements, config, args, kwargs)
        return args, kwargs

    def forward(self, *args, **kwargs):
        args, kwargs = self._prepare(args, kwargs)
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        input_ids = args[0] if args else kwargs.get("input_ids")
        args, kwargs = self._prepare(args, kwargs)
        out = self.base_model.generate(*args, **kwargs)
        if input_ids is not None and not args and kwargs.get("input_ids") is None:
            # A method turned input_ids into inputs_embeds (prompt tuning), from which
            # transformers returns the new tokens alone: put the input in front, as
            # generating from input_ids does.
            out = torch.cat([input_ids, out.to(input_ids.device)], dim=1)
        return out

    def merge_and_unload(self) -> nn.Module:
        """The base model with the active adapter merged into plain layers (LoRA:
        nn.Linear with W + s·B·A; QLoRA: a dense nn.Linear from the decoded NF4
        W). The wrapper is spent: every adapter is dropped (LoRA merges in place
        into base weights other adapters shared)."""
        if self.active_adapter is None:
            raise ValueError("merge_and_unload: no adapter is active")
        steps = list(self._each(None))
        for method, _, _ in steps:
            if not method.can_merge:
                why = f": {method.no_merge_reason}" if method.no_merge_reason else ""
                raise NotImplementedError(f"merge_and_unload: {method.name} adapters cannot be "
                                          f"merged{why}")
        for method, _, replacements in reversed(steps):
            for rep in reversed(replacements):
                self.base_model.set_submodule(rep.path, method.merge(rep))
        return self._release()

    def unload(self) -> nn.Module:
        """The base model without any adapter (QLoRA bases stay NF4)."""
        self.set_adapter(None)
        return self._release()

    def _release(self) -> nn.Module:
        model = self.base_model
        self._replacements.clear()
        self.adapter_configs.clear()
        self.active_adapter = None
        return model

    # -- files ---------------------------------------------------------------------------

    def save_adapter(self, directory: str, adapter_name: Optional[str] = None,
                     format: str = "pykernels") -> None:
        """Writes an adapter (the active one by default) to ``directory``:
        ``format="pykernels"`` (any method, any hybrid) or ``"peft"`` (one config
        of a method peft has; PeftModel.from_pretrained reads it)."""
        name = self.active_adapter if adapter_name is None else adapter_name
        steps = list(self._each(name))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_tensors(name).items()}
        os.makedirs(directory, exist_ok=True)
        if format == "pykernels":
            meta = {"format": FORMAT, "version": 1, "configs": [c.to_dict() for _, c, _ in steps]}
            save_file(tensors, os.path.join(directory, OURS_WEIGHTS), metadata={"format": "pt"})
            config_path, config = os.path.join(directory, OURS_CONFIG), meta
        elif format == "peft":
            if len(steps) != 1:
                raise ValueError(f"save_adapter(format='peft'): peft holds one method per adapter; "
                                 f"{name!r} has {len(steps)} configs")
            method, config, _ = steps[0]
            peft_config = method.to_peft_config(config)
            base_name = getattr(getattr(self.base_model, "config", None), "_name_or_path", None)
            peft_config["base_model_name_or_path"] = base_name or None
            save_file({method.peft_key(k): v for k, v in tensors.items()},
                      os.path.join(directory, PEFT_WEIGHTS), metadata={"format": "pt"})
            config_path, config = os.path.join(directory, PEFT_CONFIG), peft_config
        else:
            raise ValueError(f"save_adapter: format must be 'pykernels' or 'peft', got {format!r}")
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)

    def load_adapter(self, directory: str, adapter_name: str = "default",
                     **options) -> None:
        """Adds adapter ``adapter_name`` from ``directory`` (either format; does
        not activate it). ``options`` go to the method's peft reader (LoRA:
        ``quantized=True`` loads a peft LoRA as QLoRA over an NF4 base, plus
        QLoRAConfig fields such as ``blocksize``)."""
        configs, tensors = read_adapter(directory, **options)
        self.add_adapter(adapter_name, configs)
        try:
            self._load_tensors(adapter_name, tensors, directory)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    @torch.no_grad()
    def _load_tensors(self, name: str, tensors: dict, source: str) -> None:
        params = self.adapter_tensors(name)
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise ValueError(f"adapter in {source} does not fit this model: missing {missing[:5]} "
                             f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
        for key, param in params.items():
            if tensors[key].shape != param.shape:
                raise ValueError(f"adapter in {source}: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(tensors[key])

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str, adapter_name: str = "default",
                        **options) -> "AdapterModel":
        """Wraps ``model`` with the adapter saved in ``directory`` (either format), active."""
        configs, tensors = read_adapter(directory, **options)
        wrapped = cls(model, configs, adapter_name)
        wrapped._load_tensors(adapter_name, tensors, directory)
        return wrapped


def read_adapter(directory: str, **options) -> tuple[list[AdapterConfig], dict[str, torch.Tensor]]:
    """(configs, tensors under our names) from a directory in either format."""
    ours, peft = os.path.join(directory, OURS_CONFIG), os.path.join(directory, PEFT_CONFIG)
    if os.path.exists(ours):
        with open(ours) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{ours}: not a {FORMAT} file (format={meta.get('format')!r})")
        configs = [AdapterConfig.from_dict(c) for c in meta["configs"]]
        return configs, load_file(os.path.join(directory, OURS_WEIGHTS))
    if os.path.exists(peft):
        with open(peft) as f:
            data = json.load(f)
        method = method_for_peft_type(data.get("peft_type"))
        config = method.from_peft_config(data, **options)
        weights = os.path.join(directory, PEFT_WEIGHTS)
        if not os.path.exists(weights):
            raise FileNotFoundError(f"{weights} is missing (pickled adapter_model.bin files are not read)")
        tensors = load_file(weights)
        return [config], {method.key_from_peft(k): v for k, v in tensors.items()}
    raise FileNotFoundError(f"{directory}: neither {OURS_CONFIG} (pykernels) nor {PEFT_CONFIG} (peft)")


def wrap(model: nn.Module, config: Configs, adapter_name: str = "default") -> AdapterModel:
    """Wraps ``model`` (any nn.Module; HF transformers models too) with a new
    adapter: ``config`` is one config (LoRAConfig, QLoRAConfig, ...) or a list
    of them for a hybrid. The base model's parameters are frozen."""
    return AdapterModel(model, config, adapter_name)
