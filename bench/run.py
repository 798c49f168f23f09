"""Runs the benchmarks: every bench/bench_<name>.py, or the names given.

    python bench/run.py [nf4 ...] [--quick] [--out DIR]

--quick runs small shapes as a smoke test (under 30 s); the results, one JSON
(machine info + rows) and one CSV, go to results/ unless --out says otherwise.
"""
from pathlib import Path

import common

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    common.main({p.stem[len("bench_"):]: p.stem for p in sorted(here.glob("bench_*.py"))})
