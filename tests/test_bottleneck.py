"""Bottleneck adapters on the CPU: the op against the plain-PyTorch reference
(tolerance rule, DESIGN.md §5) and a plain nn.Module adapter on the same
weights, forward and every gradient; each activation; residual h or another
tensor; fp32/fp16/bf16/float64; odd shapes, leading dims, non-contiguous,
empty; gradcheck, opcheck, torch.compile; the CPU paths against each other;
every placement on a tiny Llama (dense and NF4 / QLoRA linears); bad input."""
import math

import pytest
import torch
from torch import nn

import pykernels
from pykernels import ops, reference
from pykernels.nn import (AdaptedModule, BottleneckAdapter, NF4Linear, QLoRALinear,
                          add_bottleneck_adapters, remove_bottleneck_adapters)

from helpers import assert_rule, check_gradient_subsets

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = ["relu", "gelu", "silu"]
# (leading dims, d, m): odd sizes; m = 4096 makes the forward's tiles (1 MiB of [rows, m])
# 64 rows in fp32, 128 in fp16/bf16, so 210 rows take several tiles and a short one.
SHAPES = [((200,), 96, 6), ((7,), 65, 1), ((2, 5), 33, 17), ((3, 40), 130, 8), ((), 40, 3),
          ((3, 70), 24, 4096)]


def make(lead, d, m, dtype, seed=0, device="cpu"):
    """h, residual, w_down, b_down, w_up, b_up in dtype; up nonzero so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    ts = (torch.randn(*lead, d, generator=g), torch.randn(*lead, d, generator=g),
          torch.randn(m, d, generator=g) / math.sqrt(d), torch.randn(m, generator=g) * 0.5,
          torch.randn(d, m, generator=g) / math.sqrt(m), torch.randn(d, generator=g) * 0.5)
    return tuple(t.to(device, dtype) for t in ts)


def run(fn, h, r, wd, bd, wu, bu, dy, separate_residual):
    """(out, dh, dr, dwd, dbd, dwu, dbu); dr is None with the residual h."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, r, wd, bd, wu, bu)]
    h, r, wd, bd, wu, bu = leaves
    out = fn(h, wd, bd, wu, bu, r if separate_residual else None)
    out.backward(dy)
    return (out.detach(), h.grad, r.grad if separate_residual else None, wd.grad, bd.grad, wu.grad,
            bu.grad)


def check(lead, d, m, dtype, act, separate_residual=True, scale=1.3, device="cpu"):
    ts = make(lead, d, m, dtype, device=device)
    dy = torch.randn(*lead, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ours = run(lambda h, *w: ops.bottleneck_adapter(h, *w[:4], act, scale, w[4]), *ts, dy,
               separate_residual)

    def ref(dt):
        return run(lambda h, *w: reference.bottleneck_adapter(h, *w[:4], act, scale, w[4]),
                   *(t.to(dt) for t in ts), dy.to(dt), separate_residual)

    truth, lowp = ref(torch.float64), ref(dtype)
    names = ("out", "dh", "dr", "dw_down", "db_down", "dw_up", "db_up")
    for name, got, lo, want in zip(names, ours, lowp, truth):
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype and got.shape == want.shape and got.device == want.device, name
        assert_rule(got, lo, want, f"{name} {dtype} {act} {lead}x{d} m{m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(dtype, act, shape):
    check(*shape, dtype, act)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [((2, 300), 4096, 256), ((7,), 65, 1)])
def test_cuda_matches_reference(dtype, act, shape):
    check(*shape, dtype, act, device="cuda")
    check(*shape, dtype, act, separate_residual=False, device="cuda")


@pytest.mark.cuda
def test_cuda_layer_matches_cpu_and_opcheck():
    torch.manual_seed(0)
    layer = BottleneckAdapter(64, bottleneck_dim=8, act="silu")
    nn.init.normal_(layer.up.weight)
    cuda_layer = BottleneckAdapter(64, bottleneck_dim=8, act="silu").cuda()
    cuda_layer.load_state_dict(layer.state_dict())
    h = torch.randn(5, 64)
    torch.testing.assert_close(cuda_layer(h.cuda()).cpu(), layer(h))
    h, r, wd, bd, wu, bu = make((3, 4), 40, 6, torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.pykernels.bottleneck_adapter,
                          (h, r, wd, bd, wu, bu, "gelu", 0.5, True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_is_h(dtype):
    check((50,), 70, 5, dtype, "gelu", separate_residual=False)


def test_float64():
    check((9,), 30, 4, torch.float64, "silu")


class PlainAdapter(nn.Module):
    """The adapter as users write it in plain PyTorch."""

    def __init__(self, d, m, act, scale):
        super().__init__()
        self.down, self.up = nn.Linear(d, m), nn.Linear(m, d)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}[act]
        self.scale = scale

    def forward(self, h):
        return h + self.scale * self.up(self.act(self.down(h)))


@pytest.mark.parametrize("act", ACTS)
def test_layer_matches_plain_module(act):
    torch.manual_seed(0)
    ours = BottleneckAdapter(48, reduction=8, act=act, scale=0.7)
    plain = PlainAdapter(48, 6, act, 0.7)
    nn.init.normal_(ours.up.weight)
    nn.init.normal_(ours.up.bias)
    plain.load_state_dict(ours.state_dict())
    h = torch.randn(3, 11, 48)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    y1, y2 = ours(h1), plain(h2)
    torch.testing.assert_close(y1, y2)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(h1.grad, h2.grad)
    for (n, p1), p2 in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=n)


def test_fresh_adapter_is_identity_and_init():
    a = BottleneckAdapter(64, reduction=16)
    assert a.bottleneck_dim == 4 and a.down.weight.shape == (4, 64) and a.up.weight.shape == (64, 4)
    assert torch.count_nonzero(a.up.weight) == 0 and torch.count_nonzero(a.up.bias) == 0
    assert 0 < a.down.weight.std() < 0.05
    h = torch.randn(5, 64)
    assert torch.equal(a(h), h)
    assert BottleneckAdapter(64, bottleneck_dim=10).bottleneck_dim == 10


def test_non_contiguous_and_empty():
    h, r, wd, bd, wu, bu = make((6,), 40, 5, torch.float32)
    ht = torch.randn(40, 6).t()  # non-contiguous [6, 40]
    wdt = wd.t().contiguous().t()  # non-contiguous view with w_down's values
    got = ops.bottleneck_adapter(ht, wdt, bd, wu, bu, "gelu", 0.5, r.t().contiguous().t())
    want = reference.bottleneck_adapter(ht, wd, bd, wu, bu, "gelu", 0.5, r)
    torch.testing.assert_close(got, want)
    e = torch.empty(0, 3, 40, requires_grad=True)
    wd.requires_grad_()
    out = ops.bottleneck_adapter(e, wd, bd, wu, bu)
    assert out.shape == (0, 3, 40)
    out.sum().backward()
    assert e.grad.shape == e.shape and torch.count_nonzero(wd.grad) == 0


def test_no_grad_saves_nothing():
    h, r, wd, bd, wu, bu = make((4,), 16, 3, torch.float32)
    out, pre = torch.ops.pykernels.bottleneck_adapter(h, h, wd, bd, wu, bu, "relu", 1.0, False)
    assert pre.numel() == 0
    out2, pre2 = torch.ops.pykernels.bottleneck_adapter(h, h, wd, bd, wu, bu, "relu", 1.0, True)
    assert torch.equal(out, out2)
    torch.testing.assert_close(pre2, h @ wd.t() + bd)


def test_gradcheck_float64():
    ts = [t.requires_grad_() for t in make((2, 3), 7, 3, torch.float64)]
    for act in ACTS:
        assert torch.autograd.gradcheck(
            lambda h, r, wd, bd, wu, bu: ops.bottleneck_adapter(h, wd, bd, wu, bu, act, 0.8, r), ts)
        assert torch.autograd.gradcheck(
            lambda h, r, wd, bd, wu, bu: ops.bottleneck_adapter(h, wd, bd, wu, bu, act, 0.8), ts)


@pytest.mark.parametrize("separate_residual", [False, True])
def test_gradients_of_some_arguments(separate_residual):
    # The absent residual shifts no other argument's gradient.
    h, r, wd, bd, wu, bu = make((3, 4), 24, 5, torch.float64)
    check_gradient_subsets(
        lambda h, r, wd, bd, wu, bu: ops.bottleneck_adapter(h, wd, bd, wu, bu, "gelu", 0.9, r),
        (h, r if separate_residual else None, wd, bd, wu, bu), ("h", "r", "wd", "bd", "wu", "bu"),
        ({"r"}, {"wu"}, {"h"}, {"bd", "bu"}, {"wd", "r"}))


def test_gradient_without_saved_pre_raises():
    h, r, wd, bd, wu, bu = make((4,), 16, 3, torch.float32)
    wd.requires_grad_()
    with pytest.raises(RuntimeError, match="save_pre=True"):
        torch.ops.pykernels.bottleneck_adapter(h, None, wd, bd, wu, bu, "relu", 1.0, False)
    with torch.no_grad():  # no gradient recorded: the pre-activation may be skipped
        torch.ops.pykernels.bottleneck_adapter(h, None, wd, bd, wu, bu, "relu", 1.0, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    h, r, wd, bd, wu, bu = make((2, 9), 20, 4, dtype)
    for t in (h, wd, bd, wu, bu):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.pykernels.bottleneck_adapter,
                          (h, r, wd, bd, wu, bu, "silu", 0.5, True))
    pre = (h @ wd.t() + bd).detach()
    torch.library.opcheck(torch.ops.pykernels.bottleneck_adapter_backward,
                          (torch.randn_like(h).to(dtype), h.detach(), pre, wd.detach(), wu.detach(),
                           "gelu", 0.5, True, False))
    torch.library.opcheck(torch.ops.pykernels.bottleneck_adapter,
                          (h, None, wd, bd, wu, bu, "relu", 0.5, True))


def test_compile_fullgraph():
    torch.manual_seed(0)
    layer = BottleneckAdapter(32, bottleneck_dim=5, act="gelu", scale=2.0)
    nn.init.normal_(layer.up.weight)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 32, requires_grad=True)
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    g = x.grad.clone()
    x.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(g, x.grad)


def test_every_cpu_path_gives_the_same_bits(cpu_path):
    for dtype in DTYPES:
        ts = [t.requires_grad_() for t in make((70,), 131, 9, dtype)]
        dy = torch.randn(70, 131).to(dtype)
        results = {}
        for path in pykernels._C.cpu_paths():
            cpu_path(path)
            for act in ACTS:
                out = ops.bottleneck_adapter(ts[0], *ts[2:], act, 0.9, ts[1])
                grads = torch.autograd.grad(out, ts, dy)
                results.setdefault(act, []).append((out, *grads))
        for act, per_path in results.items():
            for other in per_path[1:]:
                for a, b in zip(per_path[0], other):
                    assert torch.equal(a, b), (dtype, act)


# ---- placements on a tiny Llama ----

def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def quantize_linears(model, qlora):
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    new = (QLoRALinear.from_linear(child, r=2) if qlora
                           else NF4Linear.from_linear(child))
                    setattr(parent, name, new)


@pytest.mark.parametrize("base", ["dense", "nf4", "qlora"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_placement_on_tiny_llama(placement, base):
    model = tiny_llama()
    if base != "dense":
        quantize_linears(model, qlora=base == "qlora")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    model.requires_grad_(False)
    inserted = add_bottleneck_adapters(model, placement, bottleneck_dim=4, act="gelu",
                                       layers=[1] if placement == "parallel" else None)
    sites = {"houlsby": 4, "pfeiffer": 2, "parallel": 1}[placement]
    assert len(inserted) == sites
    assert all(isinstance(getattr(i.parent, i.name), AdaptedModule) for i in inserted)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # fresh adapters: the identity
    adapter_params = {id(p) for i in inserted for p in i.adapter.parameters()}
    opt = torch.optim.SGD([p for i in inserted for p in i.adapter.parameters()], lr=0.5)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        assert (p.grad is not None) == (id(p) in adapter_params)
    assert all(i.adapter.up.weight.grad.abs().sum() > 0 for i in inserted)
    opt.step()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before)
    remove_bottleneck_adapters(inserted)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_insertion_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="placement"):
        add_bottleneck_adapters(model, "sideways")
    with pytest.raises(ValueError, match="layer 5 out of range"):
        add_bottleneck_adapters(model, layers=[5])
    add_bottleneck_adapters(model, layers=[0])
    with pytest.raises(ValueError, match="already has an adapter"):
        add_bottleneck_adapters(model, layers=[0])
    with pytest.raises(ValueError, match="no decoder layer"):
        add_bottleneck_adapters(nn.Linear(3, 3))


# ---- bad input ----

def test_bad_input():
    h, r, wd, bd, wu, bu = make((4,), 16, 3, torch.float32)
    op = ops.bottleneck_adapter
    with pytest.raises(ValueError, match="act must be"):
        op(h, wd, bd, wu, bu, "tanh")
    with pytest.raises(ValueError, match="act must be"):
        BottleneckAdapter(16, act="tanh")
    with pytest.raises(ValueError, match=r"w_down must be \[bottleneck_dim, d\]"):
        op(h, wd[:, :15], bd, wu, bu)
    with pytest.raises(ValueError, match=r"w_up must be \[d, bottleneck_dim\] = \[16, 3\]"):
        op(h, wd, bd, wu[:, :2], bu)
    with pytest.raises(ValueError, match=r"b_down must be \[3\]"):
        op(h, wd, bd[:2], wu, bu)
    with pytest.raises(ValueError, match=r"b_up must be \[16\]"):
        op(h, wd, bd, wu, bu[:3])
    with pytest.raises(ValueError, match="residual must have h's shape"):
        op(h, wd, bd, wu, bu, residual=r[:2])
    with pytest.raises(TypeError, match="w_up must have h's dtype"):
        op(h, wd, bd, wu.half(), bu)
    with pytest.raises(TypeError, match="h must be float32"):
        op(h.int(), wd, bd, wu, bu)
