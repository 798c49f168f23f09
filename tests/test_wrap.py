"""The model wrapper (pykernels.wrap): configs, targeting, the parameter report,
named adapters, merging, our adapter files, peft's files both ways on SmolLM2,
DDP (gloo, 2 CPU processes) against one process, and torch.compile."""
import dataclasses
import json
import os
from typing import ClassVar

import pytest
import torch
from torch import nn

import pykernels
from pykernels import AdapterModel, BottleneckConfig, IA3Config, LoRAConfig, QLoRAConfig, wrap
from pykernels.adapters import AdapterConfig, AdapterMethod, Replacement, read_adapter, registry
from pykernels.nn import LoRALinear, NF4Linear, QLoRALinear

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tokens(vocab=128, shape=(2, 9), seed=1):
    return torch.randint(vocab, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def peft_saved(base, peft_config, directory, ids, perturb):
    """Saves to ``directory`` an adapter peft builds over ``base`` from ``peft_config``,
    each of its parameters first passed to ``perturb(name, param, generator)`` (under
    no_grad) so the adapter matters; returns peft's logits. ``base`` is left bare."""
    from peft import get_peft_model
    peft_model = get_peft_model(base, peft_config)
    try:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                perturb(name, param, g)
        peft_model.save_pretrained(directory)
        return logits(peft_model.eval(), ids)
    finally:
        peft_model.unload()


def assert_matches_peft(got, expected, base_logits):
    assert (got - base_logits).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def randomize(wrapped, seed, name=None):
    """Nonzero B (and a new A), so an adapter changes the output and a test can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in wrapped.adapter_tensors(name).values():
            param.copy_(torch.randn(param.shape, generator=g) * 0.05)


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


# -- configs and targeting ------------------------------------------------------------


def test_config_json_round_trip():
    for config in (LoRAConfig(r=4, alpha=8, dropout=0.1, use_rslora=True, target_modules=["q_proj"]),
                   QLoRAConfig(target_modules=r".*\.mlp\..*", blocksize=128, double_quant=False,
                               compute_dtype="bfloat16", adapter_dtype="float32")):
        text = json.dumps(config.to_dict())
        assert AdapterConfig.from_dict(json.loads(text)) == config
    assert LoRAConfig(target_modules=("v_proj", "q_proj")).target_modules == ["q_proj", "v_proj"]


def test_config_bad_input():
    with pytest.raises(ValueError, match="unknown adapter method 'nope'"):
        AdapterConfig.from_dict({"method": "nope"})
    with pytest.raises(ValueError, match="unknown fields \\['rank'\\]"):
        AdapterConfig.from_dict({"method": "lora", "rank": 4})
    with pytest.raises(ValueError, match="compute_dtype"):
        QLoRAConfig(compute_dtype="int8")
    with pytest.raises(TypeError, match="target_modules"):
        LoRAConfig(target_modules=[1, 2])
    model = tiny_llama()
    with pytest.raises(TypeError, match="expected an AdapterConfig"):
        wrap(model, {"method": "lora"})
    with pytest.raises(ValueError, match="r must be >= 1"):
        wrap(model, LoRAConfig(r=0))
    assert count(model, LoRALinear) == 0  # a failed wrap leaves the model as it was


def test_targets_default_exact_and_regex():
    assert count(wrap(tiny_llama(), LoRAConfig()), LoRALinear) == 2 * 7
    exact = wrap(tiny_llama(), LoRAConfig(target_modules=["q_proj", "model.layers.1.mlp.up_proj"]))
    assert sorted(p for p, m in exact.named_modules() if isinstance(m, LoRALinear)) == [
        "base_model.model.layers.0.self_attn.q_proj", "base_model.model.layers.1.mlp.up_proj",
        "base_model.model.layers.1.self_attn.q_proj"]
    regex = wrap(tiny_llama(), LoRAConfig(target_modules=r"model\.layers\.0\.self_attn\.[qv]_proj"))
    assert count(regex, LoRALinear) == 2
    with pytest.raises(ValueError, match="matched no Linear module"):
        wrap(tiny_llama(), LoRAConfig(target_modules=["qproj"]))
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="target_modules is required"):
        wrap(mlp, LoRAConfig())
    assert count(wrap(mlp, LoRAConfig(target_modules=["0", "2"])), LoRALinear) == 2


def test_trainable_parameter_report(capsys):
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    wrapped = wrap(model, LoRAConfig(r=4, target_modules=ATTENTION))
    lora = sum(4 * (m.in_features + m.out_features) for m in wrapped.modules() if isinstance(m, LoRALinear))
    assert wrapped.trainable_parameters() == (lora, total + lora)
    assert all(("lora_" in n) == p.requires_grad for n, p in wrapped.named_parameters())
    wrapped.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {lora:,d} || all params: {total + lora:,d} || "
        f"trainable%: {100 * lora / (total + lora):.4f}")
    # QLoRA: an NF4 weight counts as its elements, so the total stays the same.
    q = wrap(tiny_llama(), QLoRAConfig(r=4, target_modules=ATTENTION))
    assert q.trainable_parameters() == (lora, total + lora)


# -- running, merging, named adapters -------------------------------------------------------


def test_lora_forward_train_and_merge():
    model, ids = tiny_llama(), tokens()
    base = logits(model, ids)
    wrapped = wrap(model, LoRAConfig(r=4, alpha=8))
    torch.testing.assert_close(logits(wrapped, ids), base, rtol=0, atol=0)  # B = 0: no change
    randomize(wrapped, 0)
    adapted = logits(wrapped, ids)
    assert (adapted - base).abs().max() > 1e-3
    generated = wrapped.generate(ids, max_new_tokens=4, do_sample=False)
    wrapped.train()
    wrapped(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = {n: p.grad for n, p in wrapped.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    wrapped.eval()
    merged = wrapped.merge_and_unload()
    assert count(merged, LoRALinear) == 0 and merged is model
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-4, atol=1e-5)
    assert torch.equal(merged.generate(ids, max_new_tokens=4, do_sample=False), generated)


def test_qlora_wrap_and_merge_into_dense():
    model, ids = tiny_llama(), tokens()
    wrapped = wrap(model, QLoRAConfig(r=4, blocksize=32))
    assert count(wrapped, QLoRALinear) == 14 and count(wrapped, NF4Linear) == 14
    assert [p for p, m in wrapped.named_modules()
            if isinstance(m, nn.Linear) and "lora_" not in p] == ["base_model.lm_head"]
    assert all(m.base_layer.blocksize == 32 for m in wrapped.modules() if isinstance(m, QLoRALinear))
    randomize(wrapped, 0)
    adapted = logits(wrapped, ids)
    merged = wrapped.merge_and_unload()
    assert count(merged, NF4Linear) == 0 and count(merged, nn.Linear) == 15
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-4, atol=1e-5)


def test_qlora_compute_and_adapter_dtype():
    wrapped = wrap(tiny_llama(), QLoRAConfig(r=4, compute_dtype="bfloat16", adapter_dtype="float32"))
    layer = wrapped.base_model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight_dtype == torch.bfloat16
    assert wrapped.base_model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert logits(wrapped, tokens()).dtype == torch.bfloat16


def test_named_adapters_add_switch_delete():
    model, ids = tiny_llama(), tokens()
    base = logits(model, ids)
    wrapped = wrap(model, LoRAConfig(r=4), adapter_name="a")
    randomize(wrapped, 0)
    a_params = list(wrapped.adapter_tensors().values())
    a = logits(wrapped, ids)
    wrapped.add_adapter("b", LoRAConfig(r=2, target_modules=["v_proj"]))
    assert wrapped.active_adapter == "a" and wrapped.adapters == ["a", "b"]
    torch.testing.assert_close(logits(wrapped, ids), a, rtol=0, atol=0)
    randomize(wrapped, 1, "b")
    wrapped.set_adapter("b")
    assert count(wrapped, LoRALinear) == 2
    assert all(not p.requires_grad for n, p in wrapped.named_parameters() if "lora_" not in n)
    b = logits(wrapped, ids)
    assert (b - a).abs().max() > 1e-3 and (b - base).abs().max() > 1e-3
    wrapped.set_adapter("a")  # the same Parameter objects come back (an optimizer keeps them)
    assert all(x is y for x, y in zip(wrapped.adapter_tensors().values(), a_params))
    torch.testing.assert_close(logits(wrapped, ids), a, rtol=0, atol=0)
    wrapped.train()  # reaches "b", which is not in the model now
    wrapped.set_adapter("b")
    assert all(m.training for m in wrapped.modules() if isinstance(m, LoRALinear))
    wrapped.eval()
    wrapped.delete_adapter("b")
    assert wrapped.active_adapter is None and count(wrapped, LoRALinear) == 0
    torch.testing.assert_close(logits(wrapped, ids), base, rtol=0, atol=0)
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        wrapped.set_adapter("b")
    with pytest.raises(ValueError, match="an adapter named 'a' exists"):
        wrapped.add_adapter("a", LoRAConfig())
    with pytest.raises(ValueError, match="matched no"):  # a failed add leaves the model as it was
        wrapped.add_adapter("c", LoRAConfig(target_modules=["nope"]))
    assert wrapped.adapters == ["a"] and count(wrapped, LoRALinear) == 0


def test_to_dtype_reaches_inactive_adapters():
    wrapped = wrap(tiny_llama(), LoRAConfig(r=2), adapter_name="a")
    wrapped.add_adapter("b", LoRAConfig(r=2))
    wrapped.to(torch.float64)
    wrapped.set_adapter("b")
    assert {p.dtype for p in wrapped.parameters()} == {torch.float64}
    assert logits(wrapped, tokens()).dtype == torch.float64


# -- files -------------------------------------------------------------------------------------


def test_hybrid_save_load_round_trip(tmp_path):
    ids = tokens()
    hybrid = [LoRAConfig(r=4, target_modules=ATTENTION), QLoRAConfig(r=2, target_modules=MLP)]
    wrapped = wrap(tiny_llama(), hybrid)
    randomize(wrapped, 0)
    expected = logits(wrapped, ids)
    wrapped.save_adapter(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter.json", "adapter.safetensors"]
    configs, tensors = read_adapter(str(tmp_path))
    assert configs == wrapped.adapter_configs["default"]
    assert set(tensors) == set(wrapped.adapter_tensors())
    loaded = AdapterModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    loaded.load_adapter(str(tmp_path), "copy")
    loaded.set_adapter("copy")
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="peft holds one method per adapter"):
        wrapped.save_adapter(str(tmp_path), format="peft")


def test_qlora_through_peft_format(tmp_path):
    """peft's file does not say the base was 4-bit: quantized=True reads it as QLoRA."""
    ids = tokens()
    wrapped = wrap(tiny_llama(), QLoRAConfig(r=4, blocksize=32, double_quant=False))
    randomize(wrapped, 0)
    wrapped.save_adapter(str(tmp_path), format="peft")
    loaded = AdapterModel.from_pretrained(tiny_llama(), str(tmp_path), quantized=True, blocksize=32,
                                          double_quant=False)
    assert loaded.adapter_configs["default"] == wrapped.adapter_configs["default"]
    torch.testing.assert_close(logits(loaded, ids), logits(wrapped, ids), rtol=0, atol=0)


def edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def test_load_bad_input(tmp_path):
    wrapped = wrap(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj"]))
    wrapped.save_adapter(str(tmp_path))
    ours = tmp_path / "adapter.json"
    edit_json(ours, lambda meta: meta["configs"][0].update(r=2))
    with pytest.raises(ValueError, match="lora_A.weight has shape \\(4, 64\\), the model expects \\(2, 64\\)"):
        AdapterModel.from_pretrained(tiny_llama(), str(tmp_path))
    edit_json(ours, lambda meta: meta["configs"][0].update(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="missing .*v_proj"):
        wrapped.load_adapter(str(tmp_path), "other")
    assert wrapped.adapters == ["default"]
    with pytest.raises(FileNotFoundError, match="neither adapter.json"):
        read_adapter(str(tmp_path / "nowhere"))
    wrapped.save_adapter(str(tmp_path / "peft"), format="peft")
    peft = tmp_path / "peft" / "adapter_config.json"
    edit_json(peft, lambda config: config.update(use_dora=True))  # refused, not misread
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        read_adapter(str(tmp_path / "peft"))
    edit_json(peft, lambda config: config.update(use_dora=False))
    os.remove(tmp_path / "peft" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin files are not read"):
        read_adapter(str(tmp_path / "peft"))


# -- the method registry: a method plugs in without touching the wrapper ---------------------


@dataclasses.dataclass
class OutputScaleConfig(AdapterConfig):
    method: ClassVar[str] = "test_output_scale"


class OutputScale(nn.Module):
    """A toy adapted layer (IA³-shaped): y = l ⊙ (W·x + b), l starting at 1."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.scale_l = nn.Parameter(torch.ones(base.out_features))

    def forward(self, x):
        return self.base_layer(x) * self.scale_l


class OutputScaleMethod(AdapterMethod):
    config_class = OutputScaleConfig
    can_merge = True

    def build(self, module, config):
        return OutputScale(module)

    @torch.no_grad()
    def merge(self, replacement):
        linear, scale = replacement.original, replacement.adapted.scale_l
        linear.weight.mul_(scale[:, None])
        if linear.bias is not None:
            linear.bias.mul_(scale)
        return linear


def test_registry_new_method_in_a_hybrid(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._METHODS, OutputScaleConfig.method, OutputScaleMethod())
    ids = tokens()
    hybrid = [OutputScaleConfig(target_modules=["k_proj", "v_proj"]), LoRAConfig(r=2, target_modules=ATTENTION)]
    wrapped = wrap(tiny_llama(), hybrid)
    assert count(wrapped, OutputScale) == 4 and count(wrapped, LoRALinear) == 4  # q and o only
    names = list(wrapped.adapter_tensors())
    assert len(names) == 4 + 8 and sum(n.endswith(".self_attn.v_proj.scale_l") for n in names) == 2
    randomize(wrapped, 0)
    expected = logits(wrapped, ids)
    wrapped.save_adapter(str(tmp_path))
    wrapped.add_adapter("scale_only", OutputScaleConfig(target_modules=["v_proj"]))
    with pytest.raises(NotImplementedError, match="no peft format"):
        wrapped.save_adapter(str(tmp_path / "peft"), "scale_only", format="peft")
    loaded = AdapterModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    merged = loaded.merge_and_unload()
    assert count(merged, OutputScale) == 0 and count(merged, LoRALinear) == 0
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-4, atol=1e-5)


@dataclasses.dataclass
class VirtualTokensConfig(AdapterConfig):
    method: ClassVar[str] = "test_virtual_tokens"
    num_virtual_tokens: int = 3


class VirtualTokens(nn.Module):
    """A toy prompt-tuning layer: passes the input embedding through and holds
    the virtual tokens' embeddings, which the method prepends."""

    def __init__(self, embedding, n):
        super().__init__()
        self.embedding = embedding
        self.prompt = nn.Parameter(torch.zeros(n, embedding.embedding_dim))

    def forward(self, ids):
        return self.embedding(ids)


class VirtualTokensMethod(AdapterMethod):
    config_class = VirtualTokensConfig

    def resolve(self, model, config):
        return config

    def attach(self, model, config, skip=()):
        embedding = model.get_input_embeddings()
        path = next(p for p, m in model.named_modules() if m is embedding)
        rep = Replacement(path, embedding, VirtualTokens(embedding, config.num_virtual_tokens))
        model.set_submodule(path, rep.adapted)
        return [rep]

    def prepare_inputs(self, replacements, config, args, kwargs):
        ids = kwargs.pop("input_ids")
        embeds = replacements[0].adapted(ids)
        prompt = replacements[0].adapted.prompt.expand(ids.shape[0], -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        if kwargs.get("labels") is not None:
            pad = kwargs["labels"].new_full(prompt.shape[:2], -100)
            kwargs["labels"] = torch.cat([pad, kwargs["labels"]], dim=1)
        return args, kwargs


def test_registry_input_rewriting_method_prompt_plus_lora(tmp_path, monkeypatch):
    """The prompt tuning + LoRA hybrid, with a toy prompt method: virtual tokens
    set to real tokens' embeddings reproduce the base model on the joined input."""
    monkeypatch.setitem(registry._METHODS, VirtualTokensConfig.method, VirtualTokensMethod())
    model, ids, prefix = tiny_llama(), tokens(), tokens(shape=(1, 3), seed=5)
    joined = logits(model, torch.cat([prefix.expand(2, -1), ids], dim=1))
    wrapped = wrap(model, [VirtualTokensConfig(), LoRAConfig(r=2, target_modules=["v_proj"])])
    with torch.no_grad():
        wrapped.adapter_tensors()["model.embed_tokens.prompt"].copy_(model.model.embed_tokens(prefix[0]))
    torch.testing.assert_close(logits(wrapped, ids)[:, 3:], joined[:, 3:], rtol=1e-5, atol=1e-5)
    randomize(wrapped, 0)
    wrapped.train()
    wrapped(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is not None for p in wrapped.adapter_tensors().values())
    wrapped.eval()
    expected = logits(wrapped, ids)
    wrapped.save_adapter(str(tmp_path))
    loaded = AdapterModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="test_virtual_tokens adapters cannot be merged"):
        loaded.merge_and_unload()


# -- peft's format on SmolLM2 (the real model, offline) -----------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M, shared: each test adapts it in place and unloads in the end
    (a deep copy costs seconds)."""
    from pykernels.models import load_model
    model, tokenizer = load_model("smollm2")
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is",
                    return_tensors="pt").input_ids
    return model, ids, logits(model, ids)


def test_peft_saved_lora_loads_here(smollm2, tmp_path):
    from peft import LoraConfig
    base, ids, base_logits = smollm2

    def perturb(name, param, g):
        if "lora_" in name:
            param.copy_(torch.randn(param.shape, generator=g) * 0.05)

    expected = peft_saved(base, LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                           target_modules=["q_proj", "v_proj", "down_proj"]),
                          str(tmp_path), ids, perturb)
    ours = AdapterModel.from_pretrained(base, str(tmp_path))
    try:
        config = ours.adapter_configs["default"][0]
        assert (type(config), config.r, config.alpha, config.use_rslora) == (LoRAConfig, 4, 8, True)
        assert sorted(config.target_modules) == ["down_proj", "q_proj", "v_proj"]
        got = logits(ours, ids)
    finally:
        ours.unload()
    assert_matches_peft(got, expected, base_logits)


def test_ours_saved_in_peft_format_loads_in_peft(smollm2, tmp_path):
    from peft import PeftModel
    base, ids, base_logits = smollm2
    wrapped = wrap(base, LoRAConfig(r=4, alpha=16))
    try:
        randomize(wrapped, 0)
        expected = logits(wrapped, ids)
        wrapped.save_adapter(str(tmp_path), format="peft")
    finally:
        wrapped.unload()
    peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    try:
        assert sum("lora_B" in n for n, _ in peft_model.named_parameters()) == 30 * 7
        got = logits(peft_model, ids)
    finally:
        peft_model.unload()
    assert (got - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# -- torch.distributed and torch.compile ------------------------------------------------------


class TinyLM(nn.Module):
    """A model small enough to spawn twice: embedding, one MLP block, a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.up_proj = nn.Linear(16, 24)
        self.down_proj = nn.Linear(24, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(h + self.down_proj(torch.relu(self.up_proj(h))))


DDP_STEPS, DDP_LR = 6, 0.5


def ddp_batch():
    return tokens(32, (8, 12), seed=3)


def train_tiny(module, ids):
    """SGD on next-token loss (mean over this process's rows); returns nothing."""
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=DDP_LR)
    for _ in range(DDP_STEPS):
        optimizer.zero_grad()
        out = module(ids[:, :-1])
        nn.functional.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()


def tiny_wrapped():
    torch.manual_seed(0)
    return wrap(TinyLM(), LoRAConfig(r=4, target_modules=["up_proj", "down_proj"]))


def ddp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        wrapped = tiny_wrapped()
        train_tiny(DistributedDataParallel(wrapped), ddp_batch().chunk(world)[rank])
        if rank == 0:
            save_file({k: v.detach() for k, v in wrapped.adapter_tensors().items()}, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_one(tmp_path):
    from safetensors.torch import load_file
    out_file = str(tmp_path / "ddp.safetensors")
    # fork: the workers start at once instead of importing torch again (~5 s each
    # on a busy machine); they run with one thread, so no OpenMP pool crosses the fork.
    torch.multiprocessing.start_processes(ddp_worker, args=(2, str(tmp_path / "init"), out_file),
                                          nprocs=2, start_method="fork")
    single = tiny_wrapped()
    before = {k: v.detach().clone() for k, v in single.adapter_tensors().items()}
    train_tiny(single, ddp_batch())
    ddp = load_file(out_file)
    assert set(ddp) == set(before) and len(before) == 4
    for key, value in single.adapter_tensors().items():
        assert (value - before[key]).abs().max() > 1e-3, key  # training moved it
        torch.testing.assert_close(ddp[key], value.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [LoRAConfig(r=4), QLoRAConfig(r=4), IA3Config(),
                                    IA3Config(quantize=True), BottleneckConfig(placement="houlsby")],
                         ids=["lora", "qlora", "ia3", "ia3_nf4", "bottleneck"])
def test_compile_fullgraph_forward_backward(config):
    """fullgraph=True fails on any graph break, ours or transformers'; one
    training step compiled against the same step in eager mode."""
    ids = tokens()
    runs = []
    for compiled in (False, True):
        wrapped = wrap(tiny_llama(layers=1), config).train()
        randomize(wrapped, 0)
        run = torch.compile(wrapped, backend="aot_eager", fullgraph=True) if compiled else wrapped
        loss = run(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in wrapped.adapter_tensors().values()]))
    (eager_loss, eager_grads), (loss, grads) = runs
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
def test_wrapped_llama_on_cuda_bf16():
    # LoRA only: the qlora_linear op has no CUDA implementation yet.
    ids = tokens().cuda()
    for config in (LoRAConfig(r=4), LoRAConfig(r=2, dropout=0.1, target_modules=MLP)):
        wrapped = wrap(tiny_llama().to(torch.bfloat16), config).cuda()
        randomize(wrapped, 0)
        wrapped.train()
        wrapped(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        assert all(p.grad is not None and p.grad.is_cuda for p in wrapped.adapter_tensors().values())
        wrapped.eval()
        adapted = logits(wrapped, ids)
        torch.testing.assert_close(logits(wrapped.merge_and_unload(), ids), adapted, rtol=2e-2, atol=2e-2)
