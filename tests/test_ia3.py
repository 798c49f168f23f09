"""IA³: the ops against pykernels.reference (the tolerance rule of DESIGN.md §5),
forward and every gradient; gradcheck, opcheck, torch.compile; the layer over
dense and NF4 bases against peft's IA³ on a tiny Llama (outputs and gradients);
merge/unmerge; bad input."""
import copy

import pytest
import torch
from torch import nn

import pykernels
from pykernels import ops, reference
from pykernels.nn import IA3Linear, NF4Linear

from helpers import assert_rule, check_gradient_subsets

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 7), (37, 129), (2, 5, 65)]  # odd, leading dims


def _scale_grads(v, l, bias, fn):
    v = v.detach().requires_grad_(True)
    l = l.detach().requires_grad_(True)
    b = None if bias is None else bias.detach().requires_grad_(True)
    out = fn(v, l, b)
    g = torch.randn_like(out, dtype=torch.float32).to(out.dtype)
    (out.float() * g.float()).sum().backward()
    return [out, v.grad, l.grad] + ([] if b is None else [b.grad])


def _ref_scale64(v, l, b):
    return reference.ia3_scale(v.double(), l.double(), None if b is None else b.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_scale_matches_reference(dtype, shape, with_bias):
    torch.manual_seed(0)
    v = torch.randn(shape).to(dtype)
    l = torch.rand(shape[-1]) + 0.5
    b = torch.randn(shape[-1]).to(dtype) if with_bias else None
    torch.manual_seed(1)
    ours = _scale_grads(v, l, b, lambda v, l, b: ops.ia3_scale(v, l, b))
    torch.manual_seed(1)
    lowp = _scale_grads(v, l, b, reference.ia3_scale)
    torch.manual_seed(1)
    truth = _scale_grads(v.double(), l.double(), None if b is None else b.double(), _ref_scale64)
    for name, u, r, t in zip(("out", "grad_v", "grad_l", "grad_bias"), ours, lowp, truth):
        assert u.dtype == r.dtype and u.shape == r.shape, name
        assert_rule(u, r, t, f"{name} {dtype}")


@pytest.mark.parametrize("with_bias", [False, True])
def test_scale_gradients_of_some_arguments(with_bias):
    v, l, b = torch.randn(5, 7, dtype=torch.float64), torch.rand(7, dtype=torch.float64), None
    if with_bias:
        b = torch.randn(7, dtype=torch.float64)
    check_gradient_subsets(lambda v, l, b: ops.ia3_scale(v, l, b), (v, l, b), ("v", "l", "b"),
                   ({"v"}, {"l"}, {"b"}, {"b", "l"}))


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_gradients_of_some_arguments(double_quant):
    base, x, l = _nf4_case(torch.float32, 3, double_quant)
    state = dict(absmax_scale=base.absmax_scale, absmax_code=base.absmax_code,
                 absmax_offset=base.absmax_offset)
    check_gradient_subsets(lambda x, l, b: ops.ia3_nf4_linear(x, base.packed, base.absmax, 48, l, 64, b,
                                                      **state),
                   (x, l, base.bias.detach()), ("x", "l", "b"), ({"x"}, {"l"}, {"b"}, {"x", "b"}))


def test_scale_fp32_bits_and_non_contiguous():
    v = torch.randn(64, 40).t()  # non-contiguous [40, 64]
    l = torch.rand(64)
    b = torch.randn(64)
    assert torch.equal(ops.ia3_scale(v, l, b), reference.ia3_scale(v, l, b))
    assert torch.equal(ops.ia3_scale(v[::2], l), reference.ia3_scale(v[::2], l))


def test_scale_empty():
    v = torch.randn(0, 8, requires_grad=True)
    l = torch.ones(8, requires_grad=True)
    out = ops.ia3_scale(v, l)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(l.grad, torch.zeros(8)) and v.grad.shape == (0, 8)
    assert ops.ia3_scale(torch.randn(3, 0), torch.ones(0)).shape == (3, 0)


def test_scale_grad_l_sums_many_rows_accurately():
    # 2^17 rows: the two-level sum keeps fp32 close to the float64 sum.
    v = torch.randn(1 << 17, 3)
    g = torch.randn(1 << 17, 3)
    _, dl = torch.ops.pykernels.ia3_scale_backward(g, v, None, torch.ones(3), False)
    truth = (g.double() * v.double()).sum(0)
    assert (dl.double() - truth).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_path_gives_the_same_bits(cpu_path, dtype):
    v = torch.randn(67, 301).to(dtype)  # 301 columns: every vector tail
    g = torch.randn(67, 301).to(dtype)
    l, b = torch.rand(301) + 0.5, torch.randn(301).to(dtype)
    base, x, lx = _nf4_case(dtype, 40, True)  # the tiled NF4 path scales decoded tiles
    results = []
    for path in pykernels._C.cpu_paths():
        cpu_path(path)
        results.append((path, ops.ia3_scale(v, l, b),
                        *torch.ops.pykernels.ia3_scale_backward(g, v, b, l, True),
                        ops.ia3_nf4_linear(x, base.packed, base.absmax, 48, lx, 64, None,
                                           base.absmax_scale, base.absmax_code,
                                           base.absmax_offset)))
    for path, *outs in results[1:]:
        for u, w in zip(outs, results[0][1:]):
            assert torch.equal(u, w), path


def test_scale_gradcheck_float64():
    v = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    l = torch.rand(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, l, b: ops.ia3_scale(v, l, b), (v, l, b))


def test_l_in_another_dtype_gets_its_grad_in_that_dtype():
    v = torch.randn(6, 10, dtype=torch.bfloat16, requires_grad=True)
    l = torch.rand(10, requires_grad=True)  # fp32 over bf16, as peft keeps it
    ops.ia3_scale(v, l).sum().backward()
    assert l.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16


def _nf4_case(dtype, tokens, double_quant, out=48, inp=70, with_bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(inp, out, bias=with_bias)
    base = NF4Linear.from_linear(lin, blocksize=64, double_quant=double_quant)
    x = torch.randn(tokens, inp).to(dtype)
    l = torch.rand(inp) + 0.5
    return base, x, l


def _nf4_grads(base, x, l, dtype, fn):
    x = x.detach().requires_grad_(True)
    l = l.detach().requires_grad_(True)
    out = fn(x, l)
    torch.manual_seed(2)
    g = torch.randn(out.shape).to(out.device, out.dtype)
    (out.float() * g.float()).sum().backward()
    return out, x.grad, l.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [3, 40])  # the fused few-token path and the tiled path
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_matches_reference(dtype, tokens, double_quant):
    base, x, l = _nf4_case(dtype, tokens, double_quant)
    w = base.dequantize(torch.float32)
    state = dict(blocksize=64, bias=None, absmax_scale=base.absmax_scale,
                 absmax_code=base.absmax_code, absmax_offset=base.absmax_offset)
    bias = base.bias.detach()
    ours = _nf4_grads(base, x, l, dtype, lambda x, l: ops.ia3_nf4_linear(
        x, base.packed, base.absmax, 48, l, **{**state, "bias": bias.to(dtype)}))
    lowp = _nf4_grads(base, x, l, dtype, lambda x, l: reference.ia3_linear(
        x, w.to(dtype), bias.to(dtype), l, True).to(dtype) if dtype == torch.float32 else
        nn.functional.linear((x * l).to(dtype), w.to(dtype), bias.to(dtype)))
    truth = _nf4_grads(base, x.double(), l.double(), torch.float64, lambda x, l: reference.ia3_linear(
        x, w.double(), bias.double(), l, True).double())
    for name, u, r, t in zip(("out", "grad_x", "grad_l"), ours, lowp, truth):
        assert u.dtype == r.dtype and u.shape == r.shape, name
        assert_rule(u, r, t, f"{name} {dtype} T={tokens}")


def test_opcheck():
    v = torch.randn(5, 9, requires_grad=True)
    l = torch.rand(9, requires_grad=True)
    b = torch.randn(9)
    torch.library.opcheck(torch.ops.pykernels.ia3_scale.default, (v, b, l))
    torch.library.opcheck(torch.ops.pykernels.ia3_scale.default, (v.to(torch.bfloat16), None, l))
    torch.library.opcheck(torch.ops.pykernels.ia3_scale_backward.default,
                          (torch.randn(5, 9), v.detach(), b, l.detach(), True))
    base, x, l = _nf4_case(torch.float32, 30, True)
    torch.library.opcheck(torch.ops.pykernels.ia3_nf4_linear.default,
                          (x.requires_grad_(), base.packed, base.absmax, 64, 48, None,
                           base.absmax_scale, base.absmax_code, base.absmax_offset,
                           l.requires_grad_()))


# ---- the layer ----

def _layer(kind, feedforward, dtype=torch.float32):
    torch.manual_seed(3)
    lin = nn.Linear(70, 48).to(dtype)
    base = NF4Linear.from_linear(lin) if kind == "nf4" else lin
    layer = IA3Linear.from_linear(base, feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    return layer


def _dense_weight(layer):
    base = layer.base_layer
    return base.dequantize(torch.float32) if layer.nf4 else base.weight.float()


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_layer_matches_reference_and_trains_only_l(kind, feedforward):
    layer = _layer(kind, feedforward)
    x = torch.randn(2, 20, 70, requires_grad=True)
    y = layer(x)
    ref = reference.ia3_linear(x, _dense_weight(layer), layer.base_layer.bias, layer.ia3_l,
                               feedforward)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    xr = x.detach().requires_grad_(True)
    lr = layer.ia3_l.detach().clone().requires_grad_(True)
    reference.ia3_linear(xr, _dense_weight(layer), layer.base_layer.bias.detach(), lr,
                         feedforward).square().sum().backward()
    torch.testing.assert_close(layer.ia3_l.grad, lr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["ia3_l"]


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_layer_compiles_fullgraph(kind, feedforward):
    layer = _layer(kind, feedforward)
    x = torch.randn(3, 11, 70)
    y = layer(x)
    y.square().sum().backward()
    grad = layer.ia3_l.grad.clone()
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True)
    y_compiled = compiled(x)
    y_compiled.square().sum().backward()
    torch.testing.assert_close(y_compiled, y)
    torch.testing.assert_close(layer.ia3_l.grad, grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_merge_unmerge(feedforward, dtype):
    layer = _layer("dense", feedforward, dtype)
    x = torch.randn(9, 70).to(dtype)
    w0, b0 = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
    y = layer(x)
    assert layer.merge() is None
    assert_rule(layer(x), y, reference.ia3_linear(x.double(), w0.double(), b0.double(),
                                                  layer.ia3_l.double(), feedforward), "merged")
    layer.unmerge()
    ulp = torch.finfo(dtype).eps
    assert ((layer.base_layer.weight.float() - w0.float()).abs() <= ulp * w0.float().abs()).all()
    assert ((layer.base_layer.bias.float() - b0.float()).abs() <= ulp * b0.float().abs()).all()


@pytest.mark.parametrize("feedforward", [False, True])
def test_nf4_merge_reports_error_and_unmerges_exactly(feedforward):
    layer = _layer("nf4", feedforward)
    x = torch.randn(9, 70)
    y = layer(x)
    state = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    err = layer.merge()
    # Requantizing adds about one NF4 rounding: ~8-12% relative RMS on Gaussian-like weights.
    assert 0.0 < err["rel_rms"] < 0.15 and err["max_abs"] > 0
    assert layer.merge_error == err
    merged = layer(x)
    rel = ((merged - y).norm() / y.norm()).item()
    assert rel < 0.2, rel
    layer.unmerge()
    for k, v in layer.base_layer.state_dict().items():
        if k == "bias":
            torch.testing.assert_close(v, state[k], rtol=2e-7, atol=0)
        else:
            assert torch.equal(v, state[k]), k
    torch.testing.assert_close(layer(x), y)


def test_state_dict_keys_are_peft_s():
    layer = _layer("dense", False)
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "ia3_l"}
    assert layer.ia3_l.shape == (48, 1) and layer.ia3_l.dtype == torch.float32
    assert _layer("dense", True).ia3_l.shape == (1, 70)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"l \(the IA³ vector\) must have shape \[9\]"):
        ops.ia3_scale(torch.randn(4, 9), torch.ones(8))
    with pytest.raises(TypeError, match="l .*must be a float tensor"):
        ops.ia3_scale(torch.randn(4, 9), torch.ones(9, dtype=torch.int64))
    with pytest.raises(TypeError, match="bias must be"):
        ops.ia3_scale(torch.randn(4, 9), torch.ones(9), torch.ones(9, dtype=torch.float64))
    with pytest.raises(TypeError, match="v must be float32"):
        ops.ia3_scale(torch.ones(4, 9, dtype=torch.int32), torch.ones(9))
    base, x, l = _nf4_case(torch.float32, 3, False)
    with pytest.raises(ValueError, match=r"l \(the IA³ vector\) must have shape \[70\]"):
        ops.ia3_nf4_linear(x, base.packed, base.absmax, 48, torch.ones(48))
    layer = _layer("dense", True)
    layer.ia3_l = nn.Parameter(torch.ones(70, 1))
    with pytest.raises(ValueError, match=r"ia3_l must have shape \[1, 70\]"):
        layer(torch.randn(2, 70))
    with pytest.raises(TypeError, match="nn.Linear or NF4Linear"):
        IA3Linear.from_linear(nn.Conv1d(3, 3, 1))


# ---- peft as the oracle: a tiny Llama with IA³ on k, v and down ----

TARGETS = ("k_proj", "v_proj", "down_proj")


def tiny_llama(dtype):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def with_our_ia3(base_model, peft_model, nf4=False):
    """A copy of base_model with IA3Linear on the targets, ia3_l copied from peft's."""
    ours = copy.deepcopy(base_model).requires_grad_(False)
    peft_modules = dict(peft_model.base_model.model.named_modules())
    for name, module in list(ours.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS:
                full = f"{name}.{child_name}" if name else child_name
                base = NF4Linear.from_linear(child) if nf4 else child
                layer = IA3Linear.from_linear(base, feedforward=child_name == "down_proj")
                layer.ia3_l.data.copy_(peft_modules[full].ia3_l["default"].data)
                setattr(module, child_name, layer)
    return ours


def peft_ia3(base_model):
    peft = pytest.importorskip("peft")
    config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=list(TARGETS),
                            feedforward_modules=["down_proj"])
    model = peft.get_peft_model(copy.deepcopy(base_model), config)
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "ia3_l" in name:
            p.data.uniform_(0.5, 1.5)  # not the identity, or the test could not fail
    return model


def _loss_and_grads(model, ids, names):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    loss = logits.float().square().mean()
    loss.backward()
    params = dict(model.named_parameters())
    return logits, [params[n].grad for n in names]


def _l_names(model, prefix=""):
    return sorted(n for n, p in model.named_parameters() if n.endswith("ia3_l") or
                  n.endswith("ia3_l.default"))


def test_matches_peft_on_tiny_llama():
    base = tiny_llama(torch.float32)
    theirs = peft_ia3(base)
    ours = with_our_ia3(base, theirs)
    ids = torch.randint(0, 101, (2, 13))
    their_names = _l_names(theirs)
    our_names = _l_names(ours)
    # peft's keys, less its wrapper prefix and adapter name, are ours: 1:1 checkpoints.
    assert [n.removeprefix("base_model.model.").removesuffix(".default") for n in their_names] \
        == our_names and len(our_names) == 6
    l1, g1 = _loss_and_grads(theirs, ids, their_names)
    l2, g2 = _loss_and_grads(ours, ids, our_names)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(our_names, g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    # merged equals unmerged
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, IA3Linear):
                m.merge()
        torch.testing.assert_close(ours(input_ids=ids).logits, l1, rtol=1e-4, atol=1e-4)


def test_matches_peft_bf16_and_over_nf4():
    base = tiny_llama(torch.float32)
    theirs = peft_ia3(base)
    ids = torch.randint(0, 101, (2, 13))
    names = _l_names(theirs)
    truth, truth_g = _loss_and_grads(copy.deepcopy(theirs).double(), ids, names)
    lowp, lowp_g = _loss_and_grads(copy.deepcopy(theirs).to(torch.bfloat16), ids, names)
    ours_model = with_our_ia3(base.to(torch.bfloat16), theirs)
    ours, ours_g = _loss_and_grads(ours_model, ids, _l_names(ours_model))
    assert_rule(ours, lowp, truth, "logits bf16")
    for a, r, t in zip(ours_g, lowp_g, truth_g):
        assert_rule(a, r, t, "grad ia3_l bf16")
    # NF4 base: peft over the same dequantized weights is the oracle.
    base32 = tiny_llama(torch.float32)
    theirs32 = peft_ia3(base32)
    ours_nf4 = with_our_ia3(base32, theirs32, nf4=True)
    deq = copy.deepcopy(theirs32)
    our_modules = dict(ours_nf4.named_modules())
    for name, m in deq.base_model.model.named_modules():
        if name.split(".")[-1] in TARGETS:
            m.base_layer.weight.data = our_modules[name].base_layer.dequantize(torch.float32)
    l1, g1 = _loss_and_grads(deq, ids, names)
    l2, g2 = _loss_and_grads(ours_nf4, ids, _l_names(ours_nf4))
    torch.testing.assert_close(l2, l1, rtol=1e-4, atol=1e-4)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
