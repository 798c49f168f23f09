"""pykernels: fused C++/CUDA kernels for parameter-efficient fine-tuning.

Ops are registered under ``torch.ops.pykernels``; ``pykernels.ops`` has the typed
Python functions, ``pykernels.reference`` the plain-PyTorch spec of each.
"""
import torch  # noqa: F401  (loads libtorch before our extension)

from . import _C  # noqa: F401  (registers the ops)
from . import ops  # noqa: F401  (fake impls and autograd)
from .nf4 import NF4Tensor

__all__ = ["NF4Tensor", "ops"]
__version__ = "0.1.0"
from .adapters import AdapterModel, LoRAConfig, QLoRAConfig, wrap

__all__ += ["AdapterModel", "LoRAConfig", "QLoRAConfig", "wrap"]
from .adapters import IA3Config

__all__ += ["IA3Config"]
from .adapters import BottleneckConfig

__all__ += ["BottleneckConfig"]
from .adapters import PromptTuningConfig

__all__ += ["PromptTuningConfig"]
