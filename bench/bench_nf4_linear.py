"""NF4 linear on the CPU: pykernels' NF4Linear vs bitsandbytes' Linear4bit vs a
dense nn.Linear, at 1 token (decoding), 32 and 512 (prefill, training).

The weight is [4096, 4096] (quick: [1024, 1024]), quantized with double
quantization on both sides (bnb's compress_statistics=True), with a bias.
"forward" runs without autograd: bitsandbytes then takes its inference path
(the module in eval mode, an input without grad: it repacks W once for its own
bf16 CPU kernel). "forward + backward" runs in training mode with x requiring
grad and times y.backward(g), which yields dx (W is frozen): bitsandbytes then
dequantizes W whole and calls linear. The dense nn.Linear holds the decoded
weight in the input dtype: the time to beat, with 4x the memory.

Targets, against the machine and the peers timed in the same run:
- 1 token: within 1.2x of the time to read the packed codes once at the
  machine's copy bandwidth (the kernel is memory-bound);
- no slower than bitsandbytes' inference path at 1 token, nor than its
  training path at any token count.

    python bench/bench_nf4_linear.py [--quick] [--out DIR]
"""
from __future__ import annotations

import common  # first: it quiets the peers' import-time logging

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402

from pykernels import reference  # noqa: E402
from pykernels.nn import NF4Linear  # noqa: E402

SHAPE, QUICK_SHAPE = (4096, 4096), (1024, 1024)  # [out, in]
TOKENS = (1, 32, 512)
DTYPES = (torch.bfloat16, torch.float32)


def _check_close(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    # Timing a wrong answer is worse than no timing: both within bf16-level error.
    scale = ref.abs().max().item()
    for name, y in (("pykernels", ours), (what, theirs)):
        if (y.float() - ref).abs().max().item() > 0.05 * scale:
            raise RuntimeError(f"bench_nf4_linear: {name} is far from the reference; fix it first")


def layers(shape, dtype):
    """(dense nn.Linear, NF4Linear, bnb eval Linear4bit, bnb train Linear4bit) on one weight."""
    out_features, in_features = shape
    dense = torch.nn.Linear(in_features, out_features).to(dtype).requires_grad_(False)
    ours = NF4Linear.from_linear(dense, double_quant=True)
    peers = []
    for train in (False, True):
        peer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=dtype,
                                 quant_type="nf4", compress_statistics=True)
        peer.load_state_dict(dense.state_dict())
        peers.append(peer.to("cpu").train(train).requires_grad_(False))
    dense.weight.copy_(ours.dequantize(dtype))  # the same numbers, decoded
    return dense, ours, peers[0], peers[1]


def bench_case(shape, dtype, tokens: int, min_time: float) -> list[dict]:
    dense, ours, peer_eval, peer_train = layers(shape, dtype)
    x = torch.randn(tokens, shape[1], dtype=dtype)
    g = torch.randn(tokens, shape[0], dtype=dtype)
    with torch.no_grad():
        ref = reference.nf4_linear(x, ours.nf4_weight(), dense.bias)
        _check_close(ours(x), peer_eval(x), ref, "bitsandbytes")

    def backward(layer):
        def call():
            x_grad = x.detach().requires_grad_()
            layer(x_grad).backward(g)
        return call

    def no_grad(layer):
        def call():
            with torch.no_grad():
                layer(x)
        return call

    cases = {
        "forward": {"pykernels": no_grad(ours), "bitsandbytes (inference)": no_grad(peer_eval),
                    "dense nn.Linear": no_grad(dense)},
        "forward + backward": {"pykernels": backward(ours),
                               "bitsandbytes (training)": backward(peer_train),
                               "dense nn.Linear": backward(dense)},
    }
    rows = []
    for op, impls in cases.items():
        for impl, t in common.measure(impls, min_time).items():
            rows.append({"kind": "time", "bench": "nf4_linear", "op": op, "impl": impl,
                         "shape": "x".join(map(str, shape)), "dtype": common.dtype_name(dtype),
                         "tokens": tokens, **t.fields()})
    return rows


def ratios(rows: list[dict], copy: dict, shape) -> list[dict]:
    """The targets from median times (``met``) and from the best calls (``value (min)``)."""
    by_key = {(r["op"], r["impl"], r["dtype"], r["tokens"]): r for r in rows}
    packed_bytes = shape[0] * shape[1] // 2
    out = []

    def add(name, dtype, tokens, value, target):
        out.append({"kind": "ratio", "bench": "nf4_linear", "ratio": name, "dtype": dtype,
                    "tokens": tokens, "value": value("median_ms"), "value (min)": value("min_ms"),
                    "target": f">= {target:.3g}", "met": value("median_ms") >= target})

    for dtype, tokens in dict.fromkeys((r["dtype"], r["tokens"]) for r in rows):
        ours = by_key[("forward", "pykernels", dtype, tokens)]
        if tokens == 1:
            stream_ms = packed_bytes / (copy["value"] * 1e9) * 1e3
            stream_best_ms = stream_ms * copy["median_ms"] / copy["min_ms"]
            add("forward: packed bytes at copy bandwidth / pykernels time", dtype, tokens,
                lambda stat: (stream_ms if stat == "median_ms" else stream_best_ms) / ours[stat],
                1 / 1.2)
            peer = by_key[("forward", "bitsandbytes (inference)", dtype, tokens)]
            add("forward: bitsandbytes inference time / pykernels", dtype, tokens,
                lambda stat: peer[stat] / ours[stat], 1)
        trained = by_key[("forward + backward", "pykernels", dtype, tokens)]
        peer = by_key[("forward + backward", "bitsandbytes (training)", dtype, tokens)]
        add("forward + backward: bitsandbytes training time / pykernels", dtype, tokens,
            lambda stat: peer[stat] / trained[stat], 1)
    return out


def run(args) -> list[dict]:
    copy = common.machine_limits(args.quick)[0]
    min_time = 0.1 if args.quick else 0.5
    shape = QUICK_SHAPE if args.quick else SHAPE
    torch.manual_seed(0)
    rows = []
    for dtype in DTYPES:
        for tokens in TOKENS:
            rows += bench_case(shape, dtype, tokens, min_time)
    return rows + ratios(rows, copy, shape)


if __name__ == "__main__":
    common.main({"nf4_linear": __name__})
