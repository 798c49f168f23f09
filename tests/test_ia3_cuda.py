"""IA³ and prompt tuning on CUDA, with the CPU ops as the oracle (tests/test_ia3.py
and tests/test_prompt.py hold those to the reference and to peft): ia3_scale and
grad_input bit for bit with the CPU (the same fp32 arithmetic, rounded once),
grad_l within the tolerance rule (summed in another order); ia3_nf4_linear within
the rule against the float64 truth; the fp32 layer over dense and NF4 bases;
prompt_embed byte for byte, and its bad-id error."""
import pytest
import torch
from torch import nn

from pykernels import ops, reference
from pykernels.nn import IA3Linear, NF4Linear, PromptEmbedding

from helpers import assert_each_within_rule, assert_rule
from test_ia3 import _nf4_case, _nf4_grads

pytestmark = pytest.mark.cuda  # conftest.py skips these without a CUDA device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_ops = torch.ops.pykernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 129), (2, 5, 65), (4096, 3)])  # 4096 rows: slabs
@pytest.mark.parametrize("with_bias", [False, True])
def test_scale_matches_cpu(dtype, shape, with_bias):
    torch.manual_seed(0)
    v = torch.randn(shape).to(dtype)
    g = torch.randn(shape).to(dtype)
    l = torch.rand(shape[-1]) + 0.5
    b = torch.randn(shape[-1]).to(dtype) if with_bias else None
    bc = None if b is None else b.cuda()
    assert torch.equal(ops.ia3_scale(v.cuda(), l.cuda(), bc).cpu(), ops.ia3_scale(v, l, b))
    dv, dl = _ops.ia3_scale_backward(g.cuda(), v.cuda(), bc, l.cuda(), True)
    dv_cpu, dl_cpu = _ops.ia3_scale_backward(g, v, b, l, True)
    assert torch.equal(dv.cpu(), dv_cpu)
    vb = v.double() if b is None else v.double() + b.double()
    truth = (g.double() * vb).reshape(-1, shape[-1]).sum(0)
    assert_rule(dl.cpu(), dl_cpu, truth, f"grad_l {dtype}")


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_layer_matches_cpu(kind, feedforward):
    torch.manual_seed(3)
    lin = nn.Linear(70, 48)
    base = NF4Linear.from_linear(lin) if kind == "nf4" else lin
    layer = IA3Linear.from_linear(base, feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    x = torch.randn(2, 20, 70)
    y = layer(x)
    y.square().sum().backward()
    grad_l = layer.ia3_l.grad.clone()
    layer.zero_grad()
    layer.cuda()
    y_cuda = layer(x.cuda())
    y_cuda.square().sum().backward()
    torch.testing.assert_close(y_cuda.cpu(), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.ia3_l.grad.cpu(), grad_l, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_folds_l_into_the_cpu_tile(dtype, double_quant):
    """x = I (70 tokens: the tiled path on both devices) makes y the decoded tile
    of W·diag(l), transposed: the CUDA decoder's bits equal the CPU's."""
    base, _, l = _nf4_case(dtype, 1, double_quant)
    eye = torch.eye(70).to(dtype)
    args = lambda dev: (base.packed.to(dev), base.absmax.to(dev), 48, l.to(dev), 64, None,
                        *(None if t is None else t.to(dev)
                          for t in (base.absmax_scale, base.absmax_code, base.absmax_offset)))
    y = ops.ia3_nf4_linear(eye.cuda(), *args("cuda"))
    assert torch.equal(y.cpu(), ops.ia3_nf4_linear(eye, *args("cpu")))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [3, 40])  # the fused few-token path and the tiled path
def test_nf4_linear_matches_reference(dtype, tokens):
    base, x, l = _nf4_case(dtype, tokens, True)
    bias = base.bias.detach().to(dtype)
    w = base.dequantize(torch.float32)
    b = base.cuda()
    got = _nf4_grads(base, x.cuda(), l.cuda(), dtype, lambda x, l: ops.ia3_nf4_linear(
        x, b.packed, b.absmax, 48, l, 64, bias.cuda(), b.absmax_scale, b.absmax_code,
        b.absmax_offset))

    def spec(dt, dev):  # peft's (x ⊙ l)·Wᵀ + b in dt; l stays fp32 below float64, as in the layer
        l_dt = torch.float64 if dt == torch.float64 else l.dtype
        return _nf4_grads(base, x.to(dev, dt), l.to(dev, l_dt), dt, lambda x, l: nn.functional.linear(
            (x * l).to(dt), w.to(dev, dt), bias.to(dev, dt)))

    assert_each_within_rule(("out", "grad_x", "grad_l"), got, spec, dtype, "cuda", f"{dtype} T={tokens}")


def test_opcheck_and_compile():
    v = torch.randn(5, 9, device="cuda", requires_grad=True)
    l = torch.rand(9, device="cuda", requires_grad=True)
    torch.library.opcheck(_ops.ia3_scale.default, (v, None, l))
    ids = torch.randint(0, 50, (2, 5), device="cuda")
    torch.library.opcheck(_ops.prompt_embed.default,
                          (ids, torch.randn(50, 8, device="cuda"),
                           torch.randn(3, 8, device="cuda", requires_grad=True)))
    layer = IA3Linear.from_linear(nn.Linear(9, 7), feedforward=True).cuda()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(v.detach()), layer(v.detach()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prompt_embed_matches_cpu(dtype):
    weight = torch.randn(101, 33).to(dtype)
    prompt = torch.randn(4, 33).to(dtype)
    ids = torch.randint(0, 101, (3, 7))
    got = ops.prompt_embed(ids.cuda(), weight.cuda(), prompt.cuda())
    assert torch.equal(got.cpu(), reference.prompt_embed(ids, weight, prompt))
    layer = PromptEmbedding(4, 33).cuda()
    p = layer(ids.cuda(), weight.cuda())
    p.float().sum().backward()
    assert torch.equal(layer.embedding.weight.grad.cpu(), torch.full((4, 33), 3.0))


def test_prompt_embed_bad_id():
    weight, prompt = torch.randn(101, 8, device="cuda"), torch.randn(3, 8, device="cuda")
    ids = torch.tensor([[0, 1, 2], [3, 4, 101]], device="cuda")
    with pytest.raises(ValueError, match=r"input_ids\[1, 2\] = 101 is outside the vocabulary"):
        ops.prompt_embed(ids, weight, prompt)
