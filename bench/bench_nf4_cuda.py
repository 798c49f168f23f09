"""NF4 on CUDA: pykernels vs bitsandbytes vs the device's own copy bandwidth.

Targets, checked in the "ratio" rows against peers timed in the same run:
- dequantize into a preallocated output at >= 85% of the device's copy
  bandwidth (a 1 GiB device-to-device copy_), counting bytes read (packed +
  absmax) and written (output), as bench_nf4.py does on the CPU;
- dequantize no slower than bitsandbytes' dequantize_4bit, both allocating and
  both into a preallocated output.
Quantize is timed for the record; ours includes the NaN/Inf check, which waits
for the kernel.

Timing: CUDA events around each call; median and IQR of REPS calls after a
warm-up call. A 256 MiB buffer is zeroed before every call, so the weight comes
from device memory rather than the L2 (4096x4096 bf16 would fit in it) and the
host has queued the call before the device reaches it. Before any timing, the
CUDA results are checked against the CPU kernels' bytes. Without a CUDA device
run() returns no rows, so bench/run.py can import this module anywhere.

    python bench/bench_nf4_cuda.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import common  # first: it quiets the peers' import-time logging

import torch  # noqa: E402

from pykernels import _C, ops  # noqa: E402

SHAPES = ((4096, 4096), (8192, 8192))
QUICK_SHAPES = ((1024, 1024),)
DTYPES = (torch.bfloat16, torch.float32)
BLOCKSIZE = 64
REPS = 30
COPY_BYTES = 1 << 30
FLUSH_BYTES = 256 << 20


def measure_cuda(fn, flush: torch.Tensor) -> common.Timing:
    fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(REPS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(REPS)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]
    q1, _, q3 = statistics.quantiles(times, n=4)
    return common.Timing(statistics.median(times), q3 - q1, len(times))


def copy_row(flush: torch.Tensor) -> dict:
    src = torch.ones(COPY_BYTES // 4, device="cuda")
    dst = torch.empty_like(src)
    t = measure_cuda(lambda: dst.copy_(src), flush)
    return {"kind": "limit", "limit": "device copy bandwidth", "size": "1 GiB", **t.fields(),
            "value": 2 * COPY_BYTES / t.median_s / 1e9, "unit": "GB/s"}


def _bnb():
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError:
        return None
    return bnb_f


def _check(ok: bool, what: str) -> None:
    # Timing a wrong answer is worse than no timing.
    if not ok:
        raise RuntimeError(f"bench_nf4_cuda: {what} differ; fix the kernels before timing them")


def bench_shape(w: torch.Tensor, flush: torch.Tensor, copy: float, bnb_f) -> list[dict]:
    shape, dtype = w.shape, w.dtype
    packed, absmax = ops.nf4_quantize(w, BLOCKSIZE)
    out = torch.empty_like(w)
    ops.nf4_dequantize(packed, absmax, shape, dtype, BLOCKSIZE, out=out)
    cpu_packed, cpu_absmax = ops.nf4_quantize(w.cpu(), BLOCKSIZE)
    cpu_out = ops.nf4_dequantize(cpu_packed, cpu_absmax, shape, dtype, BLOCKSIZE)
    _check(torch.equal(packed.cpu(), cpu_packed) and torch.equal(absmax.cpu(), cpu_absmax)
           and torch.equal(out.cpu(), cpu_out), "CUDA and CPU results")
    cases = [
        ("quantize", "pykernels", lambda: ops.nf4_quantize(w, BLOCKSIZE)),
        ("dequantize", "pykernels",
         lambda: ops.nf4_dequantize(packed, absmax, shape, dtype, BLOCKSIZE)),
        ("dequantize into", "pykernels",
         lambda: ops.nf4_dequantize(packed, absmax, shape, dtype, BLOCKSIZE, out=out)),
    ]
    rows = []
    if bnb_f is not None:
        bnb_packed, state = bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4")
        bnb_out = torch.empty_like(w)
        bnb_f.dequantize_4bit(bnb_packed, state, out=bnb_out)
        # Recorded, not required: the contract is bitsandbytes' CPU bytes (tests/test_nf4.py).
        rows.append({"kind": "check", "bench": "nf4_cuda", "shape": "x".join(map(str, shape)),
                     "dtype": common.dtype_name(dtype),
                     "bnb CUDA packed == ours": torch.equal(bnb_packed.view(-1), packed),
                     "bnb CUDA absmax == ours": torch.equal(state.absmax, absmax),
                     "bnb CUDA dequantized == ours": torch.equal(bnb_out, out)})
        cases += [
            ("quantize", "bitsandbytes",
             lambda: bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4")),
            ("dequantize", "bitsandbytes", lambda: bnb_f.dequantize_4bit(bnb_packed, state)),
            ("dequantize into", "bitsandbytes",
             lambda: bnb_f.dequantize_4bit(bnb_packed, state, out=bnb_out)),
        ]
    moved = w.numel() * w.element_size() + w.numel() // 2 + w.numel() // BLOCKSIZE * 4
    for op, impl, fn in cases:
        t = measure_cuda(fn, flush)
        gbps = moved / t.median_s / 1e9
        rows.append({"kind": "time", "bench": "nf4_cuda", "op": op, "impl": impl,
                     "shape": "x".join(map(str, shape)), "dtype": common.dtype_name(dtype),
                     **t.fields(), "GB/s": gbps, "% copy": 100 * gbps / copy})
    return rows


def ratios(rows: list[dict], copy: float) -> list[dict]:
    timed = [r for r in rows if r["kind"] == "time"]
    by_key = {(r["op"], r["impl"], r["shape"], r["dtype"]): r for r in timed}
    out = []
    for shape, dtype in dict.fromkeys((r["shape"], r["dtype"]) for r in timed):
        ours = by_key[("dequantize into", "pykernels", shape, dtype)]
        checks = [("dequantize into: pykernels GB/s / device copy GB/s", ours["GB/s"] / copy, 0.85)]
        for op in ("dequantize", "dequantize into"):
            bnb = by_key.get((op, "bitsandbytes", shape, dtype))
            if bnb is not None:
                mine = by_key[(op, "pykernels", shape, dtype)]
                checks.append((f"{op}: bitsandbytes time / pykernels",
                               bnb["median_ms"] / mine["median_ms"], 1))
        for name, value, target in checks:
            out.append({"kind": "ratio", "bench": "nf4_cuda", "ratio": name, "shape": shape,
                        "dtype": dtype, "value": value, "target": f">= {target}",
                        "met": value >= target})
    return out


def run(args) -> list[dict]:
    if not torch.cuda.is_available():
        print("bench_nf4_cuda: no CUDA device, nothing to time")
        return []
    bnb_f = _bnb()
    if bnb_f is None:
        print("bench_nf4_cuda: bitsandbytes not installed, timing pykernels alone")
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    rows = [copy_row(flush)]
    copy = rows[0]["value"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        for dtype in DTYPES:
            w = torch.randn(shape, device="cuda", generator=gen).to(dtype)
            rows += bench_shape(w, flush, copy, bnb_f)
    return rows + ratios(rows, copy)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    parser.add_argument("--out", type=Path, default=common.REPO / "results", help="output folder")
    args = parser.parse_args()
    machine = common.machine_info()
    if torch.cuda.is_available():
        machine.update(gpu=torch.cuda.get_device_name(), torch_cuda=torch.version.cuda,
                       pykernels_cuda_compiled=_C.cuda_compiled())
    rows = run(args)
    common.print_table(rows)
    name = "nf4_cuda_quick" if args.quick else "nf4_cuda"
    paths = common.write_results(rows, machine, args.out, name)
    print("wrote " + ", ".join(map(str, paths)))
