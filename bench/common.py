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
import importlib
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# numpy's OpenBLAS starts a thread that spins on one of the 2 cores for a while
# after import; every 2-thread OpenMP region then waits a scheduler tick for its
# second thread (bitsandbytes' 1024x1024 dequantize: 8.0 ms instead of 0.21 ms).
# Nothing timed here uses numpy's BLAS. Set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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
    min_s: float | None = None  # the best call: what the machine can do when nothing else runs
    # Every call's time in the order measure() made them: call i of each side ran in
    # round i, beside call i of the others (paired differences).
    samples: tuple = ()

    def fields(self) -> dict:
        fields = {"median_ms": self.median_s * 1e3, "iqr_ms": self.iqr_s * 1e3}
        if self.min_s is not None:
            fields["min_ms"] = self.min_s * 1e3
        return {**fields, "runs": self.runs}


def measure(fns: dict, min_time: float = 0.5, clock=time.perf_counter) -> dict[str, Timing]:
    """Median, interquartile range and minimum of single calls of each of ``fns``.

    The calls are interleaved (one of each per round, the order reversed each
    round), so every side gets the same share of whatever else runs on this shared
    machine and of what the call before it left behind (the IA3 block in a fixed
    order: 1.044 of the plain block; alternating: 1.022): while a concurrent build
    holds a core, a 2-thread region waits for a scheduler tick, and a 0.3 ms call
    takes 8 ms. After one warm-up call each, a function is called until it has
    spent ``min_time`` seconds in 3 calls or more; a call over 1 s stops at 2
    (bitsandbytes' quantize_4bit takes ~5 s at 8192x8192). A perf_counter loop
    rather than torch.utils.benchmark.Timer, which runs one thread unless told
    otherwise and times blocks of calls, not interleaved ones; every call timed
    here takes over 10 us, so the clock's overhead is noise. gc is off while
    timing, as in timeit. ``clock=time.thread_time`` times CPU time instead: with
    one torch thread, what a call costs whatever else holds the cores.
    """
    for fn in fns.values():
        fn()
    gc.collect()
    times = {name: [] for name in fns}

    def wants_more(t: list) -> bool:
        return len(t) < 2 or (len(t) < 3 and t[0] < 1.0) or sum(t) < min_time

    gc.disable()
    order = list(fns)
    try:
        while any(wants_more(t) for t in times.values()):
            for name in order:
                fn = fns[name]
                if wants_more(times[name]):
                    start = clock()
                    fn()
                    times[name].append(clock() - start)
            order.reverse()  # no side always runs right after the same other
    finally:
        gc.enable()
    result = {}
    for name, t in times.items():
        q1, _, q3 = statistics.quantiles(t, n=4)
        result[name] = Timing(statistics.median(t), q3 - q1, len(t), min(t), tuple(t))
    return result


# ---- the machine ----

def copy_bandwidth(nbytes: int) -> tuple[Timing, float]:
    """(timing, GB/s) of ``dst.copy_(src)`` over ``nbytes``, counting bytes read + written.

    Both buffers are touched first, so no page fault lands in the timed calls.
    """
    src = torch.ones(nbytes // 4)
    dst = torch.zeros_like(src)
    t = measure({"copy": lambda: dst.copy_(src)})["copy"]
    return t, 2 * nbytes / t.median_s / 1e9


def gemm_peak(n: int, dtype: torch.dtype) -> tuple[Timing, float]:
    """(timing, GFLOP/s) of an n x n x n matmul into a preallocated output."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    t = measure({"mm": lambda: torch.mm(a, b, out=c)})["mm"]
    return t, 2 * n**3 / t.median_s / 1e9


@functools.cache
def machine_limits(quick: bool) -> tuple[dict, ...]:
    """The copy bandwidth and GEMM peak, measured once per process (benches share them).

    The copy is 512 MiB each way: 5x the largest L3 these benchmarks have met (105 MiB
    on an Intel Xeon; 32 MiB on the AMD EPYC), so it measures DRAM, as a weight
    matrix of 8192x8192 sees it.
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


def llama_block(hidden: int, ffn: int, heads: int, dtype: torch.dtype):
    """A Llama decoder block (transformers' LlamaDecoderLayer, sdpa attention) with
    random frozen weights of std 0.02, and its rotary embedding module: the block
    the adapter benchmarks put their adapters in (Llama-7B: 4096, 11008, 32)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                         num_key_value_heads=heads, num_hidden_layers=1,
                         max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    block = LlamaDecoderLayer(config, layer_idx=0).to(dtype).requires_grad_(False)
    for p in block.parameters():  # transformers leaves fresh Linear weights at init scale
        p.data.normal_(0, 0.02)
    return block, LlamaRotaryEmbedding(config)


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


def main(modules: dict[str, str], argv=None) -> None:
    """Parses ``[bench ...] [--quick] [--out DIR]`` and runs the named benches.

    ``modules`` maps a bench name to its module's import name; only the benches
    run are imported, so one whose peers are missing here stops no other.
    """
    parser = argparse.ArgumentParser(description="pykernels benchmarks, peers side by side.")
    parser.add_argument("benches", nargs="*", metavar="bench",
                        help=f"which to run (default: all of {', '.join(modules)})")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    parser.add_argument("--out", type=Path, default=REPO / "results", help="output folder")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads, shared by bitsandbytes' OpenMP (default: %(default)s);"
                             " on a busy machine 1 keeps regions from waiting for a second core")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.benches or list(modules)
    unknown = [n for n in names if n not in modules]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)}; choose from {', '.join(modules)}")

    start = time.perf_counter()
    machine = machine_info()
    print(", ".join(f"{k}={v}" for k, v in machine.items()))
    benches = {name: importlib.import_module(modules[name]) for name in names}
    rows = list(machine_limits(args.quick))
    for bench in benches.values():
        rows += bench.run(args)
    machine["load_avg_1min_end"] = os.getloadavg()[0]
    machine["wall_s"] = round(time.perf_counter() - start, 1)

    print_table(rows)
    if max(machine["load_avg_1min"], machine["load_avg_1min_end"]) > 0.5:
        print(f"\nnote: other processes were running (load {machine['load_avg_1min']:.1f} at the start,"
              f" {machine['load_avg_1min_end']:.1f} at the end): medians include waits for a core;"
              " min_ms and 'value (min)' show what the code does alone")
    name = "_".join(args.benches) if args.benches else "all"
    paths = write_results(rows, machine, args.out, name + ("_quick" if args.quick else ""))
    for bench in benches.values():
        plot = getattr(bench, "plot", None)
        if plot is not None:
            paths.append(plot(rows, args.out))
    print(f"\n{machine['wall_s']} s; wrote " + ", ".join(str(p) for p in paths))
