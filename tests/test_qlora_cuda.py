"""QLoRA on CUDA, with the CPU op as the oracle (tests/test_qlora.py holds that to
the reference and to peft over bitsandbytes): the forward and every gradient
within the tolerance rule of DESIGN §4 against the float64 truth (the dtype's own
reference runs on CUDA: cuBLAS's sums), for fp32, fp16 and bf16, plain and double-quantized absmax, few tokens (the fused NF4 kernels,
up to 16) and many (W decoded tile by tile for cuBLAS), leading batch dims and
dropout (the CPU's mask). Also: no host synchronization in a training step (the
double-quant offset stays on the device), opcheck, the layer (and torch.compile)
on CUDA, and devices that disagree."""
import pytest
import torch
from torch import nn

from pykernels import reference
from pykernels.nn import QLoRALinear

from helpers import assert_each_within_rule
from test_qlora import check_against_reference, make_case, ours, run

pytestmark = pytest.mark.cuda  # conftest.py skips these without a CUDA device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims, in, out, r): 1, 3 and 16 tokens run the fused kernels, 17, 40,
# 2x100 and 512 the tiled path; 577 is not a multiple of the blocksize.
SHAPES = [((1,), 256, 128, 8), ((3,), 577, 193, 1), ((16,), 512, 256, 16), ((17,), 512, 256, 16),
          ((40,), 130, 70, 16), ((2, 100), 64, 96, 4), ((512,), 1024, 512, 16)]


def to_cuda(nf4, *tensors):
    return (nf4.to("cuda"), *(None if t is None else t.cuda() for t in tensors))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, shape, double_quant):
    check_against_reference(*shape, dtype, double_quant, device="cuda")


@pytest.mark.parametrize("shape", [((3,), 130, 70, 16), ((40,), 130, 70, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_uses_the_cpu_mask(dtype, shape):
    check_against_reference(*shape, dtype, True, p=0.3, device="cuda")


def test_a_training_step_never_waits_for_the_device():
    """The double-quant offset is read by the kernels on the device: no .item()."""
    for tokens in (3, 64):
        nf4, bias, x, a, b, dy = to_cuda(*make_case((tokens,), 256, 128, 8, torch.bfloat16, True))
        step = lambda: run(ours(nf4, bias, 2.0), x, a, b, dy)
        step()  # warm-up: cuBLAS handles, the allocator's first blocks
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_registered_for_cuda():
    for name in ("qlora_linear", "qlora_linear_backward", "nf4_linear", "nf4_linear_grad_input",
                 "ia3_nf4_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pykernels::{name}", "CUDA"), name


@pytest.mark.parametrize("tokens", [5, 40])
def test_opcheck(tokens):
    nf4, bias, x, a, b, _ = to_cuda(*make_case((tokens,), 130, 70, 4, torch.float32))
    args = (x, nf4.packed, nf4.absmax, nf4.blocksize, 70, bias, nf4.absmax_scale, nf4.absmax_code,
            nf4.absmax_offset, a.requires_grad_(), b.requires_grad_(), 2.0, 0.1,
            torch.tensor(3, dtype=torch.int64))
    torch.library.opcheck(torch.ops.pykernels.qlora_linear, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_on_cuda_matches_the_cpu_layer(dtype):
    """The CPU layer's state on CUDA: y and every gradient within the rule against
    the float64 truth on the CPU layer's weights (W decoded), both paths; the
    compiled layer gives the eager one's bits."""
    torch.manual_seed(4)
    layer = QLoRALinear.from_linear(nn.Linear(320, 192).to(dtype), r=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight, std=0.05)
    layer_c = QLoRALinear.from_linear(nn.Linear(320, 192).to(dtype), r=8, alpha=16).cuda()
    layer_c.load_state_dict({k: v.cuda() for k, v in layer.state_dict().items()})
    weights = [layer.base_layer.dequantize(torch.float32), layer.base_layer.bias.detach(),
               layer.lora_A.weight.detach(), layer.lora_B.weight.detach()]

    def reference_for(x, dy):
        def run_in(dt, dev):
            w, bias, a, b = (t.to(dev, dt) for t in weights)
            fn = lambda x_, a_, b_: reference.lora_linear(x_, w, bias, a_, b_, layer.scaling)
            return run(fn, x.to(dev, dt), a, b, dy.to(dev, dt))
        return run_in

    g = torch.Generator().manual_seed(5)
    for tokens in (2, 37):
        x = torch.randn(3, tokens, 320, generator=g).to(dtype)
        dy = torch.randn(3, tokens, 192, generator=g).to(dtype)
        layer_c.zero_grad(set_to_none=True)
        xi = x.cuda().requires_grad_()
        y = layer_c(xi)
        y.backward(dy.cuda())
        got = (y.detach(), xi.grad, layer_c.lora_A.weight.grad, layer_c.lora_B.weight.grad)
        assert_each_within_rule(("y", "dx", "dA", "dB"), got, reference_for(x, dy), dtype, "cuda",
                                f"layer {dtype} T={tokens}")
    compiled = torch.compile(layer_c.eval(), fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 320, dtype=dtype, device="cuda")
    with torch.no_grad():
        assert torch.equal(compiled(x), layer_c(x))


def test_devices_that_disagree_are_named():
    nf4, bias, x, a, b, dy = make_case((5,), 130, 70, 4, torch.float32)
    nf4_c, bias_c, x_c, a_c, b_c = to_cuda(nf4, bias, x, a, b)
    with pytest.raises(ValueError, match="lora_A"):
        ours(nf4_c, bias_c, 1.0)(x_c, a, b_c)
    with pytest.raises(ValueError, match="packed"):
        ours(nf4, bias_c, 1.0)(x_c, a_c, b_c)
    y, xa = torch.ops.pykernels.qlora_linear(
        x_c, nf4_c.packed, nf4_c.absmax, nf4.blocksize, 70, bias_c, nf4_c.absmax_scale,
        nf4_c.absmax_code, nf4_c.absmax_offset, a_c, b_c, 1.0, 0.0, torch.tensor(0))
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.pykernels.qlora_linear_backward(
            dy, None, x_c, nf4_c.packed, nf4_c.absmax, nf4.blocksize, nf4_c.absmax_scale,
            nf4_c.absmax_code, nf4_c.absmax_offset, a_c, b_c, xa, 1.0, 0.0, torch.tensor(0), True)
