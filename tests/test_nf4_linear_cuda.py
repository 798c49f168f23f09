"""NF4 linear on CUDA: y = x·Wᵀ + b and its input gradient with W stored as NF4.

Both paths, against the fp32 reference by the tolerance rule of DESIGN §4 (the
dtype's own reference is torch's CUDA linear on the decoded W) and against the
CPU op: the fused kernels up to 16 tokens (1, 2, 3, 5, 8, 13 and 16 tokens touch
every template bound), the tiles + cuBLAS above (17, 64, 512), on shapes that
take the vector paths (in % 32 == 0) and the per-element ones (193 x 577), with
plain and double-quantized absmax and several blocksizes. Also: the two paths
agree at the handover, double quant decoded on the fly gives the bits of the
decoded absmax, unaligned buffers, the layer, autograd, gradcheck, opcheck,
streams, devices that disagree and a weight past 2^31 elements."""
import pytest
import torch
import torch.nn.functional as F

from pykernels import NF4Tensor, ops, reference
from pykernels.nn import NF4Linear

from test_nf4_linear import assert_within_rule, grad_input, inputs, linear, make_weight

pytestmark = pytest.mark.cuda  # conftest.py skips these without a CUDA device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOKENS = [1, 2, 3, 5, 8, 13, 16, 17, 64, 512]
SHAPES = [(193, 577), (256, 512), (64, 4096)]  # [out, in]
# CUDA against the CPU op: different summation orders (and cuBLAS's in the tiled path).
CLOSE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=4e-3, atol=4e-3),
         torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def cuda_weight(shape, double_quant, blocksize=64):
    nf4, bias = make_weight(*shape, double_quant, blocksize)
    return nf4, nf4.to("cuda"), bias


# ---- the spec, and the CPU op ----

@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference_and_cpu(dtype, tokens, shape, double_quant):
    nf4, nf4_cuda, bias = cuda_weight(shape, double_quant)
    x, b = inputs(tokens, shape[1], dtype), bias.to(dtype)
    y = linear(x.cuda(), nf4_cuda, b.cuda())
    assert y.is_cuda and y.dtype == dtype and y.shape == (tokens, shape[0])
    same_dtype = F.linear(x.cuda(), reference.nf4_weight(nf4, dtype).cuda(), b.cuda()).cpu()
    assert_within_rule(y.cpu(), reference.nf4_linear(x, nf4, b), same_dtype, "forward")
    torch.testing.assert_close(y.cpu(), linear(x, nf4, b), **CLOSE[dtype])


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input_matches_reference_and_cpu(dtype, tokens, shape, double_quant):
    nf4, nf4_cuda, _ = cuda_weight(shape, double_quant)
    dy = inputs(tokens, shape[0], dtype, seed=2)
    dx = grad_input(dy.cuda(), nf4_cuda)
    assert dx.is_cuda and dx.dtype == dtype and dx.shape == (tokens, shape[1])
    same_dtype = (dy.cuda() @ reference.nf4_weight(nf4, dtype).cuda()).cpu()
    assert_within_rule(dx.cpu(), reference.nf4_linear_grad_input(dy, nf4), same_dtype, "grad_input")
    torch.testing.assert_close(dx.cpu(), grad_input(dy, nf4), **CLOSE[dtype])


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_and_tiled_paths_agree_at_the_handover(dtype, double_quant):
    _, nf4, bias = cuda_weight((256, 512), double_quant)
    x, dy = inputs(17, 512, dtype).cuda(), inputs(17, 256, dtype, seed=3).cuda()
    b = bias.to(dtype).cuda()
    torch.testing.assert_close(linear(x[:16], nf4, b), linear(x, nf4, b)[:16], **CLOSE[dtype])
    torch.testing.assert_close(grad_input(dy[:16], nf4), grad_input(dy, nf4)[:16], **CLOSE[dtype])


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
    x = inputs(tokens, 577, dtype).cuda().requires_grad_()
    b = bias.to(dtype).cuda().requires_grad_()
    g = inputs(tokens, 193, dtype, seed=6)
    linear(x, nf4_cuda, b).backward(g.cuda())
    x32 = x.detach().cpu().float().requires_grad_()
    b32 = b.detach().cpu().float().requires_grad_()
    reference.nf4_linear(x32, nf4, b32).backward(g.float())
    w = reference.nf4_weight(nf4, dtype).cuda()
    assert_within_rule(x.grad.cpu(), x32.grad, (g.cuda() @ w).cpu(), "grad x")
    assert_within_rule(b.grad.cpu(), b32.grad, g.cuda().sum(0).cpu(), "grad bias")


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
    dense = torch.nn.Linear(577, 193).bfloat16()
    layer = NF4Linear.from_linear(dense, double_quant=True)
    x = inputs(tokens, 577, torch.bfloat16)
    results = []
    for module, xin in ((layer, x), (NF4Linear.from_linear(dense, double_quant=True).cuda(), x.cuda())):
        xin = xin.clone().requires_grad_()
        y = module(xin)
        y.float().square().sum().backward()
        results.append([t.detach().cpu() for t in (y, xin.grad, module.bias.grad)])
    for name, u, v in zip(("y", "dx", "d bias"), *results):
        torch.testing.assert_close(v, u, **CLOSE[torch.bfloat16], msg=name)


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
    element 2^31 give what the same rows give as a weight of their own on the
    CPU, on the fused path (1 token) and the tiled one (17), forward and backward."""
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
        y = linear(x.cuda(), big)[:, tail:].cpu()
        torch.testing.assert_close(y, linear(x, small), **CLOSE[torch.bfloat16])
        dy = torch.zeros(tokens, rows, dtype=torch.bfloat16)
        dy[:, tail:] = inputs(tokens, rows - tail, torch.bfloat16, seed=2)
        dx = grad_input(dy.cuda(), big).cpu()
        torch.testing.assert_close(dx, grad_input(dy[:, tail:].contiguous(), small), **CLOSE[torch.bfloat16])
