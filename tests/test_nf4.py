"""NF4 on the CPU: against the plain-PyTorch reference, against bitsandbytes 0.50
bit for bit, across CPU kernel paths, and on bad input."""
import json

import pytest
import torch

import pykernels
from pykernels import NF4Tensor, ops, reference

bnb_functional = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [64, 128, 256, 4096]
SHAPES = [(1,), (7,), (63,), (3, 65), (129, 33), (1000, 37), (4097,), (2, 3, 4099)]


def awkward_weight(shape, dtype, blocksize, seed=0):
    """Random normal values, one all-zero block, and values exactly on the NF4
    midpoints (block 0 has absmax 1, so they stay exact after scaling)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(torch.Size(shape).numel(), generator=g)
    n = flat.numel()
    if n >= 3 * blocksize:
        flat[blocksize:2 * blocksize] = 0
    mids = reference.nf4_midpoints()
    k = min(n - 1, mids.numel())
    if n > 0:
        flat[0] = 1.0
        flat[1:1 + k] = mids[:k]
    return flat.reshape(shape).to(dtype)


def bnb_quantize(w, blocksize, double_quant=False):
    return bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                        compress_statistics=double_quant)


# ---- the spec ----

def test_reference_table_is_the_native_table():
    # Decoding every code with absmax 1 reads the native table back.
    packed = torch.tensor([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF], dtype=torch.uint8)
    decoded = ops.nf4_dequantize(packed, torch.ones(1), (16,), torch.float32, blocksize=64)
    assert torch.equal(decoded, reference.nf4_code())
    assert torch.equal(reference.nf4_code(), bnb_functional.get_4bit_type("nf4", device="cpu"))


def test_midpoints_take_the_lower_code():
    mids = reference.nf4_midpoints()
    x = torch.cat([torch.tensor([1.0]), mids, torch.zeros(64 - 16)])
    packed, _ = ops.nf4_quantize(x, 64)
    codes = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1)
    assert codes[1:16].tolist() == list(range(15))


def test_dynamic_code_matches_bitsandbytes():
    assert torch.equal(reference.dynamic_code(), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("shape", SHAPES)
def test_native_equals_reference(dtype, blocksize, shape):
    w = awkward_weight(shape, dtype, blocksize)
    packed, absmax = ops.nf4_quantize(w, blocksize)
    ref_packed, ref_absmax = reference.nf4_quantize(w, blocksize)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, ref_absmax)
    for out_dtype in DTYPES:
        got = ops.nf4_dequantize(packed, absmax, shape, out_dtype, blocksize)
        want = reference.nf4_dequantize(packed, absmax, shape, out_dtype, blocksize)
        assert torch.equal(got, want)


def test_every_cpu_path_gives_the_same_bytes(cpu_path):
    w = awkward_weight((333, 129), torch.bfloat16, 64, seed=3)
    results = []
    for path in pykernels._C.cpu_paths():
        cpu_path(path)
        packed, absmax = ops.nf4_quantize(w, 64)
        results.append((path, packed, absmax, ops.nf4_dequantize(packed, absmax, w.shape, torch.bfloat16)))
    assert len(results) >= 1
    _, packed0, absmax0, out0 = results[0]
    for path, packed, absmax, out in results[1:]:
        assert torch.equal(packed, packed0), path
        assert torch.equal(absmax, absmax0), path
        assert torch.equal(out, out0), path


# ---- bitsandbytes, bit for bit ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", [(7,), (129, 33), (3, 4099), (64, 130)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bit_exact_with_bitsandbytes(dtype, blocksize, shape, double_quant):
    w = awkward_weight(shape, dtype, blocksize, seed=blocksize)
    bnb_packed, bnb_state = bnb_quantize(w, blocksize, double_quant)
    ours = NF4Tensor.quantize(w, blocksize, double_quant=double_quant)
    assert torch.equal(ours.packed, bnb_packed.reshape(-1))
    assert torch.equal(ours.absmax, bnb_state.absmax)
    if double_quant:
        assert torch.equal(ours.absmax_scale, bnb_state.state2.absmax)
        assert torch.equal(ours.absmax_code, bnb_state.state2.code)
        assert torch.equal(ours.absmax_offset, bnb_state.offset)
    assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(bnb_packed, bnb_state))


def test_bit_exact_with_bitsandbytes_llama_mlp_weight():
    w = torch.randn(4096, 11008, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    bnb_packed, bnb_state = bnb_quantize(w, 64, double_quant=True)
    ours = NF4Tensor.quantize(w, 64, double_quant=True)
    assert torch.equal(ours.packed, bnb_packed.reshape(-1))
    assert torch.equal(ours.absmax, bnb_state.absmax)
    assert torch.equal(ours.absmax_scale, bnb_state.state2.absmax)
    assert torch.equal(ours.absmax_offset, bnb_state.offset)
    assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(bnb_packed, bnb_state))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_made_by_bitsandbytes_decodes_here(double_quant, dtype):
    w = awkward_weight((300, 130), dtype, 64, seed=11)
    bnb_packed, bnb_state = bnb_quantize(w, 64, double_quant)
    ours = NF4Tensor.from_bnb(bnb_packed, bnb_state)
    assert ours.double_quant == double_quant
    assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(bnb_packed, bnb_state))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_made_here_decodes_in_bitsandbytes(double_quant, dtype):
    w = awkward_weight((300, 130), dtype, 128, seed=12)
    ours = NF4Tensor.quantize(w, 128, double_quant=double_quant)
    packed, state = ours.to_bnb()
    assert torch.equal(bnb_functional.dequantize_4bit(packed, state), ours.dequantize())
    # bitsandbytes reads our serialized dict too.
    state2 = bnb_functional.QuantState.from_dict(ours.to_bnb_dict(), device="cpu")
    assert torch.equal(bnb_functional.dequantize_4bit(packed, state2), ours.dequantize())


@pytest.mark.parametrize("double_quant", [False, True])
def test_safetensors_round_trip_without_pickle(tmp_path, double_quant):
    w = awkward_weight((65, 130), torch.float16, 64, seed=13)
    ours = NF4Tensor.quantize(w, 64, double_quant=double_quant)
    path = tmp_path / "w.safetensors"
    ours.save(str(path))
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    assert header["__metadata__"]["format"] == "pykernels-nf4"
    loaded = NF4Tensor.load(str(path))
    assert loaded.shape == w.shape and loaded.dtype == w.dtype
    assert torch.equal(loaded.dequantize(), ours.dequantize())


# ---- values ----

def test_all_zero_blocks_decode_to_exact_zeros():
    for n in (64, 100, 4096 + 7):
        packed, absmax = ops.nf4_quantize(torch.zeros(n), 64)
        out = ops.nf4_dequantize(packed, absmax, (n,), torch.float32)
        assert not out.isnan().any()
        assert torch.equal(out, torch.zeros(n))
        assert (packed == 0x77).all()


def test_empty_and_single_element():
    packed, absmax = ops.nf4_quantize(torch.empty(0, 5), 64)
    assert packed.numel() == 0 and absmax.numel() == 0
    assert ops.nf4_dequantize(packed, absmax, (0, 5)).shape == (0, 5)
    packed, absmax = ops.nf4_quantize(torch.tensor([-3.0]), 64)
    assert packed.tolist() == [0x07] and absmax.tolist() == [3.0]
    assert ops.nf4_dequantize(packed, absmax, (1,)).tolist() == [-3.0]


def test_non_contiguous_input_quantizes_like_its_contiguous_copy():
    w = torch.randn(128, 96).t()
    assert not w.is_contiguous()
    for a, b in zip(ops.nf4_quantize(w), ops.nf4_quantize(w.contiguous())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_into_preallocated_buffer(dtype):
    w = torch.randn(256, 130).to(dtype)
    packed, absmax = ops.nf4_quantize(w)
    out = torch.full_like(w, 5.0)
    result = ops.nf4_dequantize(packed, absmax, w.shape, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, ops.nf4_dequantize(packed, absmax, w.shape, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_outputs_stream_into_a_kept_buffer_with_the_same_values(dtype):
    """Past 16 MiB the AVX-512 path writes a caller's buffer with streaming stores
    and a fresh allocation with ordinary ones: both give the reference's values."""
    w = torch.randn(2048, 4160).to(dtype)  # 17 MiB in bf16, 34 MiB in fp32
    packed, absmax = ops.nf4_quantize(w)
    want = reference.nf4_dequantize(packed, absmax, w.shape, dtype, 64)
    out = torch.empty_like(w)
    ops.nf4_dequantize(packed, absmax, w.shape, out=out)
    assert torch.equal(out, want)
    assert torch.equal(ops.nf4_dequantize(packed, absmax, w.shape, dtype), want)


def test_quantization_error_is_small():
    w = torch.randn(512, 512)
    back = NF4Tensor.quantize(w).dequantize()
    relative = (back - w).norm() / w.norm()
    assert 0.05 < relative < 0.12  # NF4 on normal data: ~0.09


# ---- bad input ----

def test_rejects_non_float_dtype():
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ops.nf4_quantize(torch.arange(64))
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        ops.nf4_dequantize(torch.zeros(32, dtype=torch.uint8), torch.ones(1), (64,), torch.int32)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64])
def test_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096"):
        ops.nf4_quantize(torch.randn(256), blocksize)
    with pytest.raises(ValueError, match="blocksize"):
        ops.nf4_dequantize(torch.zeros(128, dtype=torch.uint8), torch.ones(4), (256,), blocksize=blocksize)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rejects_nan_and_inf(bad, dtype, cpu_path):
    for path in pykernels._C.cpu_paths():
        cpu_path(path)
        w = torch.randn(10, 100).to(dtype)
        w[7, 3] = bad
        with pytest.raises(ValueError, match="x holds NaN or Inf"):
            ops.nf4_quantize(w)


def test_rejects_absmax_of_wrong_length_or_dtype():
    packed, absmax = ops.nf4_quantize(torch.randn(640))
    with pytest.raises(ValueError, match=r"absmax must have 10 elements \(one per block\), got 9"):
        ops.nf4_dequantize(packed, absmax[:9], (640,))
    with pytest.raises(TypeError, match="absmax must be Float"):
        ops.nf4_dequantize(packed, absmax.half(), (640,))
    with pytest.raises(ValueError, match="packed must have 320 elements"):
        ops.nf4_dequantize(packed[:-1], absmax, (640,))
    with pytest.raises(ValueError, match="out has shape"):
        ops.nf4_dequantize(packed, absmax, (640,), out=torch.empty(641))


def test_rejects_mismatched_devices():
    packed, absmax = ops.nf4_quantize(torch.randn(640))
    with pytest.raises(ValueError, match="absmax is on meta"):
        ops.nf4_dequantize(packed, absmax.to("meta"), (640,))


def test_bnb_state_that_is_not_nf4_is_rejected():
    w = torch.randn(64, 64)
    packed, state = bnb_functional.quantize_4bit(w, quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        NF4Tensor.from_bnb(packed, state)


# ---- torch.library integration ----

def test_opcheck_every_op():
    w = awkward_weight((129, 33), torch.bfloat16, 64)
    packed, absmax = ops.nf4_quantize(w)
    code = reference.dynamic_code()
    q, scale = ops.blockwise8_quantize(absmax - absmax.mean(), code)
    cases = [
        (torch.ops.pykernels.nf4_quantize, (w, 64)),
        (torch.ops.pykernels.nf4_dequantize, (packed, absmax, 64, list(w.shape), torch.bfloat16)),
        (torch.ops.pykernels.nf4_dequantize_into, (packed, absmax, 64, torch.empty_like(w))),
        (torch.ops.pykernels.blockwise8_quantize, (absmax - absmax.mean(), code, 256)),
        (torch.ops.pykernels.blockwise8_dequantize, (q, scale, code, absmax.mean(), 256)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compiles_fullgraph():
    def roundtrip(w):
        packed, absmax = ops.nf4_quantize(w, 64)
        return ops.nf4_dequantize(packed, absmax, w.shape, w.dtype, 64)

    w = torch.randn(96, 64, dtype=torch.bfloat16)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(w), roundtrip(w))


# ---- 64-bit indexing ----

@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """2^31 + 4161 bf16 elements (4.3 GB). Blocks are independent, so the blocks
    past element 2^31 must equal the same 4161 elements quantized on their own
    (including the partial last block), and decode the same."""
    n = 2**31 + 4161
    tile = awkward_weight((65536,), torch.bfloat16, 64, seed=5)
    w = tile.repeat(n // tile.numel() + 1)[:n]
    tail = w[2**31:].clone()
    packed, absmax = ops.nf4_quantize(w, 64)
    del w
    tail_packed, tail_absmax = reference.nf4_quantize(tail, 64)
    assert packed.numel() == (n + 1) // 2 and absmax.numel() == -(-n // 64)
    assert torch.equal(packed[2**30:], tail_packed)
    assert torch.equal(absmax[2**25:], tail_absmax)
    assert torch.equal(absmax[:1024], ops.nf4_quantize(tile, 64)[1])
    out = ops.nf4_dequantize(packed, absmax, (n,), torch.bfloat16, 64)
    assert torch.equal(out[2**31:], reference.nf4_dequantize(tail_packed, tail_absmax, tail.shape,
                                                              torch.bfloat16, 64))
