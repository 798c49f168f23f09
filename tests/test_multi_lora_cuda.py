"""Multi-LoRA on CUDA, with the CPU op as the oracle (tests/test_multi_lora.py holds
that to the reference and to peft): forward and every gradient within the
tolerance rule of DESIGN §4 against the float64 truth, the dropout mask the
CPU's (one hash), float64 gradcheck, opcheck, the layer under torch.compile."""
import pytest
import torch

from pykernels import ops, reference

from helpers import assert_rule
from test_multi_lora import CASES, layer_with_adapters, make, run

pytestmark = pytest.mark.cuda  # conftest.py skips these without a CUDA device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("case", CASES + [(64, 32, 256, 96, 16, 16, list(range(-1, 15)) * 4)])
def test_matches_reference(case, p, dtype):
    rows, tokens, n_in, n_out, r, n, id_list = case
    x, base, a, b, scales = make(rows, tokens, n_in, n_out, r, n, dtype)
    ids = torch.tensor(id_list, dtype=torch.int64)
    dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    mask = ops.lora_dropout_mask(x.shape, p, 11) if p > 0 else None
    got = run(lambda *t: ops.multi_lora(*t, scales.cuda(), ids.cuda(), p, 11),
              *(t.cuda() for t in (x, base, a, b)), dy.cuda())

    def ref(dt):
        return run(lambda *t: reference.multi_lora(*t, scales, ids, mask),
                   *(t.to(dt) for t in (x, base, a, b)), dy.to(dt))

    truth, lowp = ref(torch.float64), ref(dtype)
    for name, g, lo, want in zip(("y", "dx", "dbase", "dA", "dB"), got, lowp, truth):
        assert g.is_cuda and g.dtype == dtype and g.shape == want.shape, name
        if want.numel():
            assert_rule(g.cpu(), lo, want, f"{name} {dtype} p={p} {case[:6]}")


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


def test_layer_compiled_matches_cpu():
    layer = layer_with_adapters(dtype=torch.bfloat16)
    x = torch.randn(4, 3, 48).bfloat16()
    ids = ["c", None, "a", "b"]
    with torch.no_grad():
        want = layer(x, adapter_ids=ids)
        layer.cuda()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        got = compiled(x.cuda(), adapter_ids=torch.tensor([2, -1, 0, 1], device="cuda"))
    torch.testing.assert_close(got.cpu(), want, rtol=2e-2, atol=2e-2)


def test_devices_must_agree():
    x, base, a, b, scales = make(2, 2, 16, 8, 2, 2, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="ids"):
        ops.multi_lora(x.cuda(), base.cuda(), a.cuda(), b.cuda(), scales.cuda(),
                       torch.tensor([0, 1]))
