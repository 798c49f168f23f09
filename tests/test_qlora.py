"""QLoRA (LoRA over an NF4 base) on the CPU: against the plain-PyTorch reference
over the decoded weight, against peft over a bitsandbytes Linear4bit base, merging,
and peak memory."""
import math

import pytest
import torch
from torch import nn

from pykernels import NF4Tensor, ops, reference
from pykernels.nn import NF4Linear, QLoRALinear

from helpers import assert_each_within_rule, assert_rule, peak_memory_growth

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading dims, in, out, r): 1 and 3 tokens run the fused NF4 kernels, 40 and
# 2x100 the tiled path; 577 is not a multiple of the blocksize.
SHAPES = [((1,), 256, 128, 8), ((3,), 577, 193, 1), ((40,), 130, 70, 16), ((2, 100), 64, 96, 4)]


def make_case(lead, n_in, n_out, r, dtype, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    nf4 = NF4Tensor.quantize(torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in),
                             double_quant=double_quant)
    bias = torch.randn(n_out, generator=g).to(dtype)
    x = torch.randn(*lead, n_in, generator=g).to(dtype)
    a = (torch.randn(r, n_in, generator=g) / math.sqrt(n_in)).to(dtype)
    b = (torch.randn(n_out, r, generator=g) / math.sqrt(r)).to(dtype)
    dy = torch.randn(*lead, n_out, generator=g).to(dtype)
    return nf4, bias, x, a, b, dy


def run(fn, x, a, b, dy):
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = fn(x, a, b)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad


def ours(nf4, bias, scale, p=0.0, seed=0):
    return lambda x, a, b: ops.qlora_linear(
        x, nf4.packed, nf4.absmax, nf4.shape[0], nf4.blocksize, bias, nf4.absmax_scale,
        nf4.absmax_code, nf4.absmax_offset, a, b, scale, p, seed)


def check_against_reference(lead, n_in, n_out, r, dtype, double_quant, p=0.0, scale=1.5,
                            device="cpu"):
    """The op on ``device`` against reference.lora_linear over the decoded W by the
    tolerance rule, forward and every gradient (tests/test_qlora_cuda.py runs it
    with device="cuda")."""
    nf4, bias, x, a, b, dy = make_case(lead, n_in, n_out, r, dtype, double_quant)
    mask = ops.lora_dropout_mask(x.shape, p, 11) if p > 0 else None
    got = run(ours(nf4.to(device), bias.to(device), scale, p, 11), *(t.to(device) for t in (x, a, b, dy)))

    def ref_in(dt, dev):
        w = nf4.dequantize(torch.float32).to(dev, dt)
        m = None if mask is None else mask.to(dev)
        fn = lambda x_, a_, b_: reference.lora_linear(x_, w, bias.to(dev, dt), a_, b_, scale, m)
        return run(fn, *(t.to(dev, dt) for t in (x, a, b, dy)))

    assert_each_within_rule(("y", "dx", "dA", "dB"), got, ref_in, dtype, device,
                            f"{dtype} {lead}x{n_in}->{n_out} r{r} dq={double_quant} p={p}")


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, shape, double_quant):
    check_against_reference(*shape, dtype, double_quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_mask_matches_reference(dtype):
    check_against_reference((40,), 130, 70, 16, dtype, True, p=0.3)
    check_against_reference((3,), 130, 70, 16, dtype, True, p=0.3)


def test_x_without_grad_and_frozen_base():
    nf4, bias, x, a, b, dy = make_case((5,), 64, 32, 4, torch.float32)
    a.requires_grad_()
    y = ours(nf4, bias, 2.0)(x, a, b)
    y.backward(dy)
    assert a.grad is not None and x.grad is None
    with pytest.raises(RuntimeError, match="frozen"):
        ours(nf4, bias.clone().requires_grad_(), 2.0)(x, a, b)


# ---- peft over bitsandbytes ----

def peft_over_bnb(linear, r, alpha, dtype):
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True,
                                          compute_dtype=dtype, quant_type="nf4",
                                          compress_statistics=True)

        def forward(self, x):
            return self.proj(x)

    holder = Holder()
    weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                               compress_statistics=True, blocksize=64)
    holder.proj.weight = weight if weight.bnb_quantized else weight._quantize("cpu")
    holder.proj.bias = nn.Parameter(linear.bias.data.to(dtype).clone(), requires_grad=False)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(holder, config)
    return model, model.base_model.model.proj


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 37])
def test_matches_peft_over_bitsandbytes(dtype, tokens):
    torch.manual_seed(0)
    linear = nn.Linear(320, 192)
    ours_layer = QLoRALinear.from_linear(linear, r=8, alpha=16, adapter_dtype=dtype)
    nn.init.normal_(ours_layer.lora_B.weight, std=0.05)
    model, peft_layer = peft_over_bnb(linear, 8, 16, dtype)
    # Same NF4 state as bitsandbytes made, bit for bit.
    assert torch.equal(peft_layer.base_layer.weight.data.reshape(-1), ours_layer.base_layer.packed)
    peft_layer.lora_A["default"].weight.data = ours_layer.lora_A.weight.data.clone()
    peft_layer.lora_B["default"].weight.data = ours_layer.lora_B.weight.data.clone()
    peft_layer.lora_A["default"].to(dtype)
    peft_layer.lora_B["default"].to(dtype)
    ours_layer.base_layer.bias.data = ours_layer.base_layer.bias.data.to(dtype)

    x = torch.randn(tokens, 320).to(dtype)
    dy = torch.randn(tokens, 192).to(dtype)
    x_ours = x.clone().requires_grad_()
    y_ours = ours_layer(x_ours)
    y_ours.backward(dy)
    x_peft = x.clone().requires_grad_()
    y_peft = model(x_peft)
    y_peft.backward(dy)
    w = ours_layer.base_layer.dequantize(torch.float32).double()
    truth = reference.lora_linear(x.double(), w, ours_layer.base_layer.bias.double(),
                                  ours_layer.lora_A.weight.double(), ours_layer.lora_B.weight.double(),
                                  ours_layer.scaling)
    # Both within the tolerance rule of the same truth; and of each other.
    assert_rule(y_ours.detach(), y_peft.detach(), truth, f"y vs peft {dtype}")
    assert_rule(x_ours.grad, x_peft.grad, (dy.double() @ w) + ours_layer.scaling *
                (dy.double() @ ours_layer.lora_B.weight.double()) @ ours_layer.lora_A.weight.double(),
                f"dx vs peft {dtype}")
    for ours_param, peft_param, name in ((ours_layer.lora_A.weight, peft_layer.lora_A["default"].weight, "dA"),
                                         (ours_layer.lora_B.weight, peft_layer.lora_B["default"].weight, "dB")):
        err = (ours_param.grad.double() - peft_param.grad.double()).abs().max()
        scale = peft_param.grad.double().abs().max()
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert err <= tol * scale, f"{name} {dtype}: {err:.3g} of {scale:.3g}"


# ---- the layer ----

def test_new_adapter_is_the_base_layer():
    linear = nn.Linear(96, 64)
    layer = QLoRALinear.from_linear(linear, r=4)
    x = torch.randn(5, 96)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_unmerged_and_unmerge_is_exact(dtype):
    torch.manual_seed(1)
    layer = QLoRALinear.from_linear(nn.Linear(130, 70).to(dtype), r=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(33, 130).to(dtype)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        merged = layer(x)
        deployed = layer.merged_linear()(x)
        layer.unmerge()
        after = layer(x)
    assert torch.equal(before, after)
    assert torch.equal(merged, deployed)
    truth = reference.lora_linear(x.double(), layer.base_layer.dequantize(torch.float32).double(),
                                  layer.base_layer.bias.double(), layer.lora_A.weight.double(),
                                  layer.lora_B.weight.double(), layer.scaling)
    assert_rule(merged, before, truth, f"merged {dtype}")


def test_requantized_merge_reports_the_error_it_adds():
    torch.manual_seed(2)
    layer = QLoRALinear.from_linear(nn.Linear(256, 128), r=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight, std=0.01)
    nf4_layer, report = layer.merged_nf4()
    assert isinstance(nf4_layer, NF4Linear)
    assert 0.0 < report["relative_error"] < 0.2
    assert report["update_norm"] > 0
    assert report["update_kept"] < 1.0
    merged = layer.merged_dense_weight(torch.float32)
    back = nf4_layer.dequantize(torch.float32)
    assert abs(float((back - merged).norm() / merged.norm()) - report["relative_error"]) < 1e-6


def test_state_dict_round_trip():
    layer = QLoRALinear.from_linear(nn.Linear(64, 48), r=4)
    nn.init.normal_(layer.lora_B.weight)
    copy = QLoRALinear.from_linear(nn.Linear(64, 48), r=4)
    copy.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(copy(x), layer(x))
    assert {"lora_A.weight", "lora_B.weight", "base_layer.packed"} <= set(layer.state_dict())


def test_fp32_adapter_over_bf16_compute():
    layer = QLoRALinear.from_linear(nn.Linear(64, 48).to(torch.bfloat16), r=4,
                                    adapter_dtype=torch.float32)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32
    assert layer.lora_B.weight.grad.dtype == torch.float32


def test_opcheck_and_compile():
    nf4, bias, x, a, b, dy = make_case((5,), 130, 70, 4, torch.float32)
    args = (x, nf4.packed, nf4.absmax, nf4.blocksize, 70, bias, nf4.absmax_scale, nf4.absmax_code,
            nf4.absmax_offset, a.requires_grad_(), b.requires_grad_(), 2.0, 0.1,
            torch.tensor(3, dtype=torch.int64))
    torch.library.opcheck(torch.ops.pykernels.qlora_linear, args)
    layer = QLoRALinear.from_linear(nn.Linear(64, 48), r=4, dropout=0.1)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    layer.eval()
    x = torch.randn(6, 64)
    assert torch.allclose(compiled(x), layer(x))


def test_bad_input_names_the_argument():
    nf4, bias, x, a, b, dy = make_case((5,), 130, 70, 4, torch.float32)
    with pytest.raises(ValueError, match="lora_A"):
        ours(nf4, bias, 1.0)(x, a[:, :-1], b)
    with pytest.raises(ValueError, match="dropout_p"):
        ours(nf4, bias, 1.0, p=1.0)(x, a, b)
    with pytest.raises(ValueError, match="packed must have 4480 elements"):
        ours(nf4, bias, 1.0)(x[:, :-2], a[:, :-2], b)


_PEAK_QLORA = """
import torch
from pykernels import ops

def step(out_f, in_f, tokens, r):
    g = torch.Generator().manual_seed(0)  # a random NF4 state: no dense W ever exists
    packed = torch.randint(0, 256, (out_f * in_f // 2,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(out_f * in_f // 64, generator=g).mul_(0.1)
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(r, in_f, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(out_f, r, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, out_f, dtype=torch.bfloat16)
    return lambda: ops.qlora_linear(x, packed, absmax, out_f, 64, None, None, None, None,
                                    a, b, 2.0, 0.05, 7).backward(dy)

step(128, 256, 512, 16)()  # warm-up: loads the GEMM kernels
run = step(11008, 4096, 512, 16)
before = reset_peak()
run()
print(status("VmHWM") - before)
"""


def test_peak_memory_below_one_dense_weight():
    """QLoRA forward + backward (dx, dA, dB, dropout on) of a 4096 -> 11008 layer at
    512 bf16 tokens raises peak resident memory by less than one dense bf16 W."""
    dense = 11008 * 4096 * 2
    grown = peak_memory_growth(_PEAK_QLORA)
    assert grown < dense, f"QLoRA step grew peak memory by {grown / 2**20:.0f} MiB (W: 86 MiB)"
