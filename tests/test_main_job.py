"""The README's main job on the real model: SmolLM2-135M, offline, quantized to NF4."""
import json

import pytest

from pykernels.__main__ import main

pytest.importorskip("transformers")


def test_quantize_job_reports_memory_error_and_perplexity(tmp_path):
    report = tmp_path / "report.json"
    assert main(["quantize", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    summary, layers = result["summary"], result["layers"]
    assert summary["linear_layers"] == len(layers) == 210  # 30 blocks x q k v o gate up down
    assert 4.1 < summary["bits_per_param"] < 4.2  # 4 bits + double-quantized absmax
    assert summary["linear_bytes_nf4"] * 3.5 < summary["linear_bytes_bf16"]
    assert 0.05 < summary["relative_error_mean"] < 0.12
    assert summary["perplexity_before"] < summary["perplexity_after"] < 2 * summary["perplexity_before"]
