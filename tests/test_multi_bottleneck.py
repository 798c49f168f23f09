"""Many bottleneck adapters at one site, each batch row picking its own
(MultiBottleneckAdapter, add_bottleneck_adapters(name=...)): a mixed batch
against each row run alone and against the plain-PyTorch reference (forward
and gradients, fp32 and bf16 by the tolerance rule), -1 rows, task isolation,
one set_adapter_ids for a model holding multi-LoRA and multi-bottleneck layers,
torch.compile, insertion and removal of named adapters, bad ids."""
import math

import pytest
import torch
from torch import nn

from pykernels import reference
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
    with pytest.raises(RuntimeError, match=r"adapter ids out of range \[-1, 3\)"):
        compiled(h, r, adapter_ids=torch.tensor([0, 1, 3, 0, 0, 0, 0]))


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
    with pytest.raises(TypeError, match="w_down must have h's dtype"):
        layer(h.bfloat16(), adapter_ids=torch.tensor([0, -1, 1]))
