"""LoRA over a dense base on the CPU: against the plain-PyTorch reference (the
tolerance rule of DESIGN.md §4) and against peft, forward and every gradient;
dropout masks regenerated exactly; rsLoRA; fp32/fp16/bf16/float64; odd shapes
and leading dims; gradcheck, opcheck, torch.compile; merge/unmerge; state_dict;
CPU paths; bad input."""
import io
import math
import warnings

import pytest
import torch
from torch import nn

import pykernels
from pykernels import ops, reference
from pykernels.nn import LoRALinear

from helpers import assert_each_within_rule, assert_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims, in, out, r): odd sizes, batch dims or none, r = 1, 2, 3, 8, 64, 70 (rank tiles with
# a remainder), 300 rows (where the fp32 backward switches to its kernel) and 2048 rows (the
# kernel's two-level sum over rows).
SHAPES = [((2048,), 256, 96, 16), ((7,), 577, 193, 1), ((2, 5), 577, 193, 64), ((33,), 64, 32, 8), ((3,), 130, 70, 70),
          ((3, 100), 65, 33, 3), ((), 40, 24, 2)]


def make_inputs(lead, n_in, n_out, r, dtype, seed=0, bias=True):
    """x, W, b, A, B in dtype with B nonzero, so the adapter path matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
    b = torch.randn(n_out, generator=g) if bias else None
    a = torch.randn(r, n_in, generator=g) / math.sqrt(n_in)
    bb = torch.randn(n_out, r, generator=g) / math.sqrt(r)
    return tuple(None if t is None else t.to(dtype) for t in (x, w, b, a, bb))


def forward_backward(fn, x, w, b, a, bb, dy, x_grad=True):
    """(y, dx, dA, dB) of fn(x, W, b, A, B) for the upstream gradient dy."""
    x = x.detach().clone().requires_grad_(x_grad)
    a = a.detach().clone().requires_grad_()
    bb = bb.detach().clone().requires_grad_()
    y = fn(x, w, b, a, bb)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, bb.grad


def check_against_reference(lead, n_in, n_out, r, dtype, p, seed=5, scale=1.7, x_grad=True,
                            device="cpu", bias=True):
    """The op on ``device`` against reference.lora_linear by the tolerance rule, forward
    and every gradient (tests/test_lora_cuda.py runs it with device="cuda")."""
    x, w, b, a, bb = make_inputs(lead, n_in, n_out, r, dtype, bias=bias)
    dy = torch.randn(*lead, n_out, generator=torch.Generator().manual_seed(1)).to(dtype)
    mask = ops.lora_dropout_mask(x.shape, p, seed) if p > 0 else None
    on = lambda dt, dev: [None if t is None else t.to(dev, dt) for t in (x, w, b, a, bb, dy)]
    ours = forward_backward(lambda *t: ops.lora_linear(*t, scale, p, seed), *on(dtype, device), x_grad)

    def ref_in(dt, dev):
        m = None if mask is None else mask.to(dev)
        return forward_backward(lambda *t: reference.lora_linear(*t, scale, m), *on(dt, dev), x_grad)

    assert_each_within_rule(("y", "dx", "dA", "dB"), ours, ref_in, dtype, device,
                            f"{dtype} p={p} {lead}x{n_in}->{n_out} r{r}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(dtype, p, shape):
    check_against_reference(*shape, dtype, p)


# bf16 without dropout over many rows: past 128 rows the forward adds the adapter's
# term in a pass of its own, past 256 the row contractions take a transposed copy
# (csrc/torch/lora.cpp); odd row counts (301, 3 x 101), in / out not multiples of
# 64, r = 2, 3 and above 64.
MANY_ROW_SHAPES = [((301,), 578, 194, 6), ((3, 101), 130, 66, 70), ((129,), 64, 32, 2),
                   ((2, 150), 256, 96, 16), ((300,), 577, 193, 3)]


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("shape", MANY_ROW_SHAPES)
def test_bf16_many_rows(shape, x_grad):
    check_against_reference(*shape, torch.bfloat16, 0.0, x_grad=x_grad)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_x_without_grad(p):
    check_against_reference((9,), 100, 50, 4, torch.bfloat16, p, x_grad=False)


def test_float64():
    check_against_reference((4, 3), 33, 17, 5, torch.float64, 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_no_bias_and_empty_batch(dtype, p):
    check_against_reference((6,), 40, 30, 3, dtype, p, bias=False)
    x, w, _, a, bb = make_inputs((0,), 40, 30, 2, dtype)
    y, dx, da, db = forward_backward(lambda *t: ops.lora_linear(*t, 2.0, p, 3), x, w, None, a, bb,
                                     torch.zeros(0, 30, dtype=dtype))
    assert y.shape == (0, 30) and dx.shape == (0, 40)
    assert torch.equal(da, torch.zeros_like(da)) and torch.equal(db, torch.zeros_like(db))


def test_leading_dims_and_non_contiguous_x():
    x, w, b, a, bb = make_inputs((2, 3, 5), 70, 20, 4, torch.float32)
    y = ops.lora_linear(x, w, b, a, bb, 2.0, 0.2, 11)
    flat = ops.lora_linear(x.reshape(30, 70), w, b, a, bb, 2.0, 0.2, 11)
    assert torch.equal(y.reshape(30, 20), flat)  # the mask follows the flattened row
    xt = x.reshape(30, 70).t().contiguous().t()
    assert not xt.is_contiguous()
    assert torch.equal(ops.lora_linear(xt, w, b, a, bb, 2.0, 0.2, 11), flat)


# ---- dropout ----

def test_dropout_mask_is_deterministic_and_unbiased():
    m1 = ops.lora_dropout_mask((64, 1000), 0.3, 7)
    assert torch.equal(m1, ops.lora_dropout_mask((64, 1000), 0.3, 7))
    assert not torch.equal(m1, ops.lora_dropout_mask((64, 1000), 0.3, 8))
    scale = torch.tensor(1 / 0.7, dtype=torch.float32)
    assert set(m1.unique().tolist()) == {0.0, scale.item()}
    kept = (m1 > 0).double().mean().item()
    assert abs(kept - 0.7) < 5 * math.sqrt(0.21 / m1.numel())
    assert torch.equal(ops.lora_dropout_mask((5, 9), 0.0, 7), torch.ones(5, 9))


def test_dropout_same_seed_same_output_and_gradients():
    x, w, b, a, bb = make_inputs((16,), 64, 32, 4, torch.float32)
    dy = torch.randn(16, 32)
    run = lambda seed: forward_backward(lambda *t: ops.lora_linear(*t, 2.0, 0.5, seed), x, w, b, a, bb, dy)
    first, again, other = run(123), run(123), run(124)
    for u, v in zip(first, again):
        assert torch.equal(u, v)
    assert not torch.equal(first[0], other[0])


def test_dropout_matches_peft_in_distribution():
    """peft's nn.Dropout and our hash draw different masks; over many draws the
    outputs have the same mean (the p = 0 output: dropout is unbiased) and spread."""
    torch.manual_seed(0)
    ours, peft_layer, _ = peft_pair(32, 16, r=4, alpha=8, dtype=torch.float32, dropout=0.5)
    ours.train()
    peft_layer.train()
    x = torch.randn(8, 32)
    with torch.no_grad():
        ours_draws = torch.stack([ours(x) for _ in range(400)])
        peft_draws = torch.stack([peft_layer(x) for _ in range(400)])
        ours.eval()
        mean = ours(x)
    for draws in (ours_draws, peft_draws):
        sem = draws.std(0) / math.sqrt(draws.shape[0])
        assert ((draws.mean(0) - mean).abs() <= 5 * sem + 1e-6).float().mean() > 0.99
    ratio = (ours_draws.var(0).mean() / peft_draws.var(0).mean()).item()
    assert 0.85 < ratio < 1.15, ratio


# ---- peft as the oracle ----

class _Tiny(nn.Module):
    def __init__(self, n_in, n_out, bias=True):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out, bias=bias)

    def forward(self, x):
        return self.proj(x)


def peft_pair(n_in, n_out, r, alpha, dtype, use_rslora=False, dropout=0.0, bias=True):
    """(ours, peft's lora.Linear, peft model) holding the same W, b, A, B (B nonzero)."""
    peft = pytest.importorskip("peft")
    tiny = _Tiny(n_in, n_out, bias).to(dtype)
    ours = LoRALinear.from_linear(nn.Linear(n_in, n_out, bias=bias, dtype=dtype), r=r, alpha=alpha,
                                  dropout=dropout, use_rslora=use_rslora)
    with torch.no_grad():
        ours.base_layer.load_state_dict(tiny.proj.state_dict())
        ours.lora_B.weight.copy_(torch.randn(n_out, r) / math.sqrt(r))
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=dropout,
                             use_rslora=use_rslora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny, config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    assert layer.scaling["default"] == ours.scaling
    return ours, layer, model


def layer_grads(layer, lora_a, lora_b, x, dy):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, lora_a.grad, lora_b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft(dtype, use_rslora):
    torch.manual_seed(1)
    ours, theirs, _ = peft_pair(577, 193, r=16, alpha=32, dtype=dtype, use_rslora=use_rslora)
    assert ours.scaling == (32 / 4 if use_rslora else 32 / 16)
    x = torch.randn(3, 11, 577).to(dtype)
    dy = torch.randn(3, 11, 193).to(dtype)
    got = layer_grads(ours, ours.lora_A.weight, ours.lora_B.weight, x, dy)
    want = layer_grads(theirs, theirs.lora_A["default"].weight, theirs.lora_B["default"].weight, x, dy)
    # peft is the reference run in the dtype (in fp32 its products are MKL's, ours
    # partly our kernels': the sums run in another order); the truth is the same
    # layer in float64.
    ours64, theirs64, _ = peft_pair(577, 193, r=16, alpha=32, dtype=torch.float64, use_rslora=use_rslora)
    ours64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    truth = layer_grads(ours64, ours64.lora_A.weight, ours64.lora_B.weight, x.double(), dy.double())
    for name, u, v, t in zip(("y", "dx", "dA", "dB"), got, want, truth):
        assert_rule(u, v, t, f"{name} vs peft {dtype}")


def test_peft_checkpoint_round_trip():
    peft = pytest.importorskip("peft")
    ours, theirs, model = peft_pair(48, 24, r=4, alpha=8, dtype=torch.float32)
    adapter = {"base_model.model.proj." + k: v for k, v in ours.state_dict().items() if k.startswith("lora_")}
    assert set(adapter) == set(peft.get_peft_model_state_dict(model))
    with torch.no_grad():
        theirs.lora_B["default"].weight.zero_()
    peft.set_peft_model_state_dict(model, adapter)
    x = torch.randn(5, 48)
    torch.testing.assert_close(ours(x), model(x), rtol=1e-5, atol=1e-5)


# ---- the layer ----

def test_new_adapter_is_identity_and_peft_initialized():
    torch.manual_seed(0)
    linear = nn.Linear(300, 40)
    layer = LoRALinear.from_linear(linear, r=8, alpha=16)
    assert layer.base_layer is linear and not linear.weight.requires_grad
    assert torch.equal(layer.lora_B.weight, torch.zeros(40, 8))
    bound = 1 / math.sqrt(300)  # kaiming_uniform(a=√5) on fan_in 300
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound
    x = torch.randn(4, 300)
    assert torch.equal(layer(x), linear(x))
    assert layer.scaling == 2.0
    assert "r=8" in repr(layer) and "merged=False" in repr(layer)


def test_train_eval_and_fresh_seeds():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(64, 32), r=4, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(3)
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(50, 20), r=4)
    nn.init.normal_(layer.lora_B.weight)
    state = layer.state_dict()
    assert set(state) == {"base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = LoRALinear.from_linear(nn.Linear(50, 20), r=4)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(3, 50)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_matches_unmerged_and_unmerge_restores(dtype):
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(577, 193, dtype=dtype), r=16, alpha=32)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(9, 577).to(dtype)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged and "merged=True" in repr(layer)
        merged_weight = layer.base_layer.weight.detach().clone()
        merged = layer(x)
        layer.merge()  # merging twice changes nothing
        assert torch.equal(layer.base_layer.weight, merged_weight)
        # merged vs the float64 truth, against peft's unmerged order run in dtype
        truth = reference.lora_linear(*(t.double() for t in (x, original, layer.base_layer.bias,
                                                               layer.lora_A.weight, layer.lora_B.weight)),
                                      layer.scaling)
        lowp = reference.lora_linear(x, original, layer.base_layer.bias, layer.lora_A.weight,
                                     layer.lora_B.weight, layer.scaling)
        assert_rule(merged, lowp, truth, f"merged forward {dtype}")
        assert_rule(unmerged, lowp, truth, f"unmerged forward {dtype}")
        # the merged weight itself: one rounding of the fp32 sum
        want = reference.lora_merge(original, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
        ulp = ulp_of(want)
        assert ((merged_weight.double() - want.double()).abs() <= ulp).all()
        layer.unmerge()
    restored = layer.base_layer.weight
    assert (restored.double() - original.double()).abs().le(ulp_of(merged_weight)).all()


def ulp_of(t):
    """The spacing of t's dtype at |t| (elementwise, as float64)."""
    a = t.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def test_unmerge_restores_fp32_within_one_ulp_of_merged():
    """Exact restore is impossible (W = 1e-10 plus a delta of ~1 loses W); the bound
    is one ulp of the merged value. Reported: the largest error in those ulps."""
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    w[0, :8] = torch.tensor([1e-10, -1e-10, 1e-30, 3e-8, 1e6, -1e6, 0.0, 1.0])
    a = torch.randn(16, 512) * 0.3
    b = torch.randn(256, 16) * 0.3
    merged = ops.lora_merge_(w.clone(), a, b, 2.0)
    restored = ops.lora_merge_(merged.clone(), a, b, -2.0)
    in_ulps = (restored.double() - w.double()).abs() / ulp_of(merged)
    print(f"unmerge error: max {in_ulps.max().item():.3g} ulp of the merged value, "
          f"{(restored != w).float().mean().item():.2%} of elements not bit-exact")
    assert in_ulps.max() <= 1.0
    assert restored[0, 0] != w[0, 0]  # the tiny weight is lost, as floating point must


# ---- the op's contract ----

def test_gradcheck_float64():
    x, w, b, a, bb = make_inputs((3, 2), 11, 7, 3, torch.float64)
    for p in (0.0, 0.4):
        fn = lambda x_, a_, b_: ops.lora_linear(x_, w, b, a_, b_, 0.9, p, 21)
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), a.requires_grad_(), bb.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck(dtype, p):
    x, w, b, a, bb = make_inputs((2, 3), 40, 24, 4, dtype)
    seed = torch.tensor(9)
    torch.library.opcheck(torch.ops.pykernels.lora_linear,
                          (x.requires_grad_(), w, b, a.requires_grad_(), bb.requires_grad_(), 1.5, p, seed))
    y, xa = torch.ops.pykernels.lora_linear(x.detach(), w, b, a.detach(), bb.detach(), 1.5, p, seed)
    for grad_xa, need in ((None, True), (torch.randn_like(xa), False)):
        torch.library.opcheck(torch.ops.pykernels.lora_linear_backward,
                              (torch.randn_like(y), grad_xa, x.detach(), w, a.detach(), bb.detach(), xa,
                               1.5, p, seed, need))
    torch.library.opcheck(torch.ops.pykernels.lora_merge_, (w.clone(), a.detach(), bb.detach(), 0.5))
    torch.library.opcheck(torch.ops.pykernels.lora_dropout_mask, (seed, 5, 7, p))


def test_compile_fullgraph():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(64, 48), r=8, dropout=0.1)
    nn.init.normal_(layer.lora_B.weight)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 5, 64, requires_grad=True)
    layer.eval()
    torch.testing.assert_close(compiled(x), layer(x))
    layer.train()
    with torch._inductor.config.patch(fallback_random=True):  # draw seeds as eager does
        torch.manual_seed(4)
        y = compiled(x)
        y.sum().backward()
        grads = (x.grad.clone(), layer.lora_A.weight.grad.clone())
        x.grad = None
        layer.zero_grad()
    torch.manual_seed(4)
    eager = layer(x)
    torch.testing.assert_close(y, eager)
    eager.sum().backward()
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], layer.lora_A.weight.grad)


def test_every_cpu_path_gives_the_same_bits(cpu_path):
    x, w, b, a, bb = make_inputs((5, 7), 301, 77, 12, torch.bfloat16)
    dy = torch.randn(5, 7, 77).to(torch.bfloat16)
    results = []
    for path in pykernels._C.cpu_paths():
        cpu_path(path)
        results.append((path, forward_backward(lambda *t: ops.lora_linear(*t, 2.0, 0.3, 77), x, w, b, a, bb, dy),
                        ops.lora_merge_(w.clone(), a, bb, 2.0)))
    for path, grads, merged in results[1:]:
        for u, v in zip(grads, results[0][1]):
            assert torch.equal(u, v), path
        assert torch.equal(merged, results[0][2]), path


def test_bad_input_names_the_argument():
    x, w, b, a, bb = make_inputs((4,), 20, 10, 3, torch.float32)
    call = lambda **kw: ops.lora_linear(**{**dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb,
                                                   scale=1.0, dropout_p=0.1, seed=0), **kw})
    cases = [
        (dict(lora_A=torch.randn(3, 21)), ValueError, "lora_A must be [r, in_features]"),
        (dict(lora_B=torch.randn(10, 4)), ValueError, "lora_B must be [out_features, r] = [10, 3]"),
        (dict(lora_B=torch.randn(11, 3)), ValueError, "lora_B must be [out_features, r]"),
        (dict(x=torch.randn(4, 19)), ValueError, "x's last dimension (19) must equal weight's in_features (20)"),
        (dict(lora_A=a.double()), TypeError, "lora_A must have x's dtype"),
        (dict(weight=w.half()), TypeError, "weight must have x's dtype"),
        (dict(x=x.int()), TypeError, "x must be float32, float16, bfloat16 or float64"),
        (dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1)"),
        (dict(seed=torch.tensor(1.5)), ValueError, "seed must be one int64 on the CPU"),
        (dict(bias=torch.randn(11)), ValueError, "bias must be [out_features]"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            call(**kwargs)
    with pytest.raises(RuntimeError, match="frozen"):
        call(weight=w.clone().requires_grad_())
    with pytest.raises(ValueError, match="weight must be contiguous"):
        ops.lora_merge_(torch.randn(20, 10).t(), a, bb, 1.0)
    with pytest.raises(ValueError, match="lora_B must be"):
        ops.lora_merge_(w.clone(), a, bb.t().contiguous(), 1.0)
    with pytest.raises(ValueError, match="x is on meta but lora_A is on cpu"):
        torch.ops.pykernels.lora_linear(x.to("meta"), w.to("meta"), None, a, bb.to("meta"), 1.0, 0.0,
                                        torch.tensor(0))
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRALinear.from_linear(nn.Linear(4, 4), dropout=1.0)
