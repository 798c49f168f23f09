"""The wrapper's methods beyond LoRA (pykernels.wrap with IA3Config,
BottleneckConfig, PromptTuningConfig) and mixed batches over named LoRA
adapters: targeting, merging, our files, peft's files both ways and peft's
mixed-batch adapter_names on SmolLM2, the trainable-parameter report, and
each method in bf16 on a device (cuda with -m cuda). torch.compile(fullgraph=True)
of these methods: test_wrap.py's compile test, parametrized over them."""
import copy
import os

import pytest
import torch
from torch import nn

from pykernels import (AdapterModel, BottleneckConfig, IA3Config, LoRAConfig, PromptTuningConfig,
                       QLoRAConfig, wrap)
from pykernels.adapters import read_adapter
from pykernels.nn import (AdaptedModule, IA3Linear, LoRALinear, MultiBottleneckAdapter,
                          MultiLoRALinear, NF4Linear, prompt_tuning)

from test_wrap import (assert_matches_peft, count, edit_json, logits, peft_saved,
                       smollm2,  # noqa: F401 (smollm2: a fixture)
                       tiny_llama, tokens)


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
    from peft import IA3Config as PeftIA3Config
    base, ids, base_logits = smollm2

    def bump(name, param, g):
        if "ia3_l" in name:
            param.add_(torch.randn(param.shape, generator=g) * 0.3)

    expected = peft_saved(base, PeftIA3Config(task_type="CAUSAL_LM"), str(tmp_path), ids, bump)
    ours = AdapterModel.from_pretrained(base, str(tmp_path))
    try:
        config = ours.adapter_configs["default"][0]
        assert (type(config), sorted(config.feedforward_modules)) == (IA3Config, ["down_proj"])
        assert len(ia3_layers(ours)) == 30 * 3
        got = logits(ours, ids)
    finally:
        ours.unload()
    assert_matches_peft(got, expected, base_logits)


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
    hybrid = [BottleneckConfig(layers=[1], bottleneck_dim=4),  # attached last all the same
              LoRAConfig(r=2, target_modules=["down_proj"])]
    wrapped = wrap(model, hybrid, adapter_name="h")
    assert [c.method for c in wrapped.adapter_configs["h"]] == ["lora", "bottleneck"]
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
    from transformers import AutoTokenizer

    from pykernels.models import cache_dir
    base, ids, _ = smollm2
    tokenizer = os.path.join(cache_dir(), "smollm2-135m-instruct")
    hybrid = [PromptTuningConfig(num_virtual_tokens=4, init="text", init_text="Answer briefly:",
                                 tokenizer=tokenizer),
              LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])]
    wrapped = wrap(base, hybrid)
    try:
        text_ids = AutoTokenizer.from_pretrained(tokenizer)("Answer briefly:")["input_ids"]
        text_ids = (text_ids * 4)[:4]  # repeated or cropped to the 4 virtual tokens
        torch.testing.assert_close(wrapped.adapter_tensors()["prompt_embeddings"].detach(),
                                   base.get_input_embeddings().weight[text_ids], rtol=0, atol=0)
        optimizer = torch.optim.AdamW(wrapped.adapter_tensors().values(), lr=1e-2)
        wrapped.train()
        losses = []
        for _ in range(2):
            optimizer.zero_grad()
            loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        wrapped.eval()
        with torch.no_grad():
            out = wrapped(input_ids=ids, labels=ids, use_cache=False)
        losses.append(out.loss.item())
        wrapped.save_adapter(str(tmp_path))
    finally:
        wrapped.unload()
    assert losses[0] > losses[1] > losses[2], losses
    loaded = AdapterModel.from_pretrained(base, str(tmp_path))
    try:
        got = logits(loaded, ids)
    finally:
        loaded.unload()
    torch.testing.assert_close(got, out.logits, rtol=0, atol=0)


# -- mixed batches over named LoRA adapters (multi-LoRA) ---------------------------------------


@pytest.mark.parametrize("kind", [LoRAConfig, QLoRAConfig], ids=["lora", "qlora"])
def test_mixed_batch_equals_each_row_alone(kind):
    ids = tokens(shape=(4, 7))
    wrapped = wrap(tiny_llama(), kind(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    wrapped.add_adapter("b", kind(r=4, alpha=4, target_modules=["v_proj", "down_proj"]))
    for name in ("a", "b"):
        perturb(wrapped.adapter_tensors(name), ord(name))
    wrapped.set_adapter(None)  # QLoRA: the base is NF4 now, where an adapter quantized it
    base = logits(wrapped, ids)
    alone = {}
    for name in ("a", "b"):
        wrapped.set_adapter(name)
        alone[name] = logits(wrapped, ids)
    rows = ["a", "b", None, "b"]
    with wrapped.adapter_ids(rows):
        assert count(wrapped, MultiLoRALinear) == 2 * 3 and count(wrapped, LoRALinear) == 0
        mixed = logits(wrapped, ids)
        wrapped.train()
        wrapped(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        wrapped.eval()
    assert wrapped.adapter_row_names is None and count(wrapped, MultiLoRALinear) == 0
    for i, name in enumerate(rows):
        expected = base[i] if name is None else alone[name][i]
        torch.testing.assert_close(mixed[i], expected, rtol=1e-5, atol=1e-5)
    assert (alone["a"] - alone["b"]).abs().max() > 1e-3
    for name in ("a", "b"):  # both adapters trained through their own parameters
        assert all(p.grad is not None for p in wrapped.adapter_tensors(name).values())
    torch.testing.assert_close(logits(wrapped, ids), alone["b"], rtol=0, atol=0)  # b active again
    wrapped.set_adapter_ids(["a", "a", "b", "__base__"])
    wrapped.set_adapter("a")  # ends the mixed mode
    assert count(wrapped, MultiLoRALinear) == 0
    torch.testing.assert_close(logits(wrapped, ids), alone["a"], rtol=0, atol=0)


def test_mixed_batch_of_bottleneck_and_hybrid_adapters():
    """Bottleneck sites mix into a MultiBottleneckAdapter (over the adapters' own
    weights), LoRA inside a wrapped mlp into a MultiLoRALinear, in one batch."""
    ids = tokens(shape=(4, 7))
    adapters = {"a": [LoRAConfig(r=4, target_modules=["down_proj"]), BottleneckConfig()],
                "b": BottleneckConfig(bottleneck_dim=4, act="gelu"),
                "c": BottleneckConfig(placement="houlsby", layers=[0])}
    wrapped = wrap(tiny_llama(), adapters["a"], adapter_name="a")
    for name in ("b", "c"):
        wrapped.add_adapter(name, adapters[name])
    alone = {}
    for name in adapters:
        perturb(wrapped.adapter_tensors(name), ord(name))
        wrapped.set_adapter(name)
        alone[name] = logits(wrapped, ids)
    wrapped.set_adapter(None)
    alone[None] = logits(wrapped, ids)
    rows = ["c", None, "a", "b"]
    with wrapped.adapter_ids(rows):
        assert count(wrapped, MultiBottleneckAdapter) == 3 and count(wrapped, MultiLoRALinear) == 2
        mixed = logits(wrapped, ids)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-5)
    assert count(wrapped, AdaptedModule) == 0 and count(wrapped, MultiLoRALinear) == 0
    wrapped.add_adapter("p", BottleneckConfig(placement="parallel"))
    with pytest.raises(ValueError, match="serial and parallel adapters at one site"):
        wrapped.set_adapter_ids(["b", "p"])


def test_mixed_batch_bad_input():
    wrapped = wrap(tiny_llama(), LoRAConfig(r=4), adapter_name="a")
    wrapped.add_adapter("r2", LoRAConfig(r=2))
    wrapped.add_adapter("ia3", IA3Config())
    wrapped.add_adapter("q", QLoRAConfig(r=4, target_modules=["o_proj"]))
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        wrapped.set_adapter_ids(["a", "c"])
    with pytest.raises(ValueError, match="rank 2 differs from the layer's rank 4"):
        wrapped.set_adapter_ids(["a", "r2"])
    with pytest.raises(NotImplementedError, match="ia3 adapters cannot serve mixed batches"):
        wrapped.set_adapter_ids(["ia3", None])
    with pytest.raises(ValueError, match="adapt different base layers"):
        wrapped.set_adapter_ids(["a", "q"])
    assert count(wrapped, MultiLoRALinear) == 0 and count(wrapped, LoRALinear) == 14  # as it was


def test_mixed_batch_matches_peft_adapter_names(smollm2, tmp_path):
    from peft import LoraConfig, get_peft_model
    base, ids, plain = smollm2
    ids, plain = ids.expand(3, -1), plain.expand(3, -1, -1)  # one prompt, three adapters
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8,
                                                 target_modules=["q_proj", "v_proj"]),
                                adapter_name="t1")
    try:
        peft_model.add_adapter("t2", LoraConfig(r=4, lora_alpha=16,
                                                target_modules=["v_proj", "o_proj"]))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.05)
        peft_model.save_pretrained(str(tmp_path))  # t1 and t2 in sub-folders of those names
        rows = ["t2", "__base__", "t1"]
        with torch.no_grad():
            expected = peft_model.eval()(input_ids=ids, adapter_names=rows, use_cache=False).logits
    finally:
        peft_model.unload()
    ours = AdapterModel.from_pretrained(base, str(tmp_path / "t1"), adapter_name="t1")
    try:
        ours.load_adapter(str(tmp_path / "t2"), "t2")
        with ours.adapter_ids(rows):
            got = logits(ours, ids)
    finally:
        ours.unload()
    torch.testing.assert_close(got[1], plain[1], rtol=1e-4, atol=1e-4)
    assert (got[0] - plain[0]).abs().max() > 1e-2 and (got[2] - plain[2]).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# -- the trainable-parameter report, per method ---------------------------------------------------


def test_trainable_parameter_report_per_method():
    """IA³ and prompt tuning against peft's count on the same model; bottleneck
    adapters (peft has none) against their shapes."""
    import peft
    total = sum(p.numel() for p in tiny_llama().parameters())
    for ours, theirs in ((IA3Config(), peft.IA3Config(task_type="CAUSAL_LM")),
                         (PromptTuningConfig(num_virtual_tokens=5),
                          peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))):
        expected = peft.get_peft_model(tiny_llama(), theirs).get_nb_trainable_parameters()
        assert wrap(tiny_llama(), ours).trainable_parameters() == expected
    assert expected == (5 * 64, total + 5 * 64)
    d, m = 64, 64 // 8
    per_adapter = 2 * d * m + m + d
    houlsby = wrap(tiny_llama(), BottleneckConfig(placement="houlsby", reduction=8))
    assert houlsby.trainable_parameters() == (4 * per_adapter, total + 4 * per_adapter)


# -- on a GPU: each method in bf16 against the same adapters in fp32 on the CPU -------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("config", [IA3Config(), IA3Config(quantize=True),
                                    BottleneckConfig(placement="houlsby"),
                                    PromptTuningConfig(num_virtual_tokens=3), "mixed"],
                         ids=["ia3", "ia3_nf4", "bottleneck", "prompt", "mixed_lora"])
def test_methods_in_bf16_match_fp32(config, device):
    ids = tokens()
    mixed = config == "mixed"  # two LoRA adapters, one per row
    wrapped = wrap(tiny_llama(), LoRAConfig(r=4) if mixed else config, adapter_name="a")
    if mixed:
        wrapped.add_adapter("b", LoRAConfig(r=4, target_modules=["v_proj"]))
    for name in wrapped.adapters:
        perturb(wrapped.adapter_tensors(name), 0, 0.2)
    low = copy.deepcopy(wrapped).to(device=device, dtype=torch.bfloat16)
    for model in (wrapped, low):
        if mixed:
            model.set_adapter_ids(["a", "b"])
    expected = logits(wrapped, ids)
    got = logits(low, ids.to(device))
    assert got.dtype == torch.bfloat16 and got.device.type == device
    torch.testing.assert_close(got.float().cpu(), expected, rtol=5e-2, atol=5e-2)
    low.train()
    low(input_ids=ids.to(device), labels=ids.to(device), use_cache=False).loss.backward()
    grads = [p.grad for name in low.adapters for p in low.adapter_tensors(name).values()
             if p.grad is not None]
    assert grads and all(g.device.type == device and torch.isfinite(g).all() for g in grads)


def test_peft_files_refused_rather_than_misread(tmp_path):
    wrapped = wrap(tiny_llama(), IA3Config(), adapter_name="ia3")
    wrapped.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=2))
    for name in wrapped.adapters:
        wrapped.save_adapter(str(tmp_path / name), name, format="peft")
    edit_json(tmp_path / "ia3" / "adapter_config.json", lambda c: c.update(fan_in_fan_out=True))
    with pytest.raises(ValueError, match="fan_in_fan_out=True is not supported"):
        read_adapter(str(tmp_path / "ia3"))
    edit_json(tmp_path / "prompt" / "adapter_config.json", lambda c: c.update(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="task_type must be 'CAUSAL_LM', got 'SEQ_CLS'"):
        read_adapter(str(tmp_path / "prompt"))
