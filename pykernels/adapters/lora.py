"""LoRA and QLoRA as adapter methods: configs, layers (nn.LoRALinear,
nn.QLoRALinear), merging, mixed batches over named adapters (nn.MultiLoRALinear
around the adapters' own weights) and peft's LoRA config (peft_type "LORA")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .. import ops
from ..nn import LoRALinear, MultiLoRALinear, NF4Linear, QLoRALinear
from .registry import AdapterConfig, AdapterMethod, Replacement, parse_dtype, register_method


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: y = W·x + s·B·A·dropout(x), s = alpha/r (use_rslora: alpha/√r).
    peft's defaults for r and alpha; target_modules defaults to every attention
    and MLP projection of a Llama-family model."""
    method: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    use_rslora: bool = False


@dataclass
class QLoRAConfig(LoRAConfig):
    """LoRA over an NF4 base (bitsandbytes-compatible; blocksize 32…4096, double
    quantization of absmax). The targeted nn.Linear layers are quantized for
    good when the adapter is added; layers already NF4 are used as they are.

    compute_dtype: the dtype the model runs in; when set, the model is cast to
    it before quantizing (as loading it in that dtype would). adapter_dtype: the
    dtype A and B are kept in (e.g. "float32" under a bf16 model; they are cast
    to the input's dtype per call); None: the base weight's dtype."""
    method: ClassVar[str] = "qlora"
    blocksize: int = ops.NF4_DEFAULT_BLOCKSIZE
    double_quant: bool = True
    compute_dtype: Optional[str] = None
    adapter_dtype: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        parse_dtype(self.compute_dtype, "QLoRAConfig.compute_dtype")
        parse_dtype(self.adapter_dtype, "QLoRAConfig.adapter_dtype")


# peft LoraConfig fields whose non-default values change the model in ways this
# reader does not reproduce; a file using one is refused rather than misread.
_PEFT_LORA_UNSUPPORTED = {
    "use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
    "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
    "exclude_modules": None, "layer_replication": None, "target_parameters": None,
    "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None,
}
# Those that peft versions long before 0.21 know too: the ones we write, so that
# older peft reads our files as well.
_PEFT_LORA_WRITTEN = ("use_dora", "fan_in_fan_out", "bias", "modules_to_save",
                      "layers_to_transform", "rank_pattern", "alpha_pattern")


class LoRAMethod(AdapterMethod):
    config_class = LoRAConfig
    target_types = (nn.Linear,)
    peft_type = "LORA"
    can_merge = True

    def build(self, module: nn.Linear, config: LoRAConfig) -> nn.Module:
        return LoRALinear(module, r=config.r, alpha=config.alpha, dropout=config.dropout,
                          use_rslora=config.use_rslora)

    def merge(self, replacement: Replacement) -> nn.Module:
        layer = replacement.adapted
        layer.merge()  # in place: the base nn.Linear now holds W + s·B·A
        return layer.base_layer

    def mix(self, original: nn.Module, layers: dict[str, nn.Module]) -> MultiLoRALinear:
        # LoRALinear and QLoRALinear alike: their lora_A / lora_B serve in the mixed layer.
        mixed = MultiLoRALinear(original)
        for name, layer in layers.items():
            mixed.attach_adapter(name, layer.lora_A, layer.lora_B, layer.scaling, layer.dropout)
        return mixed.train(next(iter(layers.values())).training)

    def route(self, layer: MultiLoRALinear, names: list) -> None:
        index = {name: i for i, name in enumerate(layer.adapter_names)}
        layer.row_ids = torch.tensor([index.get(name, -1) for name in names], dtype=torch.int64,
                                     device=layer.lora_A[layer.adapter_names[0]].weight.device)

    def to_peft_config(self, config: LoRAConfig) -> dict:
        return {"peft_type": "LORA", "task_type": None, "r": config.r, "lora_alpha": config.alpha,
                "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
                "target_modules": config.target_modules, "init_lora_weights": True,
                "inference_mode": True, **{k: _PEFT_LORA_UNSUPPORTED[k] for k in _PEFT_LORA_WRITTEN}}

    def from_peft_config(self, data: dict, quantized: bool = False, **qlora: Any) -> LoRAConfig:
        """peft's LoRA config as ours; ``quantized``: as a QLoRAConfig (peft's file
        does not say the base was 4-bit), ``qlora`` its extra fields."""
        for key, default in _PEFT_LORA_UNSUPPORTED.items():
            value = data.get(key, default)
            if value != default and value not in (None, {}, [], False, "none"):
                raise ValueError(f"peft LoRA config: {key}={value!r} is not supported (expected {default!r})")
        if not data.get("target_modules"):
            raise ValueError("peft LoRA config: target_modules is missing (expected the list or regex "
                             "peft resolved when it saved)")
        fields = {"r": data.get("r", 8), "alpha": data.get("lora_alpha", 8),
                  "dropout": data.get("lora_dropout", 0.0), "use_rslora": data.get("use_rslora", False),
                  "target_modules": data.get("target_modules")}
        return QLoRAConfig(**fields, **qlora) if quantized else LoRAConfig(**fields)


class QLoRAMethod(LoRAMethod):
    config_class = QLoRAConfig
    target_types = (nn.Linear, NF4Linear)
    peft_type = None  # written as peft LoRA; read back with load_adapter(..., quantized=True)

    def prepare_model(self, model: nn.Module, config: QLoRAConfig) -> None:
        dtype = parse_dtype(config.compute_dtype, "QLoRAConfig.compute_dtype")
        if dtype is not None:
            model.to(dtype)

    def prepare_base(self, module: nn.Module, config: QLoRAConfig) -> nn.Module:
        # The NF4 layer is the Replacement's original: detaching puts it back, not
        # the dense layer, whose weight can then be freed.
        if isinstance(module, NF4Linear):
            return module
        return NF4Linear.from_linear(module, blocksize=config.blocksize,
                                     double_quant=config.double_quant)

    def build(self, module: NF4Linear, config: QLoRAConfig) -> nn.Module:
        return QLoRALinear(module, r=config.r, alpha=config.alpha, dropout=config.dropout,
                           use_rslora=config.use_rslora,
                           adapter_dtype=parse_dtype(config.adapter_dtype, "QLoRAConfig.adapter_dtype"))

    def merge(self, replacement: Replacement) -> nn.Module:
        # Decoded NF4 W + s·B·A as a dense nn.Linear: exactly the trained model.
        return replacement.adapted.merged_linear()


register_method(LoRAMethod())
register_method(QLoRAMethod())

__all__ = ["LoRAConfig", "QLoRAConfig", "LoRAMethod", "QLoRAMethod"]
