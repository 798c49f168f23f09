"""NF4 linear on CUDA: y = x·Wᵀ + b and its input gradient with W stored as NF4.

Both paths, against the float64 truth by the tolerance rule of DESIGN §4 (the
dtype's own reference is torch's CUDA linear on the decoded W: cuBLAS's sums):
the fused kernels up to 16 tokens (1, 2, 3, 5, 8, 13 and 16 tokens touch every
template bound), the tiles + cuBLAS above (17, 64, 512; 16 and 17 are the two
sides of the handover), on shapes that take the vector paths (in % 32 == 0) and
the per-element ones (193 x 577), with plain and double-quantized absmax and
several blocksizes. Not against the CPU op's low-precision values: the two
devices sum (and, in the tiled path, round W) in other orders, so elementwise
tolerances on their difference are either loose or flaky. Also: double quant
decoded on the fly gives the bits of the decoded absmax, unaligned buffers, the
layer, autograd, gradcheck, opcheck, streams, devices that disagree and a
weight past 2^31 elements."""
import pytest
import torch
import torch.nn.functional as F

from pykernels import NF4Tensor, ops, reference
from pykernels.nn import NF4Linear

from helpers import assert_each_within_rule
from test_nf4_linear import grad_input, inputs, linear, make_weight

pytestmark = pytest.mark.cuda  # conftest.py skips these without a CUDA device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOKENS = [1, 2, 3, 5, 8, 13, 16, 17, 64, 512]
SHAPES = [(193, 577), (256, 512), (64, 4096)]  # [out, in]


def cuda_weight(shape, double_quant, blocksize=64):
    nf4, bias = make_weight(*shape, double_quant, blocksize)
    return nf4, nf4.to("cuda"), bias


def linear_reference(x, nf4, bias=None, dy=None):
    """reference(dtype, device) for assert_each_within_rule: (y,) = F.linear(x, W, bias)
    with W the CPU NF4Tensor ``nf4`` decoded to its fp32 values (the spec's), cast
    to the dtype; given the upstream gradient dy, also the gradients of x and bias."""
    w32 = reference.nf4_weight(nf4)

    def run(dt, dev):
        xr = x.detach().to(dev, dt).requires_grad_(dy is not None)  # never x itself
        br = None if bias is None else bias.detach().to(dev, dt).requires_grad_(dy is not None)
        y = F.linear(xr, w32.to(dev, dt), br)
        if dy is None:
            return (y,)
        y.backward(dy.to(dev, dt))
        return y.detach(), xr.grad, None if br is None else br.grad
    return run


def grad_input_reference(dy, nf4):
    """reference(dtype, device) for nf4_linear_grad_input: (dy·W,)."""
    w32 = reference.nf4_weight(nf4)
    return lambda dt, dev: (dy.to(dev, dt) @ w32.to(dev, dt),)


# ---- the spec ----

@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference(dtype, tokens, shape, double_quant):
    nf4, nf4_cuda, bias = cuda_weight(shape, double_quant)
    x, b = inputs(tokens, shape[1], dtype), bias.to(dtype)
    y = linear(x.cuda(), nf4_cuda, b.cuda())
    assert_each_within_rule(("y",), (y,), linear_reference(x, nf4, b), dtype, "cuda",
                            f"{dtype} T={tokens} {shape} dq={double_quant}")


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input_matches_reference(dtype, tokens, shape, double_quant):
    nf4, nf4_cuda, _ = cuda_weight(shape, double_quant)
    dy = inputs(tokens, shape[0], dtype, seed=2)
    dx = grad_input(dy.cuda(), nf4_cuda)
    assert_each_within_rule(("dx",), (dx,), grad_input_reference(dy, nf4), dtype, "cuda",
                            f"{dtype} T={tokens} {shape} dq={double_quant}")


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
@pytest.mark.parametrize("tokens", [2, 40])
def test_other_blocksizes(blocksize, tokens):
    nf4, nf4_cuda, bias = cuda_weight((37, 100), True, blocksize)
    x, dy = inputs(tokens, 100, torch.float32), inputs(tokens, 37, torch.float32, seed=3)
    torch.testing.assert_close(linear(x.cuda(), nf4_cuda, bias.cuda()).cpu(),
                               reference.nf4_linear(x, nf4, bias))
    torch.testing.assert_close(grad_input(dy.cuda(), nf4_cuda).cpu(),
                               reference.nf4_linear_grad_input(dy, nf4))


@pytest.mark.parametrize("tokens", [3, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_equals_its_decoded_absmax(dtype, tokens):
    """Decoding the double-quantized absmax on the fly gives the bits of passing it decoded."""
    for shape in ((193, 577), (256, 512)):
        nf4, nf4_cuda, bias = cuda_weight(shape, True)
        plain = NF4Tensor(nf4.packed, nf4.block_absmax(), nf4.shape, nf4.dtype, nf4.blocksize).to("cuda")
        x, dy = inputs(tokens, shape[1], dtype).cuda(), inputs(tokens, shape[0], dtype, seed=4).cuda()
        b = bias.to(dtype).cuda()
        assert torch.equal(linear(x, nf4_cuda, b), linear(x, plain, b))
        assert torch.equal(grad_input(dy, nf4_cuda), grad_input(dy, plain))


@pytest.mark.parametrize("tokens", [5, 40])
def test_leading_batch_dims_and_non_contiguous_input(tokens):
    _, nf4, bias = cuda_weight((65, 130), True)
    b = bias.bfloat16().cuda()
    x = inputs(tokens, 130, torch.bfloat16, batch=(2, 3)).cuda()
    y = linear(x, nf4, b)
    assert y.shape == (2, 3, tokens, 65)
    assert torch.equal(y, linear(x.reshape(-1, 130), nf4, b).reshape(y.shape))
    x_t = inputs(130, tokens, torch.bfloat16).cuda().t()  # [tokens, 130], not contiguous
    assert torch.equal(linear(x_t, nf4), linear(x_t.contiguous(), nf4))
    dy = inputs(tokens, 65, torch.bfloat16, batch=(2, 3)).cuda()
    dx = grad_input(dy, nf4)
    assert dx.shape == (2, 3, tokens, 130)
    assert torch.equal(dx, grad_input(dy.reshape(-1, 65), nf4).reshape(dx.shape))


@pytest.mark.parametrize("tokens", [1, 16, 40])
def test_unaligned_buffers_take_the_element_paths(tokens):
    """Codes and x one element off a 16-byte boundary: the kernels drop their
    vector loads and sum in another order; the values stay within fp32 rounding."""
    _, nf4, bias = cuda_weight((64, 512), False)
    packed = torch.empty(nf4.packed.numel() + 1, dtype=torch.uint8, device="cuda")[1:]
    packed.copy_(nf4.packed)
    shifted = NF4Tensor(packed, nf4.absmax, nf4.shape, nf4.dtype, nf4.blocksize)
    x = torch.empty(tokens * 512 + 1, device="cuda")[1:].view(tokens, 512)
    x.copy_(inputs(tokens, 512, torch.float32).cuda())
    dy = inputs(tokens, 64, torch.float32, seed=5).cuda()
    torch.testing.assert_close(linear(x, shifted, bias.cuda()), linear(x.clone(), nf4, bias.cuda()))
    torch.testing.assert_close(grad_input(dy, shifted), grad_input(dy, nf4))


def test_empty_and_tiny():
    _, nf4, bias = cuda_weight((5, 7), False)
    assert linear(torch.empty(0, 7, device="cuda"), nf4, bias.cuda()).shape == (0, 5)
    assert grad_input(torch.empty(2, 0, 5, device="cuda"), nf4).shape == (2, 0, 7)
    one, one_cuda, b1 = cuda_weight((1, 1), True)
    x = torch.tensor([[2.0]])
    torch.testing.assert_close(linear(x.cuda(), one_cuda, b1.cuda()).cpu(), reference.nf4_linear(x, one, b1))


# ---- autograd and the op's contract ----

@pytest.mark.parametrize("tokens", [3, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_reference_autograd(dtype, tokens):
    nf4, nf4_cuda, bias = cuda_weight((193, 577), True)
    x, b, g = inputs(tokens, 577, dtype), bias.to(dtype), inputs(tokens, 193, dtype, seed=6)
    xc, bc = x.cuda().requires_grad_(), b.cuda().requires_grad_()
    y = linear(xc, nf4_cuda, bc)
    y.backward(g.cuda())
    assert_each_within_rule(("y", "grad x", "grad bias"), (y.detach(), xc.grad, bc.grad),
                            linear_reference(x, nf4, b, g), dtype, "cuda", f"{dtype} T={tokens}")


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
@pytest.mark.parametrize("tokens", [3, 17])
def test_gradcheck(tokens):
    _, nf4, bias = cuda_weight((5, 70), True, blocksize=32)
    x = inputs(tokens, 70, torch.float32).cuda().requires_grad_()
    b = bias.cuda().requires_grad_()

    def f(x, b):
        return linear(x, nf4, b)

    assert torch.autograd.gradcheck(f, (x, b), eps=1e-2, atol=1e-3, rtol=1e-3)
    assert torch.autograd.gradgradcheck(f, (x, b), eps=1e-2, atol=1e-3, rtol=1e-3)


def test_opcheck_every_op():
    for double_quant in (False, True):
        _, nf4, bias = cuda_weight((33, 70), double_quant)
        state = (nf4.packed, nf4.absmax, 64)
        quant = (nf4.absmax_scale, nf4.absmax_code, nf4.absmax_offset)
        for tokens in (3, 40):
            x = inputs(tokens, 70, torch.float32, batch=(2,)).cuda().requires_grad_()
            dy = inputs(tokens, 33, torch.bfloat16).cuda()
            b = bias.cuda().requires_grad_()
            torch.library.opcheck(torch.ops.pykernels.nf4_linear, (x, *state, 33, b, *quant))
            torch.library.opcheck(torch.ops.pykernels.nf4_linear, (x.bfloat16(), *state, 33, None, *quant))
            torch.library.opcheck(torch.ops.pykernels.nf4_linear_grad_input, (dy, *state, 70, *quant))


@pytest.mark.parametrize("tokens", [3, 40])
def test_layer_on_cuda_matches_the_cpu_layer(tokens):
    """The layer built from the same dense one, on CUDA: y and the gradients of x and
    the bias within the rule against the float64 truth on the CPU layer's NF4 weight.
    (Not against the CPU layer's bf16 values: with 40 tokens cuBLAS's y differs from
    the CPU's in last bits, and d bias sums such differences over the tokens.)"""
    dense = torch.nn.Linear(577, 193).bfloat16()
    layer = NF4Linear.from_linear(dense, double_quant=True)
    layer_cuda = NF4Linear.from_linear(dense, double_quant=True).cuda()
    x, dy = inputs(tokens, 577, torch.bfloat16), inputs(tokens, 193, torch.bfloat16, seed=2)
    xin = x.cuda().requires_grad_()
    y = layer_cuda(xin)
    y.backward(dy.cuda())
    spec = linear_reference(x, layer.nf4_weight(), dense.bias.detach(), dy)
    assert_each_within_rule(("y", "dx", "d bias"), (y.detach(), xin.grad, layer_cuda.bias.grad), spec,
                            torch.bfloat16, "cuda", f"layer T={tokens}")


def test_runs_on_the_current_stream():
    _, nf4, bias = cuda_weight((256, 512), True)
    x = inputs(3, 512, torch.bfloat16).cuda()
    want = linear(x, nf4, bias.bfloat16().cuda())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = linear(x, nf4, bias.bfloat16().cuda())
        dx = grad_input(got, nf4)
    side.synchronize()
    assert torch.equal(got, want)
    assert torch.equal(dx, grad_input(want, nf4))


def test_rejects_mismatched_devices():
    nf4, nf4_cuda, bias = cuda_weight((33, 70), True)
    x = inputs(3, 70, torch.float32)
    with pytest.raises(ValueError, match="x is on cuda:0 but packed is on cpu"):
        linear(x.cuda(), nf4)
    with pytest.raises(ValueError, match="x is on cpu but packed is on cuda:0"):
        linear(x, nf4_cuda)
    with pytest.raises(ValueError, match="x is on cuda:0 but bias is on cpu"):
        linear(x.cuda(), nf4_cuda, bias)
    mixed = NF4Tensor(nf4_cuda.packed, nf4.absmax, nf4.shape, nf4.dtype, nf4.blocksize,
                      nf4.absmax_scale, nf4.absmax_code, nf4.absmax_offset)
    with pytest.raises(ValueError, match="packed is on cuda:0 but absmax is on cpu"):
        linear(x.cuda(), mixed)
    with pytest.raises(ValueError, match="grad_out is on cuda:0 but packed is on cpu"):
        grad_input(inputs(3, 33, torch.float32).cuda(), nf4)
    # the offset, one scalar, may live on either device
    offset_on_cpu = NF4Tensor(nf4_cuda.packed, nf4_cuda.absmax, nf4.shape, nf4.dtype, nf4.blocksize,
                              nf4_cuda.absmax_scale, nf4_cuda.absmax_code, nf4.absmax_offset)
    assert torch.equal(linear(x.cuda(), offset_on_cpu), linear(x.cuda(), nf4_cuda))


# ---- 64-bit indexing ----

@pytest.mark.slow
def test_weight_past_2_pow_31_elements():
    """W [65537, 32768] (2^31 + 2^15 elements, 1 GiB packed): the rows past
    element 2^31 are within the rule against those rows as a weight of their own
    (decoded on the CPU), on the fused path (1 token) and the tiled one (17),
    forward and backward."""
    rows, cols, tail = 65537, 32768, 65536  # rows [65536, 65537) lie past 2^31
    w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    packed, absmax = ops.nf4_quantize(w, 64)
    tail_rows = w[tail:].cpu()
    del w
    big = NF4Tensor(packed, absmax, torch.Size((rows, cols)), torch.bfloat16, 64)
    small = NF4Tensor(packed[tail * cols // 2:].cpu(), absmax[tail * cols // 64:].cpu(),
                      tail_rows.shape, torch.bfloat16, 64)
    for tokens in (1, 17):
        x = inputs(tokens, cols, torch.bfloat16)
        y = linear(x.cuda(), big)[:, tail:]
        assert_each_within_rule(("y",), (y,), linear_reference(x, small), torch.bfloat16, "cuda",
                                f"rows past 2^31, T={tokens}")
        dy = torch.zeros(tokens, rows, dtype=torch.bfloat16)
        dy[:, tail:] = inputs(tokens, rows - tail, torch.bfloat16, seed=2)
        dx = grad_input(dy.cuda(), big)
        assert_each_within_rule(("dx",), (dx,), grad_input_reference(dy[:, tail:], small),
                                torch.bfloat16, "cuda", f"rows past 2^31, T={tokens}")
