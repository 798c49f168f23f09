"""Many bottleneck adapters at one site, each batch row picking its own: the op
(ops.multi_bottleneck) against the plain-PyTorch reference (forward and every
gradient, fp32 / bf16 / fp16 by the tolerance rule) over heterogeneous adapters,
-1 rows, one adapter for all rows, empty batches; float64 gradcheck; opcheck;
None gradients for adapters no row picked; bad input; CUDA against the CPU. The
layer (MultiBottleneckAdapter, add_bottleneck_adapters(name=...)): a mixed batch
against each row run alone and the reference, task isolation, one
set_adapter_ids for a model holding multi-LoRA and multi-bottleneck layers,
torch.compile, insertion and removal of named adapters, bad ids."""
import math

import pytest
import torch
from torch import nn

from pykernels import ops, reference
from pykernels.nn import (AdaptedModule, MultiBottleneckAdapter, MultiLoRALinear, RowAdapterLayer,
                          adapter_ids, add_bottleneck_adapters, remove_bottleneck_adapters,
                          set_adapter_ids)

from helpers import assert_rule
from test_bottleneck import tiny_llama

D = 40
# name: (bottleneck_dim, act, scale): the adapters of one site may differ in all three
SPECS = {"t0": (6, "relu", 1.0), "t1": (3, "gelu", 0.5), "t2": (9, "silu", 2.0)}
IDS = [2, -1, 0, 2, 1, 0, -1]  # mixed: groups consecutive and not, unadapted rows


def multi(dtype=torch.float32, seed=0, device="cpu"):
    """A MultiBottleneckAdapter holding SPECS, up weights nonzero so each adapter matters."""
    layer = MultiBottleneckAdapter(D)
    g = torch.Generator().manual_seed(seed)
    for name, (m, act, scale) in SPECS.items():
        layer.add_adapter(name, bottleneck_dim=m, act=act, scale=scale, dtype=dtype)
        with torch.no_grad():
            for p in layer.adapters[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return layer.to(device)


def reference_rows(layer, h, residual, ids, dtype, device="cpu"):
    """The batch row by row through reference.bottleneck_adapter in ``dtype`` on
    ``device`` (-1: the residual), differentiable to h, residual and (copies of) the
    adapters' weights."""
    weights = {n: [p.detach().to(device, dtype).requires_grad_() for p in a.parameters()]
               for n, a in layer.adapters.items()}
    rows = []
    for i, a in enumerate(ids):
        base = h[i] if residual is None else residual[i]
        if a < 0:
            rows.append(base)
            continue
        name = layer.adapter_names[a]
        _, act, scale = SPECS[name]
        rows.append(reference.bottleneck_adapter(
            h[i], *weights[name], act, scale, None if residual is None else residual[i]))
    return torch.stack(rows), weights


def inputs(dtype, parallel, device="cpu"):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(len(IDS), 5, D, generator=g)
    residual = torch.randn(len(IDS), 5, D, generator=g) if parallel else None
    dy = torch.randn(len(IDS), 5, D, generator=g)
    return tuple(None if t is None else t.to(device, dtype) for t in (h, residual, dy))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_matches_reference_forward_and_grads(dtype, parallel, device):
    layer = multi(dtype, device=device)
    h0, r0, dy = inputs(dtype, parallel, device)
    h = h0.clone().requires_grad_()
    r = None if r0 is None else r0.clone().requires_grad_()
    out = layer(h, r, adapter_ids=torch.tensor(IDS))
    out.backward(dy)
    got = {"out": out, "dh": h.grad, "dr": None if r is None else r.grad}
    got |= {f"{n}.{k}": p.grad for n, a in layer.adapters.items()
            for k, p in a.named_parameters()}

    def ref(dt, dev):  # in bf16 on the layer's device: its error is that of cuBLAS's sums there
        hr = h0.detach().to(dev, dt).requires_grad_()
        rr = None if r0 is None else r0.detach().to(dev, dt).requires_grad_()
        o, weights = reference_rows(layer, hr, rr, IDS, dt, dev)
        o.backward(dy.to(dev, dt))
        res = {"out": o, "dh": hr.grad, "dr": None if rr is None else rr.grad}
        for n, ws in weights.items():
            res |= {f"{n}.{k}": w.grad for (k, _), w in
                    zip(layer.adapters[n].named_parameters(), ws)}
        return res

    truth, lowp = ref(torch.float64, "cpu"), ref(dtype, device)
    for key, value in got.items():
        if value is None:
            assert truth[key] is None, key
        elif dtype == torch.float32:
            torch.testing.assert_close(value.cpu().double(), truth[key], rtol=1e-5, atol=1e-5,
                                       msg=key)
        else:
            assert_rule(value.cpu(), lowp[key].cpu(), truth[key], key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_equal_each_row_alone_and_minus_one_is_the_base(dtype):
    layer = multi(dtype)
    h, _, _ = inputs(dtype, False)
    with torch.no_grad():
        out = layer(h, adapter_ids=torch.tensor(IDS))
        for i, a in enumerate(IDS):
            if a < 0:
                assert torch.equal(out[i], h[i])
                continue
            alone = layer.adapters[layer.adapter_names[a]](h[i:i + 1])[0]
            if dtype == torch.float32:
                torch.testing.assert_close(out[i], alone, rtol=1e-6, atol=1e-6)
            else:  # the same op on other rows of the same tiles: bf16 rounding only
                torch.testing.assert_close(out[i], alone, rtol=1.6e-2, atol=1e-2)
        # names, a 1-D h, the active adapter, no ids: the same rows
        names = [None if a < 0 else layer.adapter_names[a] for a in IDS]
        assert torch.equal(layer(h, adapter_ids=names), out)
        torch.testing.assert_close(layer(h[3, 0], adapter_ids=torch.tensor([2])), out[3, 0])
        assert torch.equal(layer(h), h)
        layer.set_adapter("t1")
        assert torch.equal(layer(h), layer.adapters["t1"](h))


def test_task_isolation():
    """Training t0 on its rows, one AdamW (weight decay) over every adapter, leaves the
    other adapters' outputs bit-identical: they get no gradient at all."""
    layer = multi(torch.bfloat16)
    h, _, _ = inputs(torch.bfloat16, False)
    probe_ids = torch.tensor([1, 2, -1, 2, 1, 1, 2])
    with torch.no_grad():
        before = layer(h, adapter_ids=probe_ids)
        t0_before = layer(h, adapter_ids=torch.zeros(len(IDS), dtype=torch.int64))
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    train_ids = torch.tensor([0, -1, 0, 0, -1, 0, 0])
    for _ in range(3):
        opt.zero_grad()
        layer(h, adapter_ids=train_ids).float().square().mean().backward()
        assert all(p.grad is None for n in ("t1", "t2") for p in layer.adapters[n].parameters())
        opt.step()
    with torch.no_grad():
        assert torch.equal(layer(h, adapter_ids=probe_ids), before)
        assert not torch.equal(layer(h, adapter_ids=torch.zeros(len(IDS), dtype=torch.int64)),
                               t0_before)


def test_compile_fullgraph():
    layer = multi()
    h, r, _ = inputs(torch.float32, True)
    ids = torch.tensor(IDS)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(h, r, adapter_ids=ids), layer(h, r, adapter_ids=ids))
    compiled(h, r, adapter_ids=ids).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    layer(h, r, adapter_ids=ids).sum().backward()
    for g, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"ids\[2\] = 3 is out of range \[-1, 3\)"):
        compiled(h, r, adapter_ids=torch.tensor([0, 1, 3, 0, 0, 0, 0]))


# ---- the op ----

def adapter_lists(dtype, device="cpu", d=D, specs=SPECS.values(), seed=2):
    """[w_down], [b_down], [w_up], [b_up], [act], [scale] of heterogeneous adapters."""
    g = torch.Generator().manual_seed(seed)
    lists = ([], [], [], [])
    for m, _, _ in specs:
        for lst, shape in zip(lists, ((m, d), (m,), (d, m), (d,))):
            lst.append((torch.randn(shape, generator=g) / math.sqrt(shape[-1])).to(device, dtype))
    return (*lists, [act for _, act, _ in specs], [scale for _, _, scale in specs])


def run_op(fn, h, residual, weights, dy):
    """fn(h, residual, *weights) and its gradients: (out, dh, dr, [dw per weight list])."""
    h = h.detach().clone().requires_grad_()
    residual = None if residual is None else residual.detach().clone().requires_grad_()
    weights = [[w.detach().clone().requires_grad_() for w in ws] for ws in weights]
    out = fn(h, residual, *weights)
    out.backward(dy)
    return (out.detach(), h.grad, None if residual is None else residual.grad,
            [[w.grad for w in ws] for ws in weights])


def op_fn(impl, acts, scales, ids):
    return lambda h, r, *w: impl(h, *w, acts, scales, ids, residual=r)


ID_CASES = {"mixed": IDS, "one adapter": [1] * 7, "none": [-1] * 7,
            "scattered": [0, 2, 0, 2, 0, 2, 0]}  # adapter 1 unpicked, groups not consecutive


@pytest.mark.parametrize("ids", ID_CASES.values(), ids=ID_CASES.keys())
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_matches_reference(dtype, parallel, ids):
    h, r, dy = inputs(dtype, parallel)
    *weights, acts, scales = adapter_lists(dtype)
    ids_t = torch.tensor(ids)
    ours = run_op(op_fn(ops.multi_bottleneck, acts, scales, ids_t), h, r, weights, dy)

    def ref(dt):
        return run_op(op_fn(reference.multi_bottleneck, acts, scales, ids_t), h.to(dt),
                      None if r is None else r.to(dt), [[w.to(dt) for w in ws] for ws in weights],
                      dy.to(dt))

    truth, lowp = ref(torch.float64), ref(dtype)
    for name, got, lo, want in zip(("out", "dh", "dr"), ours, lowp, truth):
        if want is None:  # the reference's graph leaves out an h no row reads
            assert got is None or not got.any(), name
        else:
            assert got.dtype == dtype and got.shape == want.shape, name
            assert_rule(got, lo, want, f"{name} {dtype}")
    for list_name, gots, los, wants in zip(("w_down", "b_down", "w_up", "b_up"), *(
            t[3] for t in (ours, lowp, truth))):
        for a, (got, lo, want) in enumerate(zip(gots, los, wants)):
            if a not in ids:  # no row picked it: no gradient, as the reference
                assert got is None and want is None, f"{list_name}[{a}]"
            else:
                assert_rule(got, lo, want, f"d{list_name}[{a}] {dtype}")


def test_one_adapter_for_every_row_is_bottleneck_adapter():
    """Every row on one adapter: one consecutive group, bottleneck_adapter's bits."""
    h, r, dy = inputs(torch.bfloat16, True)
    *weights, acts, scales = adapter_lists(torch.bfloat16)
    ids = torch.full((len(IDS),), 2)
    ours = run_op(op_fn(ops.multi_bottleneck, acts, scales, ids), h, r, weights, dy)
    single = run_op(lambda h, r, *w: ops.bottleneck_adapter(h, *(ws[2] for ws in w), acts[2],
                                                             scales[2], r), h, r, weights, dy)
    for got, want in zip(ours[:3], single[:3]):
        assert torch.equal(got, want)
    for ws, want in zip(ours[3], single[3]):
        assert torch.equal(ws[2], want[2]) and ws[0] is None and ws[1] is None


def test_noncontiguous_and_more_leading_dims():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 3, 2, D, generator=g).transpose(1, 2)
    r = torch.randn(4, 2, 3, 2 * D, generator=g)[..., :D]
    *weights, acts, scales = adapter_lists(torch.float32)
    ids = torch.tensor([2, 0, -1, 2])
    assert not h.is_contiguous() and not r.is_contiguous()
    got = ops.multi_bottleneck(h, *weights, acts, scales, ids, r)
    assert torch.equal(got, ops.multi_bottleneck(h.contiguous(), *weights, acts, scales, ids,
                                                 r.contiguous()))
    torch.testing.assert_close(got, reference.multi_bottleneck(h, *weights, acts, scales, ids, r),
                               rtol=1e-5, atol=1e-5)


def test_empty_batch():
    *weights, acts, scales = adapter_lists(torch.float32)
    h = torch.randn(0, 5, D, requires_grad=True)
    weights = [[w.requires_grad_() for w in ws] for ws in weights]
    out = ops.multi_bottleneck(h, *weights, acts, scales, torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 5, D)
    out.sum().backward()
    assert h.grad.shape == h.shape
    assert all(w.grad is None for ws in weights for w in ws)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(6)
    specs = [(2, "relu", 1.0), (3, "gelu", 0.5), (1, "silu", 2.0)]
    *weights, acts, scales = adapter_lists(torch.float64, d=5, specs=specs)
    flat = [w.requires_grad_() for ws in weights for w in ws]
    ids = torch.tensor([2, -1, 0, 2])

    def fn(h, r, *ws):
        lists = [list(ws[i * 3:i * 3 + 3]) for i in range(4)]
        return ops.multi_bottleneck(h, *lists, acts, scales, ids, r)

    h = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # adapter 1 is unpicked: its None gradients read as zeros
    torch.autograd.gradcheck(fn, (h, r, *flat))
    torch.autograd.gradcheck(lambda h, *ws: fn(h, None, *ws), (h, *flat))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    h, r, dy = inputs(dtype, True)
    *weights, acts, scales = adapter_lists(dtype)
    h.requires_grad_()
    for ws in weights:
        for w in ws:
            w.requires_grad_()
    ids = torch.tensor(IDS)
    for residual in (r, None):
        torch.library.opcheck(torch.ops.pykernels.multi_bottleneck.default,
                              (h, residual, *weights, scales, acts, ids, True))
    _, pre = torch.ops.pykernels.multi_bottleneck(h, r, *weights, scales, acts, ids, True)
    detached = [[w.detach() for w in ws] for ws in weights]
    torch.library.opcheck(torch.ops.pykernels.multi_bottleneck_backward.default,
                          (dy, h.detach(), pre.detach(), detached[0], detached[2], scales, acts,
                           ids, True, True))


def test_pre_holds_each_rows_pre_activation():
    h, _, _ = inputs(torch.float32, False)
    *weights, acts, scales = adapter_lists(torch.float32)
    _, pre = torch.ops.pykernels.multi_bottleneck(h, None, *weights, scales, acts,
                                                  torch.tensor(IDS), True)
    assert pre.shape == (len(IDS), 5, 9)
    for i, a in enumerate(IDS):
        m = 0 if a < 0 else weights[0][a].shape[0]
        if m:
            torch.testing.assert_close(pre[i, :, :m], torch.nn.functional.linear(
                h[i], weights[0][a], weights[1][a]), rtol=1e-5, atol=1e-5)
        assert not pre[i, :, m:].any()


def test_op_bad_input():
    h = torch.randn(3, 2, D)
    *weights, acts, scales = adapter_lists(torch.float32)
    ids = torch.tensor([0, -1, 2])
    call = ops.multi_bottleneck
    with pytest.raises(ValueError, match=r"multi_bottleneck: ids\[1\] = 3 is out of range "
                                         r"\[-1, 3\): adapter indices are in \[0, 3\) "
                                         r"\(n_adapters\), or -1 for no adapter"):
        call(h, *weights, acts, scales, torch.tensor([0, 3, 1]))
    with pytest.raises(TypeError, match="ids must be int64, got Int"):
        call(h, *weights, acts, scales, ids.int())
    with pytest.raises(ValueError, match=r"ids must be \[rows\], one adapter index per row of h "
                                         r"\(h.size\(0\) = 3\), got \[2\]"):
        call(h, *weights, acts, scales, ids[:2])
    with pytest.raises(ValueError,
                       match=r"w_up must hold one entry per adapter \(3, as w_down\), got 2"):
        call(h, weights[0], weights[1], weights[2][:2], weights[3], acts, scales, ids)
    with pytest.raises(ValueError, match=r"scales must hold one entry per adapter"):
        call(h, *weights, acts, scales[:1], ids)
    with pytest.raises(ValueError, match=r"acts\[1\] must be 'relu', 'gelu' or 'silu', got 'tanh'"):
        call(h, *weights, ["relu", "tanh", "silu"], scales, ids)
    with pytest.raises(TypeError, match=r"w_down\[2\] must have h's dtype Float, got BFloat16"):
        call(h, weights[0][:2] + [weights[0][2].bfloat16()], *weights[1:], acts, scales, ids)
    with pytest.raises(ValueError, match=r"w_up\[1\] must be \[d, bottleneck_dim\] = \[40, 3\]"):
        call(h, weights[0], weights[1], [weights[2][0], weights[2][0], weights[2][2]],
             weights[3], acts, scales, ids)
    with pytest.raises(ValueError, match=r"b_down\[0\] must be \[6\]"):
        call(h, weights[0], [weights[1][1]] * 3, *weights[2:], acts, scales, ids)
    with pytest.raises(ValueError, match="residual must have h's shape"):
        call(h, *weights, acts, scales, ids, h[:, :1])
    with pytest.raises(ValueError, match=r"h must have at least 2 dimensions"):
        call(h[0, 0], *weights, acts, scales, ids[:1])
    with pytest.raises(TypeError, match="h must be float32, float16, bfloat16 or float64"):
        call(h.int(), *weights, acts, scales, ids)


@pytest.mark.cuda
@pytest.mark.parametrize("ids", ID_CASES.values(), ids=ID_CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dtype, ids):
    """CUDA against the CPU (itself checked against the reference above) by the
    tolerance rule, the float64 reference the truth, forward and every gradient."""
    h, r, dy = inputs(dtype, True)
    *weights, acts, scales = adapter_lists(dtype)
    ids_t = torch.tensor(ids)
    cpu = run_op(op_fn(ops.multi_bottleneck, acts, scales, ids_t), h, r, weights, dy)
    cuda = run_op(op_fn(ops.multi_bottleneck, acts, scales, ids_t.cuda()), h.cuda(), r.cuda(),
                  [[w.cuda() for w in ws] for ws in weights], dy.cuda())
    truth = run_op(op_fn(reference.multi_bottleneck, acts, scales, ids_t), h.double(), r.double(),
                   [[w.double() for w in ws] for ws in weights], dy.double())
    for name, got, lo, want in zip(("out", "dh", "dr"), cuda, cpu, truth):
        assert got.device.type == "cuda"
        assert_rule(got.cpu(), lo, want, f"{name} {dtype}")
    for gots, los, wants in zip(cuda[3], cpu[3], truth[3]):
        for a, (got, lo, want) in enumerate(zip(gots, los, wants)):
            if a not in ids:
                assert got is None and lo is None
            else:
                assert_rule(got.cpu(), lo, want, f"grad {a} {dtype}")


# ---- a model: named insertion, one set_adapter_ids for LoRA and bottleneck layers ----

def multi_lora_and_bottleneck_llama():
    """A tiny Llama with MultiLoRALinear q/v projections and Pfeiffer bottleneck
    adapters, both holding adapters "a" and "b" (nonzero, so each one matters)."""
    model = tiny_llama().requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    for layer in model.model.layers:
        for proj in ("q_proj", "v_proj"):
            ours = MultiLoRALinear(getattr(layer.self_attn, proj))
            for name in ("a", "b"):
                ours.add_adapter(name, r=2)
                nn.init.normal_(ours.lora_B[name].weight, std=0.5, generator=g)
            setattr(layer.self_attn, proj, ours)
    for name in ("a", "b"):
        for item in add_bottleneck_adapters(model, "pfeiffer", bottleneck_dim=4, name=name):
            nn.init.normal_(item.adapter.up.weight, std=0.5, generator=g)
    return model


def test_one_set_adapter_ids_for_lora_and_bottleneck_layers():
    model = multi_lora_and_bottleneck_llama()
    layers = [m for m in model.modules() if isinstance(m, RowAdapterLayer)]
    assert {type(m) for m in layers} == {MultiLoRALinear, MultiBottleneckAdapter}
    tokens = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(5))
    names = ["b", "__base__", "a", "b"]
    with torch.no_grad():
        base = model(tokens).logits
        set_adapter_ids(model, names)
        assert all(m.row_ids is names for m in layers)
        got = model(tokens).logits
        set_adapter_ids(model, None)
        for i, name in enumerate(names):  # each row alone, its adapter active everywhere
            for m in layers:
                m.set_adapter(None if name == "__base__" else name)
            torch.testing.assert_close(got[i], model(tokens[i:i + 1]).logits[0], rtol=1e-5,
                                       atol=1e-5)
        assert torch.equal(got[1], base[1])
        for m in layers:  # the bottleneck adapters alone matter too
            m.set_adapter("a" if isinstance(m, MultiBottleneckAdapter) else None)
        assert not torch.allclose(model(tokens[2:3]).logits[0], base[2], atol=1e-3)
        for m in layers:
            m.set_adapter(None)
        with adapter_ids(model, torch.tensor([0, -1, 1, 1])):
            assert not torch.allclose(model(tokens).logits[0], base[0], atol=1e-3)
        assert all(m.row_ids is None for m in layers)


def test_named_insertion_and_removal():
    model = tiny_llama()
    with torch.no_grad():
        before = model(torch.arange(6)[None]).logits
    a = add_bottleneck_adapters(model, "pfeiffer", bottleneck_dim=4, name="a")
    b = add_bottleneck_adapters(model, "houlsby", reduction=8, act="gelu", name="b")
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, AdaptedModule) and isinstance(mlp.adapter, MultiBottleneckAdapter)
    assert mlp.adapter.adapter_names == ["a", "b"] and a[0].wrapper is b[1].wrapper
    assert b[1].adapter is mlp.adapter.adapters["b"] and b[1].adapter.bottleneck_dim == 4
    assert model.model.layers[1].self_attn.o_proj.adapter.adapter_names == ["b"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="adapter 'a' exists already"):
        add_bottleneck_adapters(model, "houlsby", name="a")  # o_proj is free, the mlp is not
    with pytest.raises(ValueError, match="holds serial adapters; .* share its placement"):
        add_bottleneck_adapters(model, "parallel", name="c")
    with pytest.raises(ValueError, match="already has an adapter; .* give every adapter a name"):
        add_bottleneck_adapters(model, "pfeiffer")
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        add_bottleneck_adapters(nn.Sequential(tiny_llama()), name="x.y")
    assert model.state_dict().keys() == state.keys()  # failed calls changed nothing
    assert model.model.layers[0].self_attn.o_proj.adapter.adapter_names == ["b"]
    remove_bottleneck_adapters(a)
    assert mlp.adapter.adapter_names == ["b"]
    remove_bottleneck_adapters(b)
    assert not any(isinstance(m, AdaptedModule) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(torch.arange(6)[None]).logits, before)


def test_delete_adapter_reindexes():
    layer = multi()
    h, _, _ = inputs(torch.float32, False)
    with torch.no_grad():
        want = layer(h, adapter_ids=torch.tensor(IDS))
        layer.set_adapter("t1")
        layer.delete_adapter("t1")
        assert layer.active_adapter is None and layer.adapter_names == ["t0", "t2"]
        moved = torch.tensor([1, -1, 0, 1, -1, 0, -1])
        got = layer(h, adapter_ids=moved)
    for i, a in enumerate(IDS):
        if a != 1:
            assert torch.equal(got[i], want[i])


# ---- bad input ----

def test_bad_ids():
    layer = multi()
    h = torch.randn(3, 2, D)
    with pytest.raises(ValueError, match=r"ids\[1\] = 3 is out of range \[-1, 3\)"):
        layer(h, adapter_ids=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"ids\[2\] = -2 is out of range \[-1, 3\)"):
        layer(h, adapter_ids=torch.tensor([0, 1, -2]))
    with pytest.raises(ValueError, match=r"must have shape \[3\] .*got \[2\]"):
        layer(h, adapter_ids=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="must be int64, got torch.int32"):
        layer(h, adapter_ids=torch.tensor([0, 1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="2 adapter names for 3 rows"):
        layer(h, adapter_ids=["t0", "t1"])
    with pytest.raises(KeyError, match="MultiBottleneckAdapter: no adapter 'zz'"):
        layer(h, adapter_ids=["t0", "zz", None])
    with pytest.raises(KeyError, match="no adapter 'zz'"):
        layer.set_adapter("zz")
    with pytest.raises(ValueError, match="exists already"):
        layer.add_adapter("t0")
    with pytest.raises(TypeError, match=r"w_down\[0\] must have h's dtype"):
        layer(h.bfloat16(), adapter_ids=torch.tensor([0, -1, 1]))
