"""compare: every method through the same job on a tiny random Llama that
uses SmolLM2's tokenizer (seconds, not minutes), and the learning-rate pick."""
import json

import pytest
import torch

from pykernels import compare as cmp
from pykernels.__main__ import main

pytest.importorskip("transformers")

MERGEABLE = {"lora", "qlora", "ia3"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pykernels.models import load_model

    _, tokenizer = load_model("smollm2")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_all_methods_with_sweep_table_json_chart(tiny_model_dir, tmp_path):
    cfg = cmp.Config(model=tiny_model_dir, steps=2, batch_size=2, eval_per_label=2, lr_sweep=True,
                     latency_seconds=0.01, latency_rows=2, text_tokens=32, threads=1)
    report = cmp.compare(cfg, progress=lambda it, **kw: it, log=lambda *a: None)
    assert report["skipped"] == {}
    ran = list(cmp.METHODS)
    assert [(r["method"], r["lr"]) for r in report["runs"]] == [
        (m, pytest.approx(cmp.USUAL_LR[m] * f)) for m in ran for f in cmp.SWEEP_FACTORS]

    for r in report["runs"]:
        assert len(r["losses"]) == 2 and r["step_seconds"] > 0 and r["latency_unmerged_s"] > 0
        assert r["peak_memory_bytes"] is not None and r["peak_memory_bytes"] >= 0
        assert 0.0 <= r["accuracy"] <= 1.0 and r["answer_loss"] > 0
        assert r["forgetting"] == pytest.approx(r["text_loss_after"] - r["text_loss_before"])
        assert (r["latency_merged_s"] is not None) == (r["method"] in MERGEABLE), r["merge"]
        share = r["trainable_params"] / r["total_params"]
        assert share == 1.0 if r["method"] == "full" else 0 < share < 0.5

    # Each method's best run is its argmax of accuracy, ties to the lower answer loss.
    for method in ran:
        runs = [r for r in report["runs"] if r["method"] == method]
        top = max(r["accuracy"] for r in runs)
        expected = min((r for r in runs if r["accuracy"] == top), key=lambda r: r["answer_loss"])
        assert report["best"][method] is expected

    rows = cmp.table_rows(report)
    assert [r[0] for r in rows] == ["base"] + ran
    assert all(len(r) == len(cmp.COLUMNS) for r in rows)
    assert len(cmp.sweep_rows(report)) == len(report["runs"])
    assert sum(r[-1] == "best" for r in cmp.sweep_rows(report)) == len(ran)

    paths = cmp.write_report(report, str(tmp_path))
    saved = json.loads(open(paths["json"]).read())
    assert set(saved) >= {"base", "runs", "best", "skipped", "settings", "wall_seconds"}
    for method, pick in saved["best"].items():
        assert saved["runs"][pick["run"]]["method"] == method
        assert pick["lr"] == report["best"][method]["lr"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert paths["png"] is None
    else:
        with open(paths["png"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pick_best_prefers_accuracy_then_answer_loss():
    runs = [{"method": "lora", "lr": 1e-4, "accuracy": 0.5, "answer_loss": 0.1},
            {"method": "lora", "lr": 1e-3, "accuracy": 0.75, "answer_loss": 0.9},
            {"method": "lora", "lr": 3e-3, "accuracy": 0.75, "answer_loss": 0.4},
            {"method": "full", "lr": 1e-5, "accuracy": None, "answer_loss": 2.0},
            {"method": "full", "lr": 1e-4, "accuracy": None, "answer_loss": 1.0}]
    best = cmp.pick_best(runs)
    assert best["lora"]["lr"] == 3e-3 and best["full"]["lr"] == 1e-4


def test_cli_prints_table_and_writes_files(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--model", tiny_model_dir, "--methods", "lora", "full", "--steps", "1",
                 "--batch-size", "2", "--eval-per-label", "2", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.lstrip().startswith("method"))
    assert header.split() == " ".join(cmp.COLUMNS).split()
    assert (out / "compare.json").exists()


def test_bad_method():
    with pytest.raises(ValueError, match="methods"):
        cmp.compare(cmp.Config(methods=("lora", "adapterx")))
    with pytest.raises(ValueError, match="method must be one of"):
        cmp.adapter_config("adapterx", cmp.Config())
