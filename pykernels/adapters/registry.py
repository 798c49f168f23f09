"""The adapter-method registry: the one place where a PEFT method says how it
targets modules, builds its layer, names its tensors for save/load and merges.

The model wrapper (``pykernels.adapters.model``) holds nothing method-specific.
For each config it asks the config's method to attach layers to the model; the
method returns the ``Replacement`` s it made (path, module before, module
after), which is all the wrapper needs to detach and re-attach an adapter when
switching, to list its trainable tensors under stable names, and to merge.

Adding a method (IA³, bottleneck adapters, prompt tuning, multi-LoRA):

1. a config dataclass subclassing ``AdapterConfig`` with ``method = "<name>"``
   (JSON-serialisable fields only: dtypes as strings);
2. an ``AdapterMethod`` subclass, registered with ``register_method``. The
   defaults cover "replace each targeted module with a layer built around it":
   override ``build`` (IA³: ``IA3Linear.from_linear(module, feedforward)``),
   ``prepare_base`` when the base itself must change first (QLoRA quantizes
   it), ``merge`` to hand back a plain module. A method that does not swap
   targeted modules overrides ``attach`` and returns Replacements of its own
   kind (bottleneck: a decoder layer's ``mlp`` swapped for mlp-then-adapter;
   prompt tuning: the input embedding swapped for a pass-through module that
   also holds the PromptEmbedding) and ``prepare_inputs`` to rewrite the
   forward's arguments (prepend the virtual tokens' embeddings, widen the
   attention mask and labels);
3. peft interop: ``peft_type``, ``to_peft_config`` / ``from_peft_config``, and
   ``peft_key`` / ``key_from_peft`` when peft's tensor names are not
   ``base_model.model.<our key>`` (prompt tuning: ``prompt_embeddings``; IA³'s
   ``<path>.ia3_l`` fits the default when the layer's parameter is ``ia3_l``).
4. several resident adapters in one layer, chosen per batch row (multi-LoRA):
   the method's layer owns them (add/delete/set_adapter on MultiLoRALinear),
   and ``prepare_inputs`` takes the per-row adapter ids out of the call's
   arguments and hands them to its layers; the wrapper's named adapters sit one
   level above and need nothing new.

Our tensor names are ``<module path>.<parameter name inside the adapted
layer>`` for every parameter the adapted layer has and its base does not, so a
LoRA layer's are ``...q_proj.lora_A.weight``, the names peft uses.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

# The projections of a Llama-family decoder layer (attention and MLP).
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_DEFAULT_TARGETS = {model_type: LLAMA_TARGETS for model_type in
                    ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")}

Targets = Union[list, str, None]
_PEFT_PREFIX = "base_model.model."


def parse_dtype(name: Optional[str], what: str) -> Optional[torch.dtype]:
    """``"bfloat16"`` -> torch.bfloat16 (configs keep dtypes as strings for JSON)."""
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{what} must name a floating point torch dtype such as 'bfloat16', got {name!r}")
    return dtype


@dataclass
class AdapterConfig:
    """Base of every method's config. ``target_modules``: a list of names, each
    matching a module whose path equals it or ends with ``.<name>``, or one
    string, a regular expression the whole path must match (peft's rules);
    None takes the method's default for the model's type."""
    method: ClassVar[str] = ""
    target_modules: Targets = None

    def __post_init__(self):
        if isinstance(self.target_modules, (tuple, set, frozenset)):
            self.target_modules = sorted(self.target_modules)
        if not (self.target_modules is None or isinstance(self.target_modules, str) or
                (isinstance(self.target_modules, list)
                 and all(isinstance(t, str) for t in self.target_modules))):
            raise TypeError(f"{type(self).__name__}: target_modules must be a list of module names "
                            f"or a regex string, got {self.target_modules!r}")

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict) -> "AdapterConfig":
        """The config ``to_dict`` wrote; its ``method`` picks the class."""
        data = dict(data)
        config_class = get_method(data.pop("method", None)).config_class
        known = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{config_class.__name__}: unknown fields {unknown}; expected some of {sorted(known)}")
        return config_class(**data)


def matches(target_modules: Targets, path: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


@dataclass
class Replacement:
    """One change a method made to the model: ``adapted`` now sits at ``path``
    where ``original`` was (``adapted`` usually holds ``original`` inside)."""
    path: str
    original: nn.Module
    adapted: nn.Module


class AdapterMethod:
    """How one PEFT method acts on a model; see the module docstring."""
    config_class: ClassVar[type] = AdapterConfig
    # Module types the default targeting may replace.
    target_types: ClassVar[tuple] = (nn.Linear,)
    # peft's name for the method (its adapter_config.json "peft_type"), if peft has it.
    peft_type: ClassVar[Optional[str]] = None
    can_merge: ClassVar[bool] = False
    # Why merge_and_unload refuses a method that cannot merge (said in its error).
    no_merge_reason: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return self.config_class.method

    def resolve(self, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        """``config`` with defaults that depend on the model filled in, so a saved
        config reproduces the same targets."""
        if config.target_modules is not None:
            return config
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in _DEFAULT_TARGETS:
            raise ValueError(f"{type(config).__name__}: target_modules is required for model_type "
                             f"{model_type!r} (defaults exist for {sorted(_DEFAULT_TARGETS)})")
        return dataclasses.replace(config, target_modules=list(_DEFAULT_TARGETS[model_type]))

    def find_targets(self, model: nn.Module, config: AdapterConfig,
                     skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
        """(path, module) of every module of ``target_types`` that the config
        targets, leaving out those at or under a path in ``skip`` (layers another
        config of the same adapter already placed)."""
        found = []
        for path, module in model.named_modules():
            if any(path == s or path.startswith(s + ".") for s in skip):
                continue
            if isinstance(module, self.target_types) and matches(config.target_modules, path):
                found.append((path, module))
        if not found:
            names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules()
                            if isinstance(m, self.target_types)})
            raise ValueError(f"{type(config).__name__}: target_modules {config.target_modules!r} "
                             f"matched no {'/'.join(t.__name__ for t in self.target_types)} module; "
                             f"the model has: {names[:20]}")
        return found

    def prepare_model(self, model: nn.Module, config: AdapterConfig) -> None:
        """Model-wide changes made once before attaching (QLoRA's compute dtype)."""

    def prepare_base(self, module: nn.Module, config: AdapterConfig) -> nn.Module:
        """The base the adapted layer wraps; replaces ``module`` for good (QLoRA:
        the NF4 layer, so the dense weight is not kept alive)."""
        return module

    def build(self, module: nn.Module, config: AdapterConfig) -> nn.Module:
        """The adapted layer around ``module`` (fresh adapter weights)."""
        raise NotImplementedError(f"{type(self).__name__}.build")

    def attach(self, model: nn.Module, config: AdapterConfig,
               skip: tuple[str, ...] = ()) -> list[Replacement]:
        # Every layer is built before any is placed: a build that raises leaves
        # the model as it was.
        replacements = []
        for path, module in self.find_targets(model, config, skip):
            base = self.prepare_base(module, config)
            replacements.append(Replacement(path, base, self.build(base, config)))
        for rep in replacements:
            model.set_submodule(rep.path, rep.adapted)
        return replacements

    def adapter_tensors(self, replacements: list[Replacement]) -> dict[str, nn.Parameter]:
        """Our name -> parameter, for every parameter an adapted layer has and
        its original does not: what trains, and what save/load carry."""
        tensors = {}
        for rep in replacements:
            base = {id(p) for p in rep.original.parameters()}
            for name, param in rep.adapted.named_parameters():
                if id(param) not in base:
                    tensors[f"{rep.path}.{name}" if rep.path else name] = param
        return tensors

    def merge(self, replacement: Replacement) -> nn.Module:
        """A plain module computing what ``replacement.adapted`` computes."""
        raise NotImplementedError(f"{self.name} adapters cannot be merged into the model")

    def prepare_inputs(self, replacements: list[Replacement], config: AdapterConfig,
                       args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Rewrites the model's forward/generate arguments (prompt tuning)."""
        return args, kwargs

    def to_peft_config(self, config: AdapterConfig) -> dict:
        raise NotImplementedError(f"{self.name} adapters have no peft format here")

    def from_peft_config(self, data: dict, **options: Any) -> AdapterConfig:
        raise NotImplementedError(f"reading peft_type {data.get('peft_type')!r} is not implemented")

    def peft_key(self, key: str) -> str:
        """peft's name for our tensor ``key``."""
        return _PEFT_PREFIX + key

    def key_from_peft(self, peft_key: str) -> str:
        """Our name for peft's tensor ``peft_key`` (the inverse of ``peft_key``)."""
        return peft_key.removeprefix(_PEFT_PREFIX)


_METHODS: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> AdapterMethod:
    """Makes ``method`` the handler of configs of ``method.config_class``."""
    name = method.config_class.method
    if not name:
        raise ValueError(f"{type(method).__name__}: config_class {method.config_class.__name__} "
                         f"needs a non-empty 'method' name")
    _METHODS[name] = method
    return method


def get_method(name: Optional[str]) -> AdapterMethod:
    if name not in _METHODS:
        raise ValueError(f"unknown adapter method {name!r}; registered: {sorted(_METHODS)}")
    return _METHODS[name]


def method_for(config: AdapterConfig) -> AdapterMethod:
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"expected an AdapterConfig (e.g. LoRAConfig), got {type(config).__name__}")
    return get_method(config.method)


def method_for_peft_type(peft_type: Optional[str]) -> AdapterMethod:
    for method in _METHODS.values():
        if method.peft_type is not None and method.peft_type == peft_type:
            return method
    known = sorted(m.peft_type for m in _METHODS.values() if m.peft_type)
    raise ValueError(f"peft_type {peft_type!r} is not supported; supported: {known}")
