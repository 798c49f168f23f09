"""Multi-LoRA on CUDA, with the CPU op as the oracle (tests/test_multi_lora.py holds
that to the reference and to peft): forward and every gradient within the
tolerance rule of DESIGN §4 against the float64 truth, the dropout mask the
CPU's (one hash), float64 gradcheck, opcheck, the layer under torch.compile."""
import pytest
import torch

from pykernels import ops, reference

from helpers import assert_each_within_rule
from test_multi_lora import CASES, check_against_reference, layer_with_adapters, make

pytestmark = pytest.mark.cuda  # conftest.py skips these without a CUDA device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("case", CASES + [(64, 32, 256, 96, 16, 16, list(range(-1, 15)) * 4)])
def test_matches_reference(case, p, dtype):
    check_against_reference(case, p, dtype, device="cuda")


def test_gradcheck_float64():
    x, base, a, b, scales = (t.cuda() for t in make(3, 2, 6, 5, 2, 3, torch.float64))
    ids = torch.tensor([2, -1, 0], device="cuda")
    torch.autograd.gradcheck(lambda *t: ops.multi_lora(*t, scales, ids, 0.4, 9),
                             tuple(t.requires_grad_() for t in (x, base, a, b)))


def test_opcheck():
    x, base, a, b, scales = (t.cuda() for t in make(3, 4, 33, 17, 4, 3, torch.float32))
    ids = torch.tensor([1, -1, 1], device="cuda")
    for t in (x, a, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.pykernels.multi_lora.default,
                          (x, base, a, b, scales, ids, 0.2, torch.tensor(5)))


def test_layer_compiled_matches_reference():
    """The CPU layer moved to CUDA and compiled: a mixed batch within the rule against
    the float64 truth on its weights (reference.multi_lora over the base linear)."""
    layer = layer_with_adapters(dtype=torch.bfloat16)
    x = torch.randn(4, 3, 48).bfloat16()
    ids = torch.tensor([2, -1, 0, 1])  # c, none, a, b
    names = ("a", "b", "c")
    base_w, base_b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    a = torch.stack([layer.lora_A[n].weight.detach() for n in names])
    b = torch.stack([layer.lora_B[n].weight.detach() for n in names])
    scales = torch.tensor([layer.scaling[n] for n in names])

    def spec(dt, dev):
        xd = x.to(dev, dt)
        base = torch.nn.functional.linear(xd, base_w.to(dev, dt), base_b.to(dev, dt))
        return (reference.multi_lora(xd, base, a.to(dev, dt), b.to(dev, dt), scales, ids.to(dev)),)

    with torch.no_grad():
        layer.cuda()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        got = compiled(x.cuda(), adapter_ids=ids.cuda())
        assert_each_within_rule(("y",), (got,), spec, torch.bfloat16, "cuda", "compiled layer")


def test_devices_must_agree():
    x, base, a, b, scales = make(2, 2, 16, 8, 2, 2, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="ids"):
        ops.multi_lora(x.cuda(), base.cuda(), a.cuda(), b.cuda(), scales.cuda(),
                       torch.tensor([0, 1]))
