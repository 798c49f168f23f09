"""The memory estimator: against peak memory measured while training SmolLM2,
and beside the commonly quoted 65B figures."""
import pytest
import torch

from pykernels import memory, wrap
from pykernels.__main__ import main
from pykernels.finetune import adapter_config, answer_logprobs

pytest.importorskip("transformers")


def test_estimate_within_15_percent_of_measured_smollm2_training():
    from pykernels.models import load_model

    model, _ = load_model("smollm2")
    shape = memory.shape_from_config(model.config, "smollm2")
    assert shape.params == sum(p.numel() for p in model.parameters())
    model = wrap(model, adapter_config("qlora", rank=8, alpha=16))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step(batch, seq):  # no padding; one scored token per row, as in classification
        ids = torch.randint(100, shape.vocab, (batch, seq + 1),
                            generator=torch.Generator().manual_seed(0))
        pairs = [(row[:seq].tolist(), row[seq:].tolist()) for row in ids]
        (-answer_logprobs(model, pairs, pad_id=0).mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # A small first step allocates the optimizer's state and the one-time
    # workspaces; the measured step then adds gradients and activations.
    step(1, 16)
    batch, seq = 4, 64
    with memory.PeakMemory("cpu") as peak:
        step(batch, seq)
    est = memory.estimate(shape, "qlora", rank=8, seq=seq, batch=batch, weight_bytes=4,
                          act_bytes=4, loss_tokens=1)
    predicted = est.training_state - est.optimizer
    print(f"SmolLM2 QLoRA r=8, {batch}x{seq} tokens, fp32: estimated {predicted / 1e6:.0f} MB, "
          f"measured {peak.bytes / 1e6:.0f} MB ({peak.kind})")
    assert abs(predicted / peak.bytes - 1) < 0.15, (predicted, peak.bytes)


def test_65b_figures_beside_the_quoted_ones(capsys):
    shape = memory.shape_for_params(65e9)
    assert shape.name == "LLaMA-65B"
    bare = memory.estimate(shape, "full", master_weights=False)
    # 16-bit weights and gradients + fp32 Adam moments: the quoted 780 GB is 12 bytes/param.
    assert bare.weights + bare.gradients + bare.optimizer == pytest.approx(780e9, rel=0.01)
    mixed = memory.estimate(shape, "full")
    assert mixed.optimizer == pytest.approx(12 * shape.params)  # moments + fp32 master copy
    qlora = memory.estimate(shape, "qlora", rank=64, checkpointing=True)
    assert 33e9 < qlora.weights < 40e9  # NF4 at 4.127 bits + 16-bit embeddings + adapters
    assert qlora.total == pytest.approx(48e9, rel=0.1)  # r=64 adapters in fp32 + Adam, seq 512
    assert main(["memory", "--params", "65e9", "--method", "qlora"]) == 0
    out = capsys.readouterr().out
    assert "780 GB" in out and "48 GB" in out and "master" in out


def test_activation_model_and_checkpointing():
    shape = memory.shape_for_params(7e9)
    plain = memory.estimate(shape, "lora", seq=1024, batch=2)
    ckpt = memory.estimate(shape, "lora", seq=1024, batch=2, checkpointing=True)
    per_token = memory.activation_elements_per_token(shape, "lora", 16) * 2
    assert plain.activations == 2048 * (shape.layers * per_token + shape.hidden * 2)
    assert ckpt.activations < plain.activations / 10
    assert memory.estimate(shape, "qlora").weights < plain.weights / 3


def test_bad_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        memory.estimate(memory.LLAMA_SHAPES[0], "prefix")
