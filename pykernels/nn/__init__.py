"""Drop-in nn.Module layers built on pykernels ops."""
from .nf4 import NF4Linear

__all__ = ["NF4Linear"]
from .lora import LoRALinear

__all__ += ["LoRALinear"]
from .qlora import QLoRALinear

__all__ += ["QLoRALinear"]
from .multi_lora import MultiLoRALinear, adapter_ids, set_adapter_ids

__all__ += ["MultiLoRALinear", "adapter_ids", "set_adapter_ids"]

from .bottleneck import (AdaptedModule, BottleneckAdapter, InsertedAdapter,
                         add_bottleneck_adapters, remove_bottleneck_adapters)

__all__ += ["AdaptedModule", "BottleneckAdapter", "InsertedAdapter", "add_bottleneck_adapters",
            "remove_bottleneck_adapters"]

from .ia3 import IA3Linear

__all__ += ["IA3Linear"]
from .prompt import PromptEmbedding, PromptTuningLM, prompt_tuning

__all__ += ["PromptEmbedding", "PromptTuningLM", "prompt_tuning"]
from .bottleneck import MultiBottleneckAdapter
from .row_ids import RowAdapterLayer

__all__ += ["MultiBottleneckAdapter", "RowAdapterLayer"]
