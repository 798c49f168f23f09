"""NF4 on CUDA: every op gives the CPU op's bytes exactly (packed codes, absmax,
the double-quant state, decoded values) on the same inputs, plus what only the
GPU side has: both kernel paths (vectorized and unaligned), streams, devices
that disagree, opcheck. The CPU ops are the oracle; tests/test_nf4.py holds
those to the reference and to bitsandbytes."""
import pytest
import torch

from pykernels import NF4Tensor, ops, reference

pytestmark = pytest.mark.cuda  # conftest.py skips these without a CUDA device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [64, 128, 256, 4096]
# Odd numels, partial last blocks, a partial block shorter than one 8-element chunk.
SHAPES = [(1,), (7,), (63,), (3, 65), (129, 33), (1000, 37), (4097,), (2, 3, 4099)]


def weight(shape, dtype, blocksize, seed=0):
    """Normal values with an all-zero block, and block 0 = [1.0, the 15 NF4
    midpoints, ...]: its absmax is 1, so the midpoints stay exact when scaled."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(torch.Size(shape).numel(), generator=g)
    if flat.numel() >= 3 * blocksize:
        flat[blocksize:2 * blocksize] = 0
    mids = reference.nf4_midpoints()[:max(flat.numel() - 1, 0)]
    flat[:1 + mids.numel()] = torch.cat([torch.ones(1), mids])[:flat.numel()]
    return flat.reshape(shape).to(dtype)


def assert_equal_on_cpu(cuda_tensors, cpu_tensors):
    for got, want in zip(cuda_tensors, cpu_tensors, strict=True):
        assert got.is_cuda
        assert torch.equal(got.cpu(), want)


def cpu_dequantize(packed, absmax, shape, dtype, blocksize=64):
    return ops.nf4_dequantize(packed.cpu(), absmax.cpu(), shape, dtype, blocksize)


# ---- the same bytes as the CPU ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_and_dequantize_equal_cpu(dtype, blocksize, shape):
    w = weight(shape, dtype, blocksize, seed=blocksize)
    packed, absmax = ops.nf4_quantize(w.cuda(), blocksize)
    assert_equal_on_cpu((packed, absmax), ops.nf4_quantize(w, blocksize))
    for out_dtype in DTYPES:
        got = ops.nf4_dequantize(packed, absmax, shape, out_dtype, blocksize)
        assert_equal_on_cpu((got,), (cpu_dequantize(packed, absmax, shape, out_dtype, blocksize),))


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_every_code_and_nibble_position(blocksize):
    # Each code at an even and an odd position, in a full and a partial block.
    codes = torch.arange(16).repeat(2 * blocksize // 16 + 3)
    w = reference.nf4_code()[codes]
    packed, absmax = ops.nf4_quantize(w.cuda(), blocksize)
    assert_equal_on_cpu((packed, absmax), ops.nf4_quantize(w, blocksize))
    assert torch.equal(ops.nf4_dequantize(packed, absmax, w.shape, blocksize=blocksize).cpu(), w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_state_equals_cpu(dtype):
    w = weight((300, 130), dtype, 64, seed=4)
    ours = NF4Tensor.quantize(w.cuda(), 64, double_quant=True)
    cpu_packed, cpu_absmax = ops.nf4_quantize(w, 64)
    # The offset is torch's mean, whose last bit may differ between devices (as
    # bitsandbytes' does); given the same offset, the 8-bit state is the CPU's.
    offset = ours.absmax_offset.cpu()
    q, scale = ops.blockwise8_quantize(cpu_absmax - offset, reference.dynamic_code())
    assert_equal_on_cpu((ours.packed, ours.absmax, ours.absmax_scale), (cpu_packed, q, scale))
    decoded = ops.blockwise8_dequantize(q, scale, reference.dynamic_code(), offset)
    assert_equal_on_cpu((ours.block_absmax(),), (decoded,))
    want = cpu_dequantize(cpu_packed, decoded, w.shape, dtype)
    assert_equal_on_cpu((ours.dequantize(),), (want,))


@pytest.mark.parametrize("blocksize", [256, 64, 100, 1])
@pytest.mark.parametrize("n", [1, 255, 256, 1000, 70000])
def test_blockwise8_equals_cpu(blocksize, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.01
    x[: min(n, blocksize)] = 0  # an all-zero block: absmax 0, codes 0
    code = reference.dynamic_code()
    q, scale = ops.blockwise8_quantize(x.cuda(), code.cuda(), blocksize)
    want_q, want_scale = ops.blockwise8_quantize(x, code, blocksize)
    assert_equal_on_cpu((q, scale), (want_q, want_scale))
    offset = torch.tensor(0.0123)
    got = ops.blockwise8_dequantize(q, scale, code.cuda(), offset.cuda(), blocksize)
    want = ops.blockwise8_dequantize(want_q, want_scale, code, offset, blocksize)
    assert_equal_on_cpu((got,), (want,))


def test_llama_mlp_weight_equals_cpu():
    w = torch.randn(4096, 11008, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    packed, absmax = ops.nf4_quantize(w.cuda(), 64)
    assert_equal_on_cpu((packed, absmax), ops.nf4_quantize(w, 64))
    got = ops.nf4_dequantize(packed, absmax, w.shape, torch.bfloat16)
    assert_equal_on_cpu((got,), (cpu_dequantize(packed, absmax, w.shape, torch.bfloat16),))


# ---- values and layouts ----

def test_all_zero_blocks_decode_to_exact_zeros():
    for n in (64, 100, 4096 + 7):
        packed, absmax = ops.nf4_quantize(torch.zeros(n, device="cuda"), 64)
        out = ops.nf4_dequantize(packed, absmax, (n,), torch.float32)
        assert (packed == 0x77).all()
        assert torch.equal(out, torch.zeros(n, device="cuda"))


def test_empty_and_single_element():
    packed, absmax = ops.nf4_quantize(torch.empty(0, 5, device="cuda"), 64)
    assert packed.numel() == 0 and absmax.numel() == 0
    assert ops.nf4_dequantize(packed, absmax, (0, 5)).shape == (0, 5)
    packed, absmax = ops.nf4_quantize(torch.tensor([-3.0], device="cuda"), 64)
    assert packed.tolist() == [0x07] and absmax.tolist() == [3.0]
    assert ops.nf4_dequantize(packed, absmax, (1,)).tolist() == [-3.0]


def test_non_contiguous_input_quantizes_like_its_contiguous_copy():
    w = torch.randn(128, 96, device="cuda").t()
    assert not w.is_contiguous()
    for a, b in zip(ops.nf4_quantize(w), ops.nf4_quantize(w.contiguous())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_into_preallocated_buffer(dtype):
    w = weight((256, 130), dtype, 64, seed=8).cuda()
    packed, absmax = ops.nf4_quantize(w)
    out = torch.full_like(w, 5.0)
    result = ops.nf4_dequantize(packed, absmax, w.shape, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, ops.nf4_dequantize(packed, absmax, w.shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_buffers_take_the_scalar_path_with_the_same_bytes(dtype):
    # One element into a larger buffer: no longer 16-byte aligned, so the
    # kernels fall back from vector loads and stores.
    w = weight((4096 + 33,), dtype, 64, seed=9)
    shifted = torch.empty(w.numel() + 1, dtype=dtype, device="cuda")[1:]
    shifted.copy_(w)
    packed, absmax = ops.nf4_quantize(shifted)
    assert_equal_on_cpu((packed, absmax), ops.nf4_quantize(w))
    out = torch.empty(w.numel() + 1, dtype=dtype, device="cuda")[1:]
    ops.nf4_dequantize(packed, absmax, w.shape, out=out)
    assert torch.equal(out, ops.nf4_dequantize(packed, absmax, w.shape, dtype))


def test_runs_on_the_current_stream():
    w = weight((512, 300), torch.bfloat16, 64, seed=10)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        packed, absmax = ops.nf4_quantize(w.cuda())
        out = ops.nf4_dequantize(packed, absmax, w.shape, torch.bfloat16)
    side.synchronize()
    cpu_packed, cpu_absmax = ops.nf4_quantize(w)
    want = cpu_dequantize(cpu_packed, cpu_absmax, w.shape, torch.bfloat16)
    assert_equal_on_cpu((packed, absmax, out), (cpu_packed, cpu_absmax, want))


# ---- bad input ----

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rejects_nan_and_inf_naming_the_first_bad_block(bad, dtype):
    w = torch.randn(10, 100).to(dtype)
    w[7, 3] = bad
    w[2, 50] = bad  # the first bad block is the one the message names
    with pytest.raises(ValueError, match="x holds NaN or Inf") as on_cpu:
        ops.nf4_quantize(w)
    with pytest.raises(ValueError, match="x holds NaN or Inf") as on_cuda:
        ops.nf4_quantize(w.cuda())
    assert str(on_cuda.value) == str(on_cpu.value)


def test_rejects_mismatched_devices():
    packed, absmax = ops.nf4_quantize(torch.randn(640, device="cuda"))
    with pytest.raises(ValueError, match="packed is on cuda:0 but absmax is on cpu"):
        ops.nf4_dequantize(packed, absmax.cpu(), (640,))
    with pytest.raises(ValueError, match="packed is on cpu but absmax is on cuda:0"):
        ops.nf4_dequantize(packed.cpu(), absmax, (640,))
    with pytest.raises(ValueError, match="packed is on cuda:0 but out is on cpu"):
        ops.nf4_dequantize(packed, absmax, (640,), out=torch.empty(640))
    with pytest.raises(ValueError, match="x is on cuda:0 but code is on cpu"):
        ops.blockwise8_quantize(absmax, reference.dynamic_code())


def test_rejects_bad_blocksize_and_dtype():
    with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096"):
        ops.nf4_quantize(torch.randn(256, device="cuda"), 48)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ops.nf4_quantize(torch.arange(64, device="cuda"))


# ---- torch.library integration ----

def test_opcheck_every_op():
    w = weight((129, 33), torch.bfloat16, 64).cuda()
    packed, absmax = ops.nf4_quantize(w)
    code = reference.dynamic_code().cuda()
    centred = absmax - absmax.mean()
    q, scale = ops.blockwise8_quantize(centred, code)
    cases = [
        (torch.ops.pykernels.nf4_quantize, (w, 64)),
        (torch.ops.pykernels.nf4_dequantize, (packed, absmax, 64, list(w.shape), torch.bfloat16)),
        (torch.ops.pykernels.nf4_dequantize_into, (packed, absmax, 64, torch.empty_like(w))),
        (torch.ops.pykernels.blockwise8_quantize, (centred, code, 256)),
        (torch.ops.pykernels.blockwise8_dequantize, (q, scale, code, absmax.mean(), 256)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compiles_fullgraph():
    def roundtrip(w):
        packed, absmax = ops.nf4_quantize(w, 64)
        return ops.nf4_dequantize(packed, absmax, w.shape, w.dtype, 64)

    w = torch.randn(96, 64, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(w), roundtrip(w))


# ---- 64-bit indexing ----

@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """2^31 + 4161 bf16 elements (4.3 GB on the device): the blocks past element
    2^31 equal the same elements quantized on their own on the CPU."""
    n = 2**31 + 4161
    tile = weight((65536,), torch.bfloat16, 64, seed=5)
    w = tile.cuda().repeat(n // tile.numel() + 1)[:n]
    tail = w[2**31:].cpu()
    packed, absmax = ops.nf4_quantize(w, 64)
    del w
    tail_packed, tail_absmax = ops.nf4_quantize(tail, 64)
    assert packed.numel() == (n + 1) // 2 and absmax.numel() == -(-n // 64)
    assert_equal_on_cpu((packed[2**30:], absmax[2**25:]), (tail_packed, tail_absmax))
    out = ops.nf4_dequantize(packed, absmax, (n,), torch.bfloat16, 64)
    want = cpu_dequantize(tail_packed, tail_absmax, tail.shape, torch.bfloat16)
    assert_equal_on_cpu((out[2**31:],), (want,))
