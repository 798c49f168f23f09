"""Multi-LoRA (many adapters, each batch row picking one) on the CPU: the op
against the plain-PyTorch loop over adapters (tolerance rule of DESIGN.md §4),
forward and every gradient, with dropout; ids with -1, all rows one adapter,
empty batch; float64 gradcheck; opcheck; the layer (dense and NF4 base, add /
delete / set_adapter, merge, torch.compile); peft's mixed-batch ``adapter_names``
on a tiny Llama as the oracle; task isolation under training; bad input."""
import copy
import math

import pytest
import torch
from torch import nn

from pykernels import ops, reference
from pykernels.nn import LoRALinear, MultiLoRALinear, adapter_ids, set_adapter_ids

from helpers import assert_each_within_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, tokens per row or None for x [rows, in], in, out, r, n_adapters, ids)
CASES = [
    (5, 3, 577, 193, 8, 3, [0, 2, -1, 2, 1]),      # mixed, a base-only row, odd sizes
    (6, None, 130, 70, 3, 4, [3, 3, 3, 3, 3, 3]),  # every row one adapter, x [rows, in]
    (4, 40, 65, 33, 16, 5, [1, -1, 4, 1]),         # adapters 0, 2, 3 absent (zero grads)
    (3, 2, 64, 32, 1, 2, [-1, -1, -1]),            # base only
    (0, 7, 40, 24, 2, 2, []),                      # empty batch
]


def make(rows, tokens, n_in, n_out, r, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (rows,) if tokens is None else (rows, tokens)
    x = torch.randn(*lead, n_in, generator=g)
    base = torch.randn(*lead, n_out, generator=g)
    a = torch.randn(n, r, n_in, generator=g) / math.sqrt(n_in)
    b = torch.randn(n, n_out, r, generator=g) / math.sqrt(r)
    scales = torch.rand(n, generator=g) + 0.5
    return [t.to(dtype) for t in (x, base, a, b)] + [scales]


def run(fn, x, base, a, b, dy):
    x, base, a, b = (t.detach().clone().requires_grad_() for t in (x, base, a, b))
    y = fn(x, base, a, b)
    y.backward(dy)
    # (the reference's graph leaves out what no row uses: its gradient is zero)
    grads = (torch.zeros_like(t) if t.grad is None else t.grad for t in (x, base, a, b))
    return (y.detach(), *grads)


def check_against_reference(case, p, dtype, device="cpu"):
    """The op on ``device`` against reference.multi_lora by the tolerance rule, forward
    and every gradient (tests/test_multi_lora_cuda.py runs it with device="cuda");
    returns the op's (y, dx, dbase, dA, dB)."""
    rows, tokens, n_in, n_out, r, n, id_list = case
    x, base, a, b, scales = make(rows, tokens, n_in, n_out, r, n, dtype)
    ids = torch.tensor(id_list, dtype=torch.int64)
    dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    seed = 11
    mask = ops.lora_dropout_mask(x.shape, p, seed) if p > 0 else None
    on = lambda dt, dev: [t.to(dev, dt) for t in (x, base, a, b, dy)]
    ours = run(lambda *t: ops.multi_lora(*t, scales.to(device), ids.to(device), p, seed),
               *on(dtype, device))

    def ref(dt, dev):
        m = None if mask is None else mask.to(dev)
        return run(lambda *t: reference.multi_lora(*t, scales, ids.to(dev), m), *on(dt, dev))

    assert_each_within_rule(("y", "dx", "dbase", "dA", "dB"), ours, ref, dtype, device,
                            f"{dtype} p={p} {case}")
    return ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, p, dtype):
    ours = check_against_reference(case, p, dtype)
    n, id_list = case[5], case[6]
    absent = [i for i in range(n) if i not in id_list]
    assert all(ours[3][i].abs().max() == 0 and ours[4][i].abs().max() == 0 for i in absent)


def test_noncontiguous_and_more_leading_dims():
    """x [rows, 2, 3, in] as a transposed view, base a slice: the same numbers as
    contiguous copies."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 2, 40, generator=g).transpose(1, 2)
    base = torch.randn(4, 2, 3, 50, generator=g)[..., :24]
    a, b = torch.randn(3, 5, 40, generator=g), torch.randn(3, 24, 5, generator=g)
    scales, ids = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([2, 0, -1, 2])
    assert not x.is_contiguous() and not base.is_contiguous()
    got = ops.multi_lora(x, base, a, b, scales, ids, 0.2, 7)
    want = ops.multi_lora(x.contiguous(), base.contiguous(), a, b, scales, ids, 0.2, 7)
    assert torch.equal(got, want)
    mask = ops.lora_dropout_mask(x.shape, 0.2, 7)
    torch.testing.assert_close(got, reference.multi_lora(x, base, a, b, scales, ids, mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_one_adapter_equals_lora_linear(p):
    """Every row on one adapter: the single-adapter op's numbers (its dropout mask too)."""
    x, base, a, b, scales = make(4, 9, 300, 50, 8, 2, torch.float32)
    w = torch.randn(50, 300) / 20
    ids = torch.ones(4, dtype=torch.int64)
    y = ops.multi_lora(x, x @ w.t(), a, b, scales, ids, p, 3)
    want = ops.lora_linear(x, w, None, a[1], b[1], float(scales[1]), p, 3)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_cpu_paths_agree(cpu_path):
    x, base, a, b, scales = make(6, 5, 300, 70, 5, 3, torch.bfloat16)
    ids = torch.tensor([2, 0, -1, 2, 1, 0])
    dy = torch.randn(base.shape).bfloat16()
    results = []
    for path in ("scalar", "avx2", "avx512"):
        if not cpu_path(path):
            continue
        results.append(run(lambda *t: ops.multi_lora(*t, scales, ids, 0.2, 4), x, base, a, b, dy))
    for other in results[1:]:
        for u, v in zip(results[0], other):
            assert torch.equal(u, v)


def test_gradcheck_float64():
    x, base, a, b, scales = make(3, 2, 6, 5, 2, 3, torch.float64)
    ids = torch.tensor([2, -1, 0])
    for p in (0.0, 0.4):
        torch.autograd.gradcheck(lambda *t: ops.multi_lora(*t, scales, ids, p, 9),
                                 tuple(t.requires_grad_() for t in (x, base, a, b)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    x, base, a, b, scales = make(3, 4, 33, 17, 4, 3, dtype)
    for t in (x, a, b):
        t.requires_grad_()
    ids = torch.tensor([1, -1, 1])
    torch.library.opcheck(torch.ops.pykernels.multi_lora.default,
                          (x, base, a, b, scales, ids, 0.2, torch.tensor(5)))
    xa = torch.zeros(3, 4, 4, dtype=dtype)
    torch.library.opcheck(torch.ops.pykernels.multi_lora_backward.default,
                          (base.detach(), x.detach(), a.detach(), b.detach(), scales, ids, xa,
                           0.2, torch.tensor(5), True))


# ---- the layer ----

def layer_with_adapters(n_in=48, n_out=40, r=4, names=("a", "b", "c"), dtype=torch.float32,
                        quantize=False, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(n_in, n_out, dtype=dtype)
    layer = MultiLoRALinear.from_linear(linear, quantize=quantize)
    for i, name in enumerate(names):
        layer.add_adapter(name, r=r, alpha=2 * r + i, use_rslora=i == 2)
        nn.init.normal_(layer.lora_B[name].weight, std=0.2)
    return layer


@pytest.mark.parametrize("quantize", [False, True])
def test_layer_rows_match_single_adapter_layers(quantize):
    """Each row equals the base plus that row's adapter alone (LoRALinear for a dense base)."""
    layer = layer_with_adapters(quantize=quantize)
    x = torch.randn(4, 3, 48)
    names = ["c", None, "a", "c"]
    with torch.no_grad():
        y = layer(x, adapter_ids=names)
        for i, name in enumerate(names):
            want = layer.base_layer(x[i])
            if name is not None:
                want = want + layer.scaling[name] * layer.lora_B[name](layer.lora_A[name](x[i]))
            torch.testing.assert_close(y[i], want, rtol=1e-5, atol=1e-5)
        if not quantize:
            single = LoRALinear(layer.base_layer, r=4)
            single.scaling = layer.scaling["c"]
            single.lora_A.weight.copy_(layer.lora_A["c"].weight)
            single.lora_B.weight.copy_(layer.lora_B["c"].weight)
            torch.testing.assert_close(y[0], single(x[0]), rtol=1e-5, atol=1e-5)


def test_ids_sources_in_order():
    layer = layer_with_adapters()
    model = nn.Sequential(layer)
    x = torch.randn(3, 48)
    with torch.no_grad():
        base = layer.base_layer(x)
        assert torch.equal(layer(x), base)  # nothing active: the base alone
        layer.set_adapter("b")
        by_active = layer(x)
        assert torch.equal(by_active, layer(x, adapter_ids=torch.tensor([1, 1, 1])))
        with adapter_ids(model, ["a", "__base__", "c"]):
            mixed = model(x)
            assert torch.equal(mixed, layer(x, adapter_ids=torch.tensor([0, -1, 2])))
        assert torch.equal(model(x), by_active)  # restored
        set_adapter_ids(model, torch.tensor([2, 2, 0]))
        assert torch.equal(model(x), layer(x, adapter_ids=["c", "c", "a"]))
        set_adapter_ids(model, None)
        assert torch.equal(model(x), by_active)


def test_serving_sees_weight_changes():
    """Serving runs on stacks the weights are views of: changes through .data, an
    optimizer, load_state_dict or .to() show at once."""
    layer = layer_with_adapters()
    x = torch.randn(3, 48)
    ids = ["c", "a", "b"]

    def expected(x):
        with torch.enable_grad():
            return layer(x, adapter_ids=ids).detach()  # the stacking (training) path

    with torch.no_grad():
        layer.lora_B["a"].weight.data.mul_(3)
        assert torch.equal(layer(x, adapter_ids=ids), expected(x))
        layer.load_state_dict({**layer.state_dict(), "lora_A.c.weight": torch.randn(4, 48)})
        assert torch.equal(layer(x, adapter_ids=ids), expected(x))
        layer.to(torch.float64)  # (float64 runs plain matmuls: B's layout may move an ulp)
        torch.testing.assert_close(layer(x.double(), adapter_ids=ids), expected(x.double()))


def test_delete_adapter_reindexes():
    layer = layer_with_adapters()
    x = torch.randn(2, 48)
    with torch.no_grad():
        want = layer(x, adapter_ids=["c", "a"])
        layer.delete_adapter("b")
        assert layer.adapter_names == ["a", "c"]
        assert torch.equal(layer(x, adapter_ids=torch.tensor([1, 0])), want)
    with pytest.raises(KeyError, match="no adapter 'b'"):
        layer.set_adapter("b")


@pytest.mark.parametrize("quantize", [False, True])
def test_merge_unmerge(quantize):
    layer = layer_with_adapters(quantize=quantize)
    x = torch.randn(3, 48)
    w0 = None if quantize else layer.base_layer.weight.clone()
    with torch.no_grad():
        want = layer(x, adapter_ids=["b"] * 3)
        layer.merge("b")
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x, adapter_ids=["b"] * 3), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="'b' is merged"):
            layer(x, adapter_ids=["a", "b", "b"])
        layer.unmerge()
        torch.testing.assert_close(layer(x, adapter_ids=["b"] * 3), want, rtol=1e-5, atol=1e-5)
    if not quantize:
        torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)


def test_compile_fullgraph():
    layer = layer_with_adapters()
    x = torch.randn(4, 2, 48)
    ids = torch.tensor([2, -1, 0, 2])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, adapter_ids=ids), layer(x, adapter_ids=ids))
    compiled(x, adapter_ids=ids).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad(set_to_none=True)
    layer(x, adapter_ids=ids).sum().backward()
    eager = [torch.zeros_like(p) if p.grad is None else p.grad
             for p in layer.parameters() if p.requires_grad]
    for g, e in zip(grads, eager):  # compiled: zeros for adapter b, eager: none
        torch.testing.assert_close(g, e)


def test_task_isolation():
    """Training adapter 0 on its rows, one AdamW (weight decay) over every adapter, leaves
    every other adapter's outputs bit-identical: they get no gradient at all."""
    layer = layer_with_adapters(dtype=torch.bfloat16, names=("t0", "t1", "t2"))
    for name in layer.adapter_names:
        layer.lora_dropout[name] = 0.1
    x = torch.randn(6, 5, 48).bfloat16()
    probe = torch.randn(4, 5, 48).bfloat16()
    probe_ids = torch.tensor([1, 2, -1, 2])
    layer.eval()
    with torch.no_grad():
        before = layer(probe, adapter_ids=probe_ids)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    layer.train()
    for _ in range(3):
        opt.zero_grad()
        layer(x, adapter_ids=torch.tensor([0, -1, 0, 0, -1, 0])).float().square().mean().backward()
        assert layer.lora_A["t1"].weight.grad is None and layer.lora_B["t2"].weight.grad is None
        opt.step()
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(probe, adapter_ids=probe_ids), before)
        assert not torch.equal(layer(probe, adapter_ids=torch.zeros(4, dtype=torch.int64)),
                               layer.base_layer(probe))


# ---- peft as the oracle: a mixed batch through a tiny Llama ----

def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def peft_to_ours(peft_model):
    """A copy of peft_model's base model with each peft LoRA Linear replaced by a
    MultiLoRALinear holding the same base and, per adapter, the same A, B and scaling."""
    from peft.tuners.lora import Linear as PeftLoraLinear
    model = copy.deepcopy(peft_model.get_base_model())
    for name, module in list(model.named_modules()):
        if not isinstance(module, PeftLoraLinear):
            continue
        ours = MultiLoRALinear(module.base_layer)
        for adapter in module.lora_A:
            ours.add_adapter(adapter, r=module.r[adapter], alpha=module.lora_alpha[adapter])
            ours.scaling[adapter] = module.scaling[adapter]
            ours.lora_A[adapter].weight.data.copy_(module.lora_A[adapter].weight)
            ours.lora_B[adapter].weight.data.copy_(module.lora_B[adapter].weight)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ours)
    return model


def test_matches_peft_mixed_batch():
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), adapter_name="t0")
    model.add_adapter("t1", peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                            init_lora_weights=False))
    model.add_adapter("t2", peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets,
                                            use_rslora=True, init_lora_weights=False))
    model.eval()
    ours = peft_to_ours(model)
    tokens = torch.randint(0, 97, (5, 7), generator=torch.Generator().manual_seed(2))
    row_names = ["t2", "__base__", "t0", "t1", "t2"]
    with torch.no_grad():
        want = model(input_ids=tokens, adapter_names=row_names).logits
        with adapter_ids(ours, row_names):
            got = ours(input_ids=tokens).logits
        base = ours(input_ids=tokens).logits  # no ids: the base model
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], base[0], atol=1e-3)  # the adapters matter
    torch.testing.assert_close(got[1], base[1], rtol=1e-5, atol=1e-5)


# ---- bad input ----

def test_bad_ids():
    x, base, a, b, scales = make(3, 2, 16, 8, 2, 4, torch.float32)
    with pytest.raises(ValueError, match=r"ids\[1\] = 4 is out of range.*\[0, 4\)"):
        ops.multi_lora(x, base, a, b, scales, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match=r"ids\[2\] = -2 is out of range"):
        ops.multi_lora(x, base, a, b, scales, torch.tensor([0, 1, -2]))
    with pytest.raises(ValueError, match=r"one adapter index per row of x \(x.size\(0\) = 3\)"):
        ops.multi_lora(x, base, a, b, scales, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="ids must be int64, got Int"):
        ops.multi_lora(x, base, a, b, scales, torch.tensor([0, 1, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="scales must"):
        ops.multi_lora(x, base, a, b, scales.double(), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"lora_B must be \[n_adapters, out_features, r\]"):
        ops.multi_lora(x, base, a, b[:, :, :1], scales, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="base must have shape"):
        ops.multi_lora(x, base[:, :1], a, b, scales, torch.tensor([0, 1, 1]))


def test_bad_layer_input():
    layer = layer_with_adapters()
    with pytest.raises(ValueError, match=r"add_adapter\('d'\): rank 8 differs from .* rank 4"):
        layer.add_adapter("d", r=8)
    with pytest.raises(TypeError, match=r"'d'\): dtype torch.float16 differs .* torch.float32"):
        layer.add_adapter("d", r=4, dtype=torch.float16)
    with pytest.raises(ValueError, match="exists already"):
        layer.add_adapter("a", r=4)
    with pytest.raises(KeyError, match="no adapter 'zz'"):
        layer(torch.randn(2, 48), adapter_ids=["a", "zz"])
    with pytest.raises(ValueError, match="2 adapter names for 3 rows"):
        layer(torch.randn(3, 48), adapter_ids=["a", "b"])
    with pytest.raises(TypeError, match="must be int64, got torch.int32"):
        layer(torch.randn(2, 48), adapter_ids=torch.tensor([0, 1], dtype=torch.int32))
    layer.lora_B["b"].half()
    for grad in (True, False):  # training and serving paths
        with torch.set_grad_enabled(grad), pytest.raises(TypeError,
                                                         match=r"lora_B\['b'\] is torch.float16"):
            layer(torch.randn(2, 48), adapter_ids=["a", "b"])
