"""Typed public functions over the native ops (``torch.ops.pykernels.*``), one
module per op family, each with its fake (meta) implementations and autograd
registration. Schemas live in csrc/torch/schemas.cpp."""
from .nf4 import (DOUBLE_QUANT_BLOCKSIZE, NF4_DEFAULT_BLOCKSIZE, blockwise8_dequantize,
                  blockwise8_quantize, nf4_dequantize, nf4_quantize)

__all__ = ["DOUBLE_QUANT_BLOCKSIZE", "NF4_DEFAULT_BLOCKSIZE", "blockwise8_dequantize",
           "blockwise8_quantize", "nf4_dequantize", "nf4_quantize"]
from .nf4_linear import nf4_linear, nf4_linear_grad_input

__all__ += ["nf4_linear", "nf4_linear_grad_input"]
from .lora import lora_dropout_mask, lora_linear, lora_merge_

__all__ += ["lora_dropout_mask", "lora_linear", "lora_merge_"]
from .qlora import qlora_linear

__all__ += ["qlora_linear"]
from .multi_lora import multi_lora

__all__ += ["multi_lora"]

from .bottleneck import bottleneck_adapter

__all__ += ["bottleneck_adapter"]
from .multi_bottleneck import multi_bottleneck

__all__ += ["multi_bottleneck"]

from .ia3 import ia3_nf4_linear, ia3_scale

__all__ += ["ia3_nf4_linear", "ia3_scale"]
from .prompt import prompt_embed

__all__ += ["prompt_embed"]
