"""LoRA on CUDA, with the CPU ops as the oracle (tests/test_lora.py holds those to
the reference and to peft): forward and every gradient within the tolerance rule
of DESIGN §4 against the float64 truth, on the shapes the CPU tests use; bit for
bit with the CPU where the kernels share its arithmetic: the dropout mask (one
hash), xa = drop(x)·Aᵀ under dropout (the same 16 partial sums per output, added
in the same order), the merged and the unmerged weight (one fp32 sum per
element, rounded once). Also: the layer, float64 and gradcheck, determinism,
streams, opcheck and torch.compile, and devices that disagree."""
import pytest
import torch
from torch import nn
from torch.utils._triton import has_triton

from pykernels import ops, reference
from pykernels.nn import LoRALinear

from helpers import assert_each_within_rule
from test_lora import SHAPES, check_against_reference, forward_backward, make_inputs

pytestmark = pytest.mark.cuda  # conftest.py skips these without a CUDA device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_ops = torch.ops.pykernels


def cuda(*tensors):
    return tuple(None if t is None else t.cuda() for t in tensors)


# ---- against the reference, and the CPU's bits ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape", SHAPES + [((2048,), 256, 96, 16)])  # 2048 rows: many slabs in dA
def test_matches_reference_and_cpu(dtype, p, shape):
    check_against_reference(*shape, dtype, p, device="cuda")
    if p > 0:  # the fused x·Aᵀ: the CPU's bits
        x, w, b, a, bb = make_inputs(*shape, dtype)
        seed = torch.tensor(5)
        xa_cuda = _ops.lora_linear(*cuda(x, w, b, a, bb), 1.7, p, seed)[1]
        assert torch.equal(xa_cuda.cpu(), _ops.lora_linear(x, w, b, a, bb, 1.7, p, seed)[1])


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_x_without_grad_and_empty_batch(p):
    # dA and dB are sums over rows of products with bf16-rounded intermediates (xa,
    # dxa) whose last bit differs between cuBLAS and the CPU: held to the truth by the
    # rule, not to the CPU's values elementwise.
    check_against_reference((9,), 100, 50, 4, torch.bfloat16, p, x_grad=False, device="cuda")
    fn = lambda *t: ops.lora_linear(*t, 2.0, p, 3)
    x0, w0, _, a0, b0 = make_inputs((0,), 40, 30, 2, torch.float32)
    y, dx, da, db = forward_backward(fn, *cuda(x0, w0, None, a0, b0), torch.zeros(0, 30, device="cuda"))
    assert y.shape == (0, 30) and dx.shape == (0, 40)
    assert not da.any() and not db.any()


def test_leading_dims_and_non_contiguous_x():
    x, w, b, a, bb = cuda(*make_inputs((2, 3, 5), 72, 20, 4, torch.float32))
    y = ops.lora_linear(x, w, b, a, bb, 2.0, 0.2, 11)
    flat = ops.lora_linear(x.reshape(30, 72), w, b, a, bb, 2.0, 0.2, 11)
    assert torch.equal(y.reshape(30, 20), flat)  # the mask follows the flattened row
    xt = x.reshape(30, 72).t().contiguous().t()
    assert not xt.is_contiguous()
    assert torch.equal(ops.lora_linear(xt, w, b, a, bb, 2.0, 0.2, 11), flat)
    shifted = torch.empty(30 * 72 + 1, device="cuda")[1:].view(30, 72)  # not 16-byte aligned
    shifted.copy_(x.reshape(30, 72))
    assert torch.equal(ops.lora_linear(shifted, w, b, a, bb, 2.0, 0.2, 11), flat)


# ---- dropout: the CPU's mask ----

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 64), (300, 130), (3, 4097)])
def test_dropout_mask_is_the_cpus(p, rows, cols):
    """x = 1, W = 0, A = B = identity, scale 1: y and xa are the dropout multiplier
    and dx is multiplier·dy, all exactly, so they show the kernels' masks."""
    seed = torch.tensor(rows * 1000 + cols)
    eye = torch.eye(cols, device="cuda")
    x = torch.ones(rows, cols, device="cuda")
    y, xa = _ops.lora_linear(x, torch.zeros_like(eye), None, eye, eye, 1.0, p, seed)
    multiplier = ops.lora_dropout_mask((rows, cols), p, seed)
    assert torch.equal(xa.cpu(), multiplier) and torch.equal(y.cpu(), multiplier)
    dy = torch.randn(rows, cols, device="cuda")
    dx, _, _ = _ops.lora_linear_backward(dy, None, x, torch.zeros_like(eye), eye, eye, xa, 1.0, p,
                                          seed, True)
    assert torch.equal(dx.cpu(), multiplier * dy.cpu())


def test_same_seed_same_bits_other_seed_other_mask():
    x, w, b, a, bb = cuda(*make_inputs((300,), 64, 32, 4, torch.float32))
    dy = torch.randn(300, 32, device="cuda")
    run = lambda seed: forward_backward(lambda *t: ops.lora_linear(*t, 2.0, 0.5, seed), x, w, b, a, bb, dy)
    first, again, other = run(123), run(123), run(124)
    for u, v in zip(first, again):
        assert torch.equal(u, v)  # dA's slabs are added in a fixed order: deterministic
    assert not torch.equal(first[0], other[0])


# ---- merge ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(193, 577, 16), (64, 4096, 64), (5, 3, 1)])
def test_merge_and_unmerge_are_the_cpus(dtype, shape):
    n_out, n_in, r = shape
    _, w, _, a, bb = make_inputs((1,), n_in, n_out, r, dtype)
    merged = ops.lora_merge_(w.clone(), a, bb, 2.5)
    merged_cuda = ops.lora_merge_(w.cuda(), a.cuda(), bb.cuda(), 2.5)
    assert torch.equal(merged_cuda.cpu(), merged)
    assert torch.equal(ops.lora_merge_(merged_cuda, a.cuda(), bb.cuda(), -2.5).cpu(),
                       ops.lora_merge_(merged, a, bb, -2.5))


# ---- the layer ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_on_cuda_matches_the_cpu_layer(dtype):
    """The CPU layer's state on CUDA: the training forward and every gradient (the
    mask the seed drawn from torch's CPU generator gives), the eval forward and the
    merged one, each within the rule against the float64 truth on the CPU layer's
    weights. (Not against the CPU layer's bf16 values: xa, dxa and the base GEMM
    round differently there, and dA sums those differences over rows.)"""
    torch.manual_seed(0)
    cpu_layer = LoRALinear.from_linear(nn.Linear(96, 40, dtype=dtype), r=8, alpha=16, dropout=0.1)
    nn.init.normal_(cpu_layer.lora_B.weight, std=0.1)
    layer = LoRALinear.from_linear(nn.Linear(96, 40, dtype=dtype), r=8, alpha=16, dropout=0.1)
    layer.load_state_dict(cpu_layer.state_dict())
    layer.cuda()
    weights = [t.detach() for t in (cpu_layer.base_layer.weight, cpu_layer.base_layer.bias,
                                    cpu_layer.lora_A.weight, cpu_layer.lora_B.weight)]
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(3, 7, 96, generator=g).to(dtype), torch.randn(3, 7, 40, generator=g).to(dtype)
    torch.manual_seed(7)
    seed = torch.randint(2**63 - 1, (), dtype=torch.int64)  # the draw LoRALinear.forward makes

    def reference_with(mask):
        def run(dt, dev):
            m = None if mask is None else mask.to(dev)
            fn = lambda *t: reference.lora_linear(*t, layer.scaling, m)
            return forward_backward(fn, *(t.to(dev, dt) for t in (x, *weights, dy)))
        return run

    xin = x.cuda().requires_grad_()
    torch.manual_seed(7)  # the same seed, so the same mask
    y = layer(xin)
    y.backward(dy.cuda())
    got = (y.detach(), xin.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    train = reference_with(ops.lora_dropout_mask(x.shape, 0.1, seed))
    assert_each_within_rule(("y", "dx", "dA", "dB"), got, train, dtype, "cuda", f"layer {dtype}")
    with torch.no_grad():
        layer.eval()
        before = layer(x.cuda())
        layer.merge()
        merged = layer(x.cuda())
        layer.unmerge()
    forward_only = lambda dt, dev: reference_with(None)(dt, dev)[:1]
    for name, out in (("eval", before), ("merged", merged)):
        assert_each_within_rule(("y",), (out,), forward_only, dtype, "cuda", f"{name} layer {dtype}")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    if backend == "inductor" and not has_triton():
        pytest.skip("inductor on CUDA needs triton")
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(64, 48), r=8, dropout=0.1).cuda()
    nn.init.normal_(layer.lora_B.weight)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(2, 5, 64, device="cuda", requires_grad=True)
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


# ---- the op's contract ----

def test_gradcheck_float64():
    x, w, b, a, bb = cuda(*make_inputs((3, 2), 11, 7, 3, torch.float64))
    for p in (0.0, 0.4):
        fn = lambda x_, a_, b_: ops.lora_linear(x_, w, b, a_, b_, 0.9, p, 21)
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), a.requires_grad_(), bb.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck(dtype, p):
    x, w, b, a, bb = cuda(*make_inputs((2, 3), 40, 24, 4, dtype))
    seed = torch.tensor(9)
    torch.library.opcheck(_ops.lora_linear,
                          (x.requires_grad_(), w, b, a.requires_grad_(), bb.requires_grad_(), 1.5, p, seed))
    y, xa = _ops.lora_linear(x.detach(), w, b, a.detach(), bb.detach(), 1.5, p, seed)
    for grad_xa, need in ((None, True), (torch.randn_like(xa), False)):
        torch.library.opcheck(_ops.lora_linear_backward,
                              (torch.randn_like(y), grad_xa, x.detach(), w, a.detach(), bb.detach(), xa,
                               1.5, p, seed, need))
    torch.library.opcheck(_ops.lora_merge_, (w.clone(), a.detach(), bb.detach(), 0.5))


def test_runs_on_the_current_stream():
    x, w, b, a, bb = make_inputs((64,), 256, 128, 8, torch.bfloat16)
    want = _ops.lora_linear(*cuda(x, w, b, a, bb), 2.0, 0.3, torch.tensor(1))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _ops.lora_linear(*cuda(x, w, b, a, bb), 2.0, 0.3, torch.tensor(1))
    side.synchronize()
    for u, v in zip(got, want):
        assert torch.equal(u, v)


def test_rejects_mismatched_devices():
    x, w, b, a, bb = make_inputs((4,), 20, 10, 3, torch.float32)
    xc, wc, bc, ac, bbc = cuda(x, w, b, a, bb)
    seed = torch.tensor(0)
    cases = [
        ((xc, wc, bc, a, bbc), "x is on cuda:0 but lora_A is on cpu"),
        ((xc, wc, bc, ac, bb), "x is on cuda:0 but lora_B is on cpu"),
        ((xc, w, bc, ac, bbc), "x is on cuda:0 but weight is on cpu"),
        ((xc, wc, b, ac, bbc), "x is on cuda:0 but bias is on cpu"),
        ((x, wc, bc, ac, bbc), "x is on cpu but weight is on cuda:0"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            _ops.lora_linear(*args, 1.0, 0.1, seed)
    with pytest.raises(ValueError, match="seed must be one int64 on the CPU"):
        _ops.lora_linear(xc, wc, bc, ac, bbc, 1.0, 0.1, seed.cuda())
    y, xa = _ops.lora_linear(xc, wc, bc, ac, bbc, 1.0, 0.1, seed)
    with pytest.raises(ValueError, match="x is on cuda:0 but grad_out is on cpu"):
        _ops.lora_linear_backward(y.cpu(), None, xc, wc, ac, bbc, xa, 1.0, 0.1, seed, True)
    with pytest.raises(ValueError, match="x is on cuda:0 but xa is on cpu"):
        _ops.lora_linear_backward(y, None, xc, wc, ac, bbc, xa.cpu(), 1.0, 0.1, seed, True)
    with pytest.raises(ValueError, match="weight is on cuda:0 but lora_A is on cpu"):
        ops.lora_merge_(wc.clone(), a, bbc, 1.0)
