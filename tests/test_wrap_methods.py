"""The wrapper's methods beyond LoRA (pykernels.wrap with IA3Config,
BottleneckConfig, PromptTuningConfig) and mixed batches over named LoRA
adapters: targeting, merging, our files, peft's files both ways and peft's
mixed-batch adapter_names on SmolLM2, the trainable-parameter report, and
torch.compile(fullgraph=True)."""
import os

import pytest
import torch
from torch import nn

from pykernels import (AdapterModel, BottleneckConfig, IA3Config, LoRAConfig, PromptTuningConfig,
                       wrap)
from pykernels.nn import AdaptedModule, IA3Linear, LoRALinear, NF4Linear, prompt_tuning

from test_wrap import count, logits, smollm2, tiny_llama, tokens  # noqa: F401 (smollm2: fixture)


def perturb(tensors, seed, scale=0.05):
    """Each tensor moved by scaled noise (IA³'s l around 1, others around 0), so
    every adapter changes the output and a test can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tensors.values():
            param.add_(torch.randn(param.shape, generator=g) * scale)


# -- IA³ ----------------------------------------------------------------------------------------


def ia3_layers(wrapped):
    return {p.removeprefix("base_model."): m for p, m in wrapped.named_modules()
            if isinstance(m, IA3Linear)}


def test_ia3_targets_and_feedforward_defaults():
    wrapped = wrap(tiny_llama(), IA3Config())
    config = wrapped.adapter_configs["default"][0]
    assert (config.target_modules, config.feedforward_modules) == (
        ["k_proj", "v_proj", "down_proj"], ["down_proj"])
    layers = ia3_layers(wrapped)
    assert len(layers) == 6
    assert all(m.feedforward == p.endswith("down_proj") for p, m in layers.items())
    down = layers["model.layers.0.mlp.down_proj"]
    assert down.ia3_l.shape == (1, down.in_features)  # peft's shapes
    assert layers["model.layers.0.self_attn.k_proj"].ia3_l.shape == (32, 1)
    with pytest.raises(ValueError, match="feedforward_modules must be among target_modules"):
        wrap(tiny_llama(), IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]))
    mlp = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules is required"):
        wrap(mlp, IA3Config())


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_ia3_forward_train_merge(quantize):
    model, ids = tiny_llama(), tokens()
    base = logits(model, ids)
    wrapped = wrap(model, IA3Config(quantize=quantize, blocksize=32))
    assert count(wrapped, NF4Linear) == (6 if quantize else 0)
    if not quantize:  # l = 1: no change
        torch.testing.assert_close(logits(wrapped, ids), base, rtol=0, atol=0)
    perturb(wrapped.adapter_tensors(), 0, 0.3)
    adapted = logits(wrapped, ids)
    assert (adapted - base).abs().max() > 1e-3
    wrapped.train()
    wrapped(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert grads == {"base_model." + k for k in wrapped.adapter_tensors()} and len(grads) == 6
    wrapped.eval()
    merged = wrapped.merge_and_unload()
    # NF4 bases merge into dense layers holding the decoded W ⊙ l: the trained model exactly.
    assert count(merged, IA3Linear) == 0 and count(merged, NF4Linear) == 0
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-4, atol=1e-5)


def test_ia3_save_load_ours_and_hybrid_with_lora(tmp_path):
    ids = tokens()
    hybrid = [IA3Config(), LoRAConfig(r=2, target_modules=["q_proj", "k_proj"])]
    wrapped = wrap(tiny_llama(), hybrid)
    assert len(ia3_layers(wrapped)) == 6  # k_proj went to IA³ (first), LoRA took q_proj only
    perturb(wrapped.adapter_tensors(), 0)
    expected = logits(wrapped, ids)
    wrapped.save_adapter(str(tmp_path))
    loaded = AdapterModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(loaded.merge_and_unload(), ids), expected,
                               rtol=1e-4, atol=1e-5)


def test_ia3_peft_format_round_trip_over_nf4(tmp_path):
    ids = tokens()
    wrapped = wrap(tiny_llama(), IA3Config(quantize=True, blocksize=32, double_quant=False))
    perturb(wrapped.adapter_tensors(), 0, 0.3)
    wrapped.save_adapter(str(tmp_path), format="peft")
    loaded = AdapterModel.from_pretrained(tiny_llama(), str(tmp_path), quantized=True,
                                          blocksize=32, double_quant=False)
    assert loaded.adapter_configs["default"] == wrapped.adapter_configs["default"]
    torch.testing.assert_close(logits(loaded, ids), logits(wrapped, ids), rtol=0, atol=0)


def test_peft_saved_ia3_loads_here(smollm2, tmp_path):
    from peft import IA3Config as PeftIA3Config, get_peft_model
    base, ids, base_logits = smollm2
    peft_model = get_peft_model(base, PeftIA3Config(task_type="CAUSAL_LM"))
    try:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "ia3_l" in name:
                    param.add_(torch.randn(param.shape, generator=g) * 0.3)
        peft_model.save_pretrained(str(tmp_path))
        expected = logits(peft_model.eval(), ids)
    finally:
        peft_model.unload()
    ours = AdapterModel.from_pretrained(base, str(tmp_path))
    try:
        config = ours.adapter_configs["default"][0]
        assert (type(config), sorted(config.feedforward_modules)) == (IA3Config, ["down_proj"])
        assert len(ia3_layers(ours)) == 30 * 3
        got = logits(ours, ids)
    finally:
        ours.unload()
    assert (got - base_logits).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_ours_ia3_saved_in_peft_format_loads_in_peft(smollm2, tmp_path):
    from peft import PeftModel
    base, ids, base_logits = smollm2
    wrapped = wrap(base, IA3Config())
    try:
        perturb(wrapped.adapter_tensors(), 0, 0.3)
        expected = logits(wrapped, ids)
        wrapped.save_adapter(str(tmp_path), format="peft")
    finally:
        wrapped.unload()
    peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    try:
        assert sum("ia3_l" in n for n, _ in peft_model.named_parameters()) == 30 * 3
        got = logits(peft_model, ids)
    finally:
        peft_model.unload()
    assert (got - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# -- bottleneck adapters ------------------------------------------------------------------------


@pytest.mark.parametrize("placement,sites", [("pfeiffer", 1), ("houlsby", 2), ("parallel", 1)])
def test_bottleneck_train_save_load_and_no_merge(placement, sites, tmp_path):
    model, ids = tiny_llama(), tokens()
    base = logits(model, ids)
    wrapped = wrap(model, BottleneckConfig(placement=placement, reduction=8, act="gelu"))
    assert count(wrapped, AdaptedModule) == 2 * sites
    torch.testing.assert_close(logits(wrapped, ids), base, rtol=0, atol=0)  # up = 0: identity
    first = sorted(wrapped.adapter_tensors())[:4]
    assert first == [f"model.layers.0.mlp.adapter.{p}" for p in
                     ("down.bias", "down.weight", "up.bias", "up.weight")]
    wrapped.train()
    wrapped(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is not None for p in wrapped.adapter_tensors().values())
    wrapped.eval()
    perturb(wrapped.adapter_tensors(), 0)
    adapted = logits(wrapped, ids)
    assert (adapted - base).abs().max() > 1e-3
    wrapped.save_adapter(str(tmp_path))
    loaded = AdapterModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(loaded, ids), adapted, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="extra layer with a nonlinearity"):
        loaded.merge_and_unload()
    with pytest.raises(NotImplementedError, match="no peft format"):
        loaded.save_adapter(str(tmp_path / "peft"), format="peft")
    unloaded = loaded.unload()
    assert count(unloaded, AdaptedModule) == 0
    torch.testing.assert_close(logits(unloaded, ids), base, rtol=0, atol=0)


def test_bottleneck_layers_hybrid_and_switching():
    model, ids = tiny_llama(), tokens()
    base = logits(model, ids)
    hybrid = [LoRAConfig(r=2, target_modules=["down_proj"]),
              BottleneckConfig(layers=[1], bottleneck_dim=4)]
    wrapped = wrap(model, hybrid, adapter_name="h")
    assert count(wrapped, AdaptedModule) == 1 and count(wrapped, LoRALinear) == 2
    mlp = wrapped.base_model.model.layers[1].mlp
    assert isinstance(mlp, AdaptedModule) and isinstance(mlp.base_layer.down_proj, LoRALinear)
    perturb(wrapped.adapter_tensors(), 0)
    hybrid_logits = logits(wrapped, ids)
    wrapped.add_adapter("b", BottleneckConfig(placement="houlsby"))
    wrapped.set_adapter("b")
    assert count(wrapped, AdaptedModule) == 4 and count(wrapped, LoRALinear) == 0
    wrapped.set_adapter("h")
    torch.testing.assert_close(logits(wrapped, ids), hybrid_logits, rtol=0, atol=0)
    wrapped.set_adapter(None)
    torch.testing.assert_close(logits(wrapped, ids), base, rtol=0, atol=0)


def test_bottleneck_bad_config():
    with pytest.raises(ValueError, match="placement must be one of houlsby, pfeiffer, parallel"):
        BottleneckConfig(placement="after")
    with pytest.raises(ValueError, match="act must be one of"):
        BottleneckConfig(act="tanh")
    with pytest.raises(ValueError, match="target_modules is not used"):
        BottleneckConfig(target_modules=["mlp"])
    model = tiny_llama()
    with pytest.raises(ValueError, match="layer 5 out of range"):
        wrap(model, BottleneckConfig(layers=[5]))
    assert count(model, AdaptedModule) == 0


# -- prompt tuning ------------------------------------------------------------------------------


def test_prompt_tuning_forward_generate_match_prompt_tuning_lm():
    model, ids = tiny_llama(), tokens()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in row 1
    wrapped = wrap(model, PromptTuningConfig(num_virtual_tokens=3, init="vocab"))
    prompt = wrapped.adapter_tensors()["prompt_embeddings"]
    assert prompt.shape == (3, 64) and prompt.requires_grad
    with torch.no_grad():
        got = wrapped(ids, attention_mask=mask, use_cache=False).logits
    generated = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                                 do_sample=False)
    wrapped.unload()
    reference = prompt_tuning(model, 3)
    with torch.no_grad():
        reference.prompt.embedding.weight.copy_(prompt)
        expected = reference(ids, attention_mask=mask, use_cache=False).logits
    assert got.shape == (2, 3 + 9, 128)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(generated, reference.generate(ids, attention_mask=mask, max_new_tokens=3,
                                                     do_sample=False))
    assert torch.equal(generated[:, :9], ids)


def test_prompt_tuning_bad_input():
    with pytest.raises(ValueError, match="num_virtual_tokens must be an int >= 1"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="init='text' needs init_text and tokenizer"):
        PromptTuningConfig(init="text", init_text="hello")
    wrapped = wrap(tiny_llama(), PromptTuningConfig(num_virtual_tokens=60))
    with pytest.raises(ValueError, match="60 virtual tokens \\+ 9 input tokens = 69 exceeds"):
        wrapped(tokens())
    with pytest.raises(NotImplementedError, match="virtual tokens are inputs, not weights"):
        wrapped.merge_and_unload()


def test_peft_saved_prompt_tuning_loads_here_and_back(smollm2, tmp_path):
    from peft import PeftModel, PromptTuningConfig as PeftPromptTuningConfig, get_peft_model
    base, ids, _ = smollm2
    # peft's prompt tuning leaves the base model's modules as they were: no unload.
    peft_model = get_peft_model(base, PeftPromptTuningConfig(task_type="CAUSAL_LM",
                                                             num_virtual_tokens=4))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    expected = logits(peft_model.eval(), ids)
    ours = AdapterModel.from_pretrained(base, str(tmp_path / "peft"))
    try:
        assert ours.adapter_configs["default"] == [PromptTuningConfig(num_virtual_tokens=4)]
        got = logits(ours, ids)
        with torch.no_grad():
            ours.adapter_tensors()["prompt_embeddings"].mul_(0.5)
        ours_logits = logits(ours, ids)
        ours.save_adapter(str(tmp_path / "ours"), format="peft")
    finally:
        ours.unload()
    assert got.shape == (1, 4 + ids.shape[1], base.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    theirs = logits(PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval(), ids)
    assert (ours_logits - got).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours_logits, rtol=1e-4, atol=1e-4)


def test_prompt_plus_lora_hybrid_trains_saves_loads_on_smollm2(smollm2, tmp_path):
    from pykernels.models import cache_dir
    base, ids, _ = smollm2
    tokenizer = os.path.join(cache_dir(), "smollm2-135m-instruct")
    hybrid = [PromptTuningConfig(num_virtual_tokens=4, init="text", init_text="Answer briefly:",
                                 tokenizer=tokenizer),
              LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])]
    wrapped = wrap(base, hybrid)
    try:
        params = list(wrapped.adapter_tensors().values())
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        wrapped.train()
        losses = []
        for _ in range(4):
            optimizer.zero_grad()
            loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        wrapped.eval()
        expected = logits(wrapped, ids)
        wrapped.save_adapter(str(tmp_path))
    finally:
        wrapped.unload()
    assert losses[-1] < losses[0] - 0.1, losses
    loaded = AdapterModel.from_pretrained(base, str(tmp_path))
    try:
        got = logits(loaded, ids)
    finally:
        loaded.unload()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
