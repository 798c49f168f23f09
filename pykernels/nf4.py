"""NF4Tensor: a quantized weight and everything needed to decode it.

Holds the packed 4-bit codes, the per-block absmax (plain fp32, or the
double-quantized state: 8-bit codes + one fp32 scale per 256 blocks + an
offset), the original shape and dtype and the blocksize. Converts to and from
bitsandbytes' ``QuantState`` and its serialized dict, and saves to / loads from
safetensors (tensors) with the metadata as JSON in the header: no pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch

from . import ops, reference

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BNB_STATE_KEY = "quant_state.bitsandbytes__nf4"


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise TypeError(f"NF4Tensor: dtype must be float32, float16 or bfloat16, got {dtype}")


@dataclass
class NF4Tensor:
    packed: torch.Tensor                 # uint8 [ceil(numel / 2)]
    absmax: torch.Tensor                 # fp32 [blocks], or uint8 codes when double-quantized
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = ops.NF4_DEFAULT_BLOCKSIZE
    absmax_scale: Optional[torch.Tensor] = None   # double quant: fp32 [ceil(blocks / 256)]
    absmax_code: Optional[torch.Tensor] = None    # double quant: fp32 [256] dynamic map
    absmax_offset: Optional[torch.Tensor] = None  # double quant: fp32 scalar, mean(absmax)

    # ---- construction and decoding ----

    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = ops.NF4_DEFAULT_BLOCKSIZE,
                 double_quant: bool = False) -> "NF4Tensor":
        packed, absmax = ops.nf4_quantize(weight, blocksize)
        state = cls(packed, absmax, weight.shape, weight.dtype, blocksize)
        if double_quant:
            state._compress_absmax()
        return state

    def _compress_absmax(self) -> None:
        offset = self.absmax.mean()  # torch's mean, as bitsandbytes: same bits
        code = reference.dynamic_code().to(self.absmax.device)
        q, scale = ops.blockwise8_quantize(self.absmax - offset, code, ops.DOUBLE_QUANT_BLOCKSIZE)
        self.absmax, self.absmax_scale, self.absmax_code, self.absmax_offset = q, scale, code, offset

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax per block (decoding the double-quantized state if needed)."""
        if not self.double_quant:
            return self.absmax
        return ops.blockwise8_dequantize(self.absmax, self.absmax_scale, self.absmax_code,
                                         self.absmax_offset, ops.DOUBLE_QUANT_BLOCKSIZE)

    def dequantize(self, dtype: Optional[torch.dtype] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if out is not None and dtype is not None and out.dtype != dtype:
            raise TypeError(f"NF4Tensor.dequantize: out is {out.dtype} but dtype={dtype}")
        dtype = out.dtype if out is not None else (dtype or self.dtype)
        return ops.nf4_dequantize(self.packed, self.block_absmax(), self.shape, dtype,
                                  self.blocksize, out=out)

    def to(self, device) -> "NF4Tensor":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return NF4Tensor(**moved)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.__dict__.values()
                   if isinstance(t, torch.Tensor))

    # ---- bitsandbytes interop ----

    def to_bnb_dict(self) -> dict:
        """bitsandbytes' ``QuantState.as_dict(packed=True)`` form (safetensors-ready)."""
        meta = {"quant_type": "nf4", "blocksize": self.blocksize,
                "dtype": _dtype_name(self.dtype), "shape": list(self.shape)}
        tensors = {"absmax": self.absmax,
                   "quant_map": reference.nf4_code().to(self.packed.device)}
        if self.double_quant:
            meta.update(nested_blocksize=ops.DOUBLE_QUANT_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=self.absmax_offset.item())
            tensors.update(nested_absmax=self.absmax_scale, nested_quant_map=self.absmax_code)
        blob = json.dumps(meta).encode("utf-8")
        tensors[_BNB_STATE_KEY] = torch.tensor(list(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_bnb_dict(cls, packed: torch.Tensor, state: dict) -> "NF4Tensor":
        """From a bnb weight's packed bytes and its serialized quant state dict."""
        state = {k.split(".")[-1] if not k.startswith("quant_state.") else k: v
                 for k, v in state.items()}
        blob = state.get(_BNB_STATE_KEY)
        if blob is None:
            raise ValueError(f"from_bnb_dict: state has no '{_BNB_STATE_KEY}' entry "
                             "(only NF4 states are supported)")
        meta = json.loads(bytes(blob.tolist()).decode("utf-8"))
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"from_bnb_dict: quant_type must be 'nf4', got {meta.get('quant_type')!r}")
        _check_quant_map(state["quant_map"])
        nf4 = cls(packed.reshape(-1).view(torch.uint8), state["absmax"], torch.Size(meta["shape"]),
                  _DTYPES[meta["dtype"]], int(meta["blocksize"]))
        if "nested_absmax" in state:
            nf4.absmax_scale = state["nested_absmax"]
            nf4.absmax_code = state["nested_quant_map"]
            nf4.absmax_offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32,
                                             device=packed.device)
        nf4.validate()
        return nf4

    def to_bnb(self):
        """(packed weight [n/2, 1], bitsandbytes.functional.QuantState)."""
        from bitsandbytes.functional import QuantState
        state = QuantState.from_dict(self.to_bnb_dict(), device=self.packed.device)
        return self.packed.reshape(-1, 1), state

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Tensor":
        return cls.from_bnb_dict(packed, quant_state.as_dict(packed=True))

    # ---- safetensors ----

    def state_tensors(self, prefix: str = "") -> dict:
        """Flat dict of tensors (bnb's layout) for safetensors: weight + quant state."""
        tensors = {prefix + "weight": self.packed.reshape(-1, 1)}
        for key, value in self.to_bnb_dict().items():
            tensors[prefix + "weight." + key] = value
        return tensors

    @classmethod
    def from_state_tensors(cls, tensors: dict, prefix: str = "") -> "NF4Tensor":
        head = prefix + "weight."
        state = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
        return cls.from_bnb_dict(tensors[prefix + "weight"], state)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous().cpu() for k, v in self.state_tensors().items()}, path,
                  metadata={"format": "pykernels-nf4"})

    @classmethod
    def load(cls, path: str, device="cpu") -> "NF4Tensor":
        from safetensors.torch import load_file
        return cls.from_state_tensors(load_file(path, device=str(device)))

    def validate(self) -> None:
        """Checks sizes and dtypes against shape and blocksize; raises ValueError."""
        n = self.numel
        blocks = -(-n // self.blocksize)
        _expect(self.packed, "packed", torch.uint8, (n + 1) // 2)
        if self.double_quant:
            _expect(self.absmax, "absmax (8-bit codes)", torch.uint8, blocks)
            _expect(self.absmax_scale, "nested absmax", torch.float32,
                    -(-blocks // ops.DOUBLE_QUANT_BLOCKSIZE))
            _expect(self.absmax_code, "nested quant map", torch.float32, 256)
        else:
            _expect(self.absmax, "absmax", torch.float32, blocks)


def _expect(t: torch.Tensor, name: str, dtype: torch.dtype, numel: int) -> None:
    if t.dtype != dtype:
        raise ValueError(f"NF4Tensor: {name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"NF4Tensor: {name} must have {numel} elements, got {t.numel()}")


def _check_quant_map(quant_map: torch.Tensor) -> None:
    expected = reference.nf4_code()
    if quant_map.numel() != 16 or not torch.equal(quant_map.float().cpu(), expected):
        raise ValueError("from_bnb_dict: quant_map is not the NF4 table")
