"""Shared benchmark machinery: timing, the machine's own limits, machine info, output.

Each ``bench_*.py`` module exposes ``run(args) -> list[dict]``. ``main`` (called by
run.py, and by a module run as a script) measures the machine's limits once, runs
the modules, prints one table per row kind and writes JSON + CSV. Rows are flat
dicts with a ``kind``: "limit" (the machine), "time" (one op, one impl) or "ratio"
(a comparison, with its target). A benchmark is not a test: nothing here asserts
on time.
"""
from __future__ import annotations

import argparse
import csv
import functools
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# The peers log import-time warnings (optional kernels, CUDA-only libraries, a
# pytree deprecation) that say nothing about CPU timings.
for _name in ("bitsandbytes", "torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

import torch  # noqa: E402

import pykernels  # noqa: E402
from pykernels import _C  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


# ---- timing ----

@dataclass
class Timing:
    median_s: float
    iqr_s: float
    runs: int

    def fields(self) -> dict:
        return {"median_ms": self.median_s * 1e3, "iqr_ms": self.iqr_s * 1e3, "runs": self.runs}


def measure(fn, min_time: float = 0.5) -> Timing:
    """Median and interquartile range of single calls of ``fn``, after one warm-up call.

    Runs until ``min_time`` seconds and 3 calls are spent; a call over 1 s stops
    at 2 (bitsandbytes' quantize_4bit takes ~5 s at 8192x8192). A perf_counter
    loop rather than torch.utils.benchmark.Timer: that one runs on one thread
    unless told otherwise and groups fast calls into blocks, while every op timed
    here takes over 0.1 ms, so timing calls one by one costs nothing and keeps
    the call count predictable. gc is off while timing, as timeit does.
    """
    fn()
    gc.collect()
    gc.disable()
    times = []
    try:
        while len(times) < 2 or (len(times) < 3 and times[0] < 1.0) or sum(times) < min_time:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    q1, _, q3 = statistics.quantiles(times, n=4)
    return Timing(statistics.median(times), q3 - q1, len(times))


# ---- the machine ----

def copy_bandwidth(nbytes: int) -> tuple[Timing, float]:
    """(timing, GB/s) of ``dst.copy_(src)`` over ``nbytes``, counting bytes read + written.

    Both buffers are touched first, so no page fault lands in the timed calls.
    """
    src = torch.ones(nbytes // 4)
    dst = torch.zeros_like(src)
    t = measure(lambda: dst.copy_(src))
    return t, 2 * nbytes / t.median_s / 1e9


def gemm_peak(n: int, dtype: torch.dtype) -> tuple[Timing, float]:
    """(timing, GFLOP/s) of an n x n x n matmul into a preallocated output."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    t = measure(lambda: torch.mm(a, b, out=c))
    return t, 2 * n**3 / t.median_s / 1e9


@functools.cache
def machine_limits(quick: bool) -> tuple[dict, ...]:
    """The copy bandwidth and GEMM peak, measured once per process (benches share them).

    The copy is 512 MiB each way: 5x the 105 MiB L3 of this machine, so it measures
    DRAM, as a weight matrix of 8192x8192 sees it.
    """
    copy_mib, gemm_n = (256, 1024) if quick else (512, 4096)
    t, gbps = copy_bandwidth(copy_mib * MiB)
    rows = [{"kind": "limit", "limit": "copy bandwidth", "size": f"{copy_mib} MiB",
             **t.fields(), "value": gbps, "unit": "GB/s"}]
    for dtype in (torch.bfloat16, torch.float32):
        t, gflops = gemm_peak(gemm_n, dtype)
        rows.append({"kind": "limit", "limit": f"GEMM {dtype_name(dtype)}", "size": f"{gemm_n}^3",
                     **t.fields(), "value": gflops, "unit": "GFLOP/s"})
    return tuple(rows)


def copy_gbps(quick: bool) -> float:
    return machine_limits(quick)[0]["value"]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _git(*argv: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def machine_info() -> dict:
    """CPU, threads, versions, git revision and load: what a reader needs to trust a number.

    The load average matters on a shared machine: a concurrent build on 2 cores
    halves any figure here, which is why comparisons are run side by side.
    """
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_path": _C.cpu_path(),
        "cpu_paths": _C.cpu_paths(),
        "load_avg_1min": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitsandbytes": _version("bitsandbytes"),
        "torchao": _version("torchao"),
        "pykernels": pykernels.__version__,
        "git_rev": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
    }


# ---- output ----

def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    """One aligned table per row kind, columns in first-seen order."""
    for kind in dict.fromkeys(r["kind"] for r in rows):
        group = [r for r in rows if r["kind"] == kind]
        columns = [c for c in dict.fromkeys(k for r in group for k in r) if c != "kind"]
        cells = [[_cell(r.get(c, "")) for c in columns] for r in group]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        print(f"\n[{kind}]")
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_results(rows: list[dict], machine: dict, out_dir: Path, name: str) -> list[Path]:
    """``name``.json (machine + rows) and ``name``.csv (rows, all columns) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    json_path.write_text(json.dumps({"machine": machine, "results": rows}, indent=1) + "\n")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def main(modules: dict, argv=None) -> None:
    """Parses ``[bench ...] [--quick] [--out DIR]`` and runs the named bench modules."""
    parser = argparse.ArgumentParser(description="pykernels benchmarks, peers side by side.")
    parser.add_argument("benches", nargs="*", metavar="bench",
                        help=f"which to run (default: all of {', '.join(modules)})")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    parser.add_argument("--out", type=Path, default=REPO / "results", help="output folder")
    args = parser.parse_args(argv)
    names = args.benches or list(modules)
    unknown = [n for n in names if n not in modules]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)}; choose from {', '.join(modules)}")

    start = time.perf_counter()
    machine = machine_info()
    print(", ".join(f"{k}={v}" for k, v in machine.items()))
    rows = list(machine_limits(args.quick))
    for name in names:
        rows += modules[name].run(args)
    machine["load_avg_1min_end"] = os.getloadavg()[0]
    machine["wall_s"] = round(time.perf_counter() - start, 1)

    print_table(rows)
    paths = write_results(rows, machine, args.out, "_".join(names) + ("_quick" if args.quick else ""))
    for name in names:
        plot = getattr(modules[name], "plot", None)
        if plot is not None:
            paths.append(plot(rows, args.out))
    print(f"\n{machine['wall_s']} s; wrote " + ", ".join(str(p) for p in paths))
