"""NF4 on the CPU: pykernels vs bitsandbytes vs torchao vs the plain-PyTorch reference.

Targets, checked in the "ratio" rows against peers timed in the same run:
- quantize at least 50x faster than bitsandbytes' quantize_4bit;
- dequantize into a preallocated output at >= 85% of the machine's copy
  bandwidth, counting bytes read (packed + absmax) and written (output);
- and no slower than bitsandbytes' own C kernel writing into a preallocated output.

Each op group allocates on every side or on none: "quantize", "dequantize" and
their "double" variants allocate their outputs; "dequantize into" writes into a
buffer made once. torchao's NF4 always double-quantizes and rounds to the nearest
code of a rounded table (DESIGN.md §2), so it sits beside our double quant.
GB/s counts the bytes of the plain format (dense weight + packed + absmax) for
every row, so it reads as throughput across rows.

    python bench/bench_nf4.py [--quick] [--out DIR]
"""
from __future__ import annotations

import ctypes as ct
import sys

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


def _time_row(op: str, impl: str, fn, w: torch.Tensor, min_time: float, copy: float) -> dict:
    t = common.measure(fn, min_time)
    moved = w.numel() * w.element_size() + w.numel() // 2 + w.numel() // BLOCKSIZE * 4
    gbps = moved / t.median_s / 1e9
    return {"kind": "time", "bench": "nf4", "op": op, "impl": impl,
            "shape": "x".join(map(str, w.shape)), "dtype": common.dtype_name(w.dtype),
            **t.fields(), "GB/s": gbps, "% copy": 100 * gbps / copy}


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

    cases = [  # (op, impl, call, small shape only)
        ("quantize", "pykernels", lambda: ops.nf4_quantize(w), False),
        ("quantize", "bitsandbytes",
         lambda: bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4"), False),
        ("quantize", "reference", lambda: reference.nf4_quantize(w), True),
        ("quantize double", "pykernels", lambda: NF4Tensor.quantize(w, double_quant=True), False),
        ("quantize double", "bitsandbytes",
         lambda: bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4",
                                     compress_statistics=True), True),
        # ~18 s a call at 8192x8192: small shape only.
        ("quantize double", "torchao", lambda: to_nf4(w), True),
        ("dequantize", "pykernels", lambda: ops.nf4_dequantize(packed, absmax, shape, dtype), False),
        ("dequantize", "bitsandbytes", lambda: bnb_f.dequantize_4bit(bnb_packed, bnb_state), False),
        ("dequantize", "reference",
         lambda: reference.nf4_dequantize(packed, absmax, shape, dtype), True),
        ("dequantize double", "pykernels", double.dequantize, False),
        ("dequantize double", "torchao", ao.get_original_weight, False),
        ("dequantize into", "pykernels",
         lambda: ops.nf4_dequantize(packed, absmax, shape, dtype, out=out), False),
        ("dequantize into", "bitsandbytes C",
         lambda: bnb_dequantize_into(bnb_packed, bnb_state.absmax, bnb_out), False),
    ]
    return [_time_row(op, impl, fn, w, min_time, copy)
            for op, impl, fn, small_only in cases if small or not small_only]


def bench_paths(w: torch.Tensor, min_time: float, copy: float) -> list[dict]:
    """Quantize and dequantize-into on each CPU path this machine can run."""
    expected_packed, absmax = ops.nf4_quantize(w)
    expected = ops.nf4_dequantize(expected_packed, absmax, w.shape, w.dtype)
    out = torch.empty_like(w)
    rows = []
    default = _C.cpu_path()
    try:
        for path in _C.cpu_paths():
            _C.set_cpu_path(path)
            packed, _ = ops.nf4_quantize(w)
            ops.nf4_dequantize(packed, absmax, w.shape, w.dtype, out=out)
            _check(torch.equal(packed, expected_packed) and torch.equal(out, expected),
                   f"the {path} path's results and the {default} path's")
            rows.append(_time_row("quantize", f"pykernels [{path}]",
                                  lambda: ops.nf4_quantize(w), w, min_time, copy))
            rows.append(_time_row("dequantize into", f"pykernels [{path}]",
                                  lambda: ops.nf4_dequantize(packed, absmax, w.shape, w.dtype, out=out),
                                  w, min_time, copy))
    finally:
        _C.set_cpu_path(default)
    return rows


def ratios(rows: list[dict], copy: float) -> list[dict]:
    """The targets, per shape and dtype, from the timed rows."""
    by_key = {(r["op"], r["impl"], r["shape"], r["dtype"]): r for r in rows}
    out = []
    for shape, dtype in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
        def ms(op, impl):
            return by_key[(op, impl, shape, dtype)]["median_ms"]
        into_gbps = by_key[("dequantize into", "pykernels", shape, dtype)]["GB/s"]
        for name, value, target in (
            ("quantize: bitsandbytes time / pykernels",
             ms("quantize", "bitsandbytes") / ms("quantize", "pykernels"), 50),
            ("dequantize: bitsandbytes time / pykernels",
             ms("dequantize", "bitsandbytes") / ms("dequantize", "pykernels"), 1),
            ("dequantize into: pykernels GB/s / copy GB/s", into_gbps / copy, 0.85),
            ("dequantize into: bitsandbytes C time / pykernels",
             ms("dequantize into", "bitsandbytes C") / ms("dequantize into", "pykernels"), 1),
        ):
            out.append({"kind": "ratio", "bench": "nf4", "ratio": name, "shape": shape,
                        "dtype": dtype, "value": value, "target": f">= {target}",
                        "met": value >= target})
    return out


def run(args) -> list[dict]:
    copy = common.copy_gbps(args.quick)
    min_time = 0.1 if args.quick else 0.5
    shapes = QUICK_SHAPES if args.quick else SHAPES
    torch.manual_seed(0)
    rows = []
    for shape in shapes:
        for dtype in DTYPES:
            rows += bench_shape(torch.randn(shape, dtype=dtype), shape == shapes[0], min_time, copy)
    rows += ratios(rows, copy)
    rows += bench_paths(torch.randn(shapes[0], dtype=torch.bfloat16), min_time, copy)
    return rows


def plot(rows: list[dict], out_dir) -> str:
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
    common.main({"nf4": sys.modules[__name__]})
