"""Model wrapper and adapter methods: ``pykernels.wrap(model, LoRAConfig())``.

registry.py: the method registry (how a method targets, builds, names, merges);
lora.py: LoRA and QLoRA; ia3.py: IA³; bottleneck.py: bottleneck adapters;
prompt.py: prompt tuning;
model.py: the AdapterModel wrapper and adapter files.
"""
from .bottleneck import BottleneckConfig
from .ia3 import IA3Config
from .lora import LoRAConfig, QLoRAConfig
from .model import AdapterModel, read_adapter, wrap
from .prompt import PromptTuningConfig
from .registry import (LLAMA_TARGETS, AdapterConfig, AdapterMethod, Replacement, get_method,
                       register_method)

__all__ = ["AdapterConfig", "AdapterMethod", "AdapterModel", "BottleneckConfig", "IA3Config",
           "LLAMA_TARGETS", "LoRAConfig", "PromptTuningConfig", "QLoRAConfig", "Replacement",
           "get_method", "read_adapter", "register_method", "wrap"]
