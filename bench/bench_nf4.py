"""NF4 on the CPU: pykernels vs bitsandbytes vs torchao vs the plain-PyTorch reference.

Targets, checked in the "ratio" rows against peers timed in the same run:
- quantize at least 50x faster than bitsandbytes' quantize_4bit;
- dequantize into a preallocated output at >= 85% of the machine's copy
  bandwidth, counting bytes read (packed + absmax) and written (output);
- and no slower than bitsandbytes' own C kernel writing into a preallocated output.

Each op group is timed with its implementations' calls interleaved, and
allocates on every side or on none: "quantize", "dequantize" and their "double"
variants allocate their outputs; "dequantize into" writes into a buffer made once.
Allocating a large output costs more than decoding into it here (page faults:
4096x4096 bf16 dequantize, 16 ms allocating vs 3 ms into a buffer). torchao's NF4
always double-quantizes and rounds to the nearest code of a rounded table
(DESIGN.md §2), so it sits beside our double quant. GB/s counts the bytes of the
plain format (dense weight + packed + absmax) for every row, so it reads as
throughput across rows. Every result is checked against bitsandbytes' bytes
before it is timed.

    python bench/bench_nf4.py [--quick] [--out DIR]
"""
from __future__ import annotations

import ctypes as ct
from pathlib import Path

import common  # first: it quiets the peers' import-time logging

import bitsandbytes.functional as bnb_f  # noqa: E402
import torch  # noqa: E402
from bitsandbytes.cextension import lib as bnb_lib  # noqa: E402
from torchao.quantization import to_nf4  # noqa: E402

from pykernels import NF4Tensor, _C, ops, reference  # noqa: E402

SHAPES = ((4096, 4096), (8192, 8192))
QUICK_SHAPES = ((1024, 1024),)
DTYPES = (torch.bfloat16, torch.float32)
BLOCKSIZE = 64


def bnb_dequantize_into(packed: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor) -> None:
    """bitsandbytes' CPU NF4 kernel into ``out``: the ctypes call its
    backends/cpu/ops.py makes, without the torch.empty before it."""
    kernel = getattr(bnb_lib, f"cdequantize_blockwise_cpu_nf4_{common.dtype_name(out.dtype)}")
    cols = out.shape[-1]
    kernel(ct.c_void_p(packed.data_ptr()), ct.c_void_p(absmax.data_ptr()),
           ct.c_void_p(out.data_ptr()), ct.c_longlong(BLOCKSIZE),
           ct.c_longlong(out.numel() // cols), ct.c_longlong(cols))


def _check(ok: bool, what: str) -> None:
    # Timing a wrong answer is worse than no timing.
    if not ok:
        raise RuntimeError(f"bench_nf4: {what} differ; fix the kernels before timing them")


def _time_op(op: str, impls: dict, w: torch.Tensor, min_time: float, copy: float) -> list[dict]:
    """One "time" row per implementation of ``op`` on ``w``, the calls interleaved."""
    moved = w.numel() * w.element_size() + w.numel() // 2 + w.numel() // BLOCKSIZE * 4
    rows = []
    for impl, t in common.measure(impls, min_time).items():
        gbps = moved / t.median_s / 1e9
        rows.append({"kind": "time", "bench": "nf4", "op": op, "impl": impl,
                     "shape": "x".join(map(str, w.shape)), "dtype": common.dtype_name(w.dtype),
                     **t.fields(), "GB/s": gbps, "% copy": 100 * gbps / copy})
    return rows


def bench_shape(w: torch.Tensor, small: bool, min_time: float, copy: float) -> list[dict]:
    """Every implementation on one weight; the slow pure-PyTorch ones only when ``small``."""
    shape, dtype = w.shape, w.dtype
    packed, absmax = ops.nf4_quantize(w)
    bnb_packed, bnb_state = bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4")
    out, bnb_out = torch.empty_like(w), torch.empty_like(w)
    bnb_dequantize_into(bnb_packed, bnb_state.absmax, bnb_out)
    _check(torch.equal(packed, bnb_packed.view(-1)) and torch.equal(absmax, bnb_state.absmax),
           "pykernels and bitsandbytes NF4 codes or absmax")
    _check(torch.equal(ops.nf4_dequantize(packed, absmax, shape, dtype, out=out), bnb_out),
           "pykernels and bitsandbytes dequantized weights")
    double = NF4Tensor.quantize(w, double_quant=True)
    ao = to_nf4(w)

    ops_impls = {
        "quantize": {
            "pykernels": lambda: ops.nf4_quantize(w),
            "bitsandbytes": lambda: bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4"),
        },
        "quantize double": {
            "pykernels": lambda: NF4Tensor.quantize(w, double_quant=True),
        },
        "dequantize": {
            "pykernels": lambda: ops.nf4_dequantize(packed, absmax, shape, dtype),
            "bitsandbytes": lambda: bnb_f.dequantize_4bit(bnb_packed, bnb_state),
        },
        "dequantize double": {
            "pykernels": double.dequantize,
            "torchao": ao.get_original_weight,
        },
        "dequantize into": {
            "pykernels": lambda: ops.nf4_dequantize(packed, absmax, shape, dtype, out=out),
            "bitsandbytes C": lambda: bnb_dequantize_into(bnb_packed, bnb_state.absmax, bnb_out),
        },
    }
    if small:  # seconds a call at 8192x8192 (torchao's quantize: ~18 s)
        ops_impls["quantize"]["reference"] = lambda: reference.nf4_quantize(w)
        ops_impls["quantize double"]["bitsandbytes"] = lambda: bnb_f.quantize_4bit(
            w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        ops_impls["quantize double"]["torchao"] = lambda: to_nf4(w)
        ops_impls["dequantize"]["reference"] = (
            lambda: reference.nf4_dequantize(packed, absmax, shape, dtype))
    rows = []
    for op, impls in ops_impls.items():
        rows += _time_op(op, impls, w, min_time, copy)
    return rows


def _on_path(path: str, fn):
    def call():
        _C.set_cpu_path(path)
        fn()
    return call


def bench_paths(w: torch.Tensor, min_time: float, copy: float) -> list[dict]:
    """Quantize and dequantize-into on each CPU path this machine can run."""
    packed, absmax = ops.nf4_quantize(w)
    expected = ops.nf4_dequantize(packed, absmax, w.shape, w.dtype)
    out = torch.empty_like(w)
    paths = _C.cpu_paths()
    default = _C.cpu_path()
    try:
        for path in paths:
            _C.set_cpu_path(path)
            path_packed, path_absmax = ops.nf4_quantize(w)
            ops.nf4_dequantize(packed, absmax, w.shape, w.dtype, out=out)
            _check(torch.equal(path_packed, packed) and torch.equal(path_absmax, absmax)
                   and torch.equal(out, expected), f"the {path} path's results and the {default} path's")
        quantize = {f"pykernels [{p}]": _on_path(p, lambda: ops.nf4_quantize(w)) for p in paths}
        dequantize = {f"pykernels [{p}]": _on_path(
            p, lambda: ops.nf4_dequantize(packed, absmax, w.shape, w.dtype, out=out)) for p in paths}
        return (_time_op("quantize", quantize, w, min_time, copy)
                + _time_op("dequantize into", dequantize, w, min_time, copy))
    finally:
        _C.set_cpu_path(default)


def _rate_at(row: dict, key: str, stat: str) -> float:
    """A row's rate (``key``, from its median time) at another statistic of its times."""
    return row[key] * row["median_ms"] / row[stat]


def ratios(rows: list[dict], copy: dict) -> list[dict]:
    """The targets per shape and dtype, from median times (``met``) and from the best
    calls (``value (min)``: what the code does when no other process holds a core)."""
    by_key = {(r["op"], r["impl"], r["shape"], r["dtype"]): r for r in rows}
    out = []
    for shape, dtype in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
        def speedup(op, peer):
            ours, theirs = by_key[(op, "pykernels", shape, dtype)], by_key[(op, peer, shape, dtype)]
            return lambda stat: theirs[stat] / ours[stat]

        into = by_key[("dequantize into", "pykernels", shape, dtype)]
        for name, value, target in (
            ("quantize: bitsandbytes time / pykernels", speedup("quantize", "bitsandbytes"), 50),
            ("dequantize: bitsandbytes time / pykernels", speedup("dequantize", "bitsandbytes"), 1),
            ("dequantize into: pykernels GB/s / copy GB/s",
             lambda stat: _rate_at(into, "GB/s", stat) / _rate_at(copy, "value", stat), 0.85),
            ("dequantize into: bitsandbytes C time / pykernels",
             speedup("dequantize into", "bitsandbytes C"), 1),
        ):
            out.append({"kind": "ratio", "bench": "nf4", "ratio": name, "shape": shape,
                        "dtype": dtype, "value": value("median_ms"),
                        "value (min)": value("min_ms"), "target": f">= {target}",
                        "met": value("median_ms") >= target})
    return out


def run(args) -> list[dict]:
    copy_row = common.machine_limits(args.quick)[0]
    copy = copy_row["value"]
    min_time = 0.1 if args.quick else 0.5
    shapes = QUICK_SHAPES if args.quick else SHAPES
    torch.manual_seed(0)
    rows = []
    for shape in shapes:
        for dtype in DTYPES:
            rows += bench_shape(torch.randn(shape, dtype=dtype), shape == shapes[0], min_time, copy)
    rows += ratios(rows, copy_row)
    rows += bench_paths(torch.randn(shapes[0], dtype=torch.bfloat16), min_time, copy)
    return rows


def plot(rows: list[dict], out_dir: Path) -> Path:
    """Bar chart of dequantize GB/s per implementation, with the copy bandwidth as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["kind"] == "time" and r["bench"] == "nf4"
             and r["op"] in ("dequantize", "dequantize into") and "[" not in r["impl"]]
    groups = list(dict.fromkeys(f"{r['shape']} {r['dtype']}" for r in timed))
    series = list(dict.fromkeys(f"{r['op']}: {r['impl']}" for r in timed))
    gbps = {(f"{r['shape']} {r['dtype']}", f"{r['op']}: {r['impl']}"): r["GB/s"] for r in timed}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        ax.bar([g + i * width for g in range(len(groups))],
               [gbps.get((g, s), 0.0) for g in groups], width, label=s)
    copy = next(r["value"] for r in rows if r["kind"] == "limit" and r["limit"] == "copy bandwidth")
    ax.axhline(copy, color="black", linestyle="--", label=f"copy_ bandwidth {copy:.1f} GB/s")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("GB/s (dense + packed + absmax bytes)")
    ax.set_title("NF4 dequantize on the CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "nf4_dequantize_gbps.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    common.main({"nf4": __name__})
