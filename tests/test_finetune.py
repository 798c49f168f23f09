"""The finetune job on the real model (SmolLM2-135M, offline), with a tiny step budget."""
import json
import os

import pytest
import torch

from pykernels import AdapterModel, wrap
from pykernels import finetune as ft
from pykernels.adapters.model import PEFT_CONFIG, PEFT_WEIGHTS
from pykernels.nn import QLoRALinear

pytest.importorskip("transformers")


def test_few_steps_train_evaluate_merge_save_and_reload(tmp_path):
    out = tmp_path / "adapter"
    cfg = ft.Config(steps=4, batch_size=4, eval_per_label=4, out=str(out))
    res, merged, tokenizer = ft.run(cfg, log=lambda *a: None)
    assert len(res.losses) == 4 and res.losses[-1] < res.losses[0]
    assert res.eval_examples == 8 and 0.0 <= res.accuracy_before <= 1.0
    assert 0.0 <= res.accuracy_after <= 1.0
    assert 0 < res.trainable_params < 0.03 * res.total_params
    assert res.train_tokens > 0 and res.peak_memory_bytes > 0
    assert res.merge_max_abs_diff <= res.merge_tolerance
    assert not any(isinstance(m, QLoRALinear) for m in merged.modules())

    # No pickle: peft's safetensors file and JSON config, nothing else.
    assert sorted(os.listdir(out)) == [PEFT_CONFIG, PEFT_WEIGHTS]
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and len(config["target_modules"]) == 7

    from pykernels.models import load_model
    fresh, _ = load_model("smollm2")
    weight = merged.get_input_embeddings().weight
    fresh.to(device=weight.device, dtype=weight.dtype)  # a GPU run trains in bf16
    fresh = AdapterModel.from_pretrained(fresh, str(out), quantized=True, adapter_dtype="float32")
    layers = [m for m in fresh.modules() if isinstance(m, QLoRALinear)]
    assert len(layers) == 210
    assert any(m.lora_B.weight.abs().max() > 0 for m in layers)  # trained, not the init
    example = ft.Example("Classify the message as one of: ham, spam.\nMessage: WIN a prize now\nAnswer:",
                         " spam")
    pairs = ft.encode(tokenizer, [example])
    with torch.no_grad():
        reloaded = ft.answer_logprobs(fresh, pairs, tokenizer.pad_token_id)
        trained = ft.answer_logprobs(merged, pairs, tokenizer.pad_token_id)
    tol = 1e-4 if weight.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(reloaded, trained, rtol=tol, atol=tol)


def test_data_formats_and_framing(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"prompt": "2+2=", "completion": " 4"}\n{"prompt": "3+3=", "completion": " 6"}\n')
    assert ft.load_examples(str(jsonl)) == [ft.Example("2+2=", " 4"), ft.Example("3+3=", " 6")]
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("text,label\ngreat film,positive\nawful,negative\n")
    examples = ft.load_examples(str(csv_file))
    assert examples[0].answer == " positive"
    assert "one of: negative, positive." in examples[0].prompt and "great film" in examples[0].prompt
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="prompt/completion or text/label"):
        ft.load_examples(str(bad))


def test_split_is_balanced_and_disjoint():
    examples = [ft.Example(f"p{i}", " spam" if i % 8 == 0 else " ham") for i in range(200)]
    train, held = ft.split_examples(examples, 10, seed=1)
    assert sorted(e.answer for e in held) == [" ham"] * 10 + [" spam"] * 10
    assert len(train) + len(held) == 200 and not {id(e) for e in train} & {id(e) for e in held}
    drawn = [e.answer for b in ft.batches(train, 50, 4, seed=0) for e in b]
    assert 0.35 < drawn.count(" spam") / len(drawn) < 0.65  # balanced draws, not 1 in 8


def test_answer_logprobs_rejects_empty_prompt_or_answer():
    with pytest.raises(ValueError, match="at least one token"):
        ft.answer_logprobs(torch.nn.Module(), [([], [5])], pad_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        ft.answer_logprobs(torch.nn.Module(), [([1, 2], [])], pad_id=0)


def test_adapter_config_rejects_unknown_method_and_wrap_missing_targets():
    with pytest.raises(ValueError, match="method"):
        ft.adapter_config("prefix", 4, 8)
    config = ft.adapter_config("qlora", 4, 8)
    assert (config.r, config.alpha, config.adapter_dtype) == (4, 8, "float32")
    with pytest.raises(ValueError, match="matched no"):
        wrap(torch.nn.Sequential(torch.nn.Linear(4, 4)), ft.adapter_config("lora", 4, 8))
