"""Prompt tuning: prompt_embed against pykernels.reference (every dtype, odd
shapes, gradients, opcheck, bad input; its CPU and CUDA kernels, the latter
marked cuda), PromptEmbedding's init modes, and the
wrapped causal LM against peft's PromptTuning on a tiny Llama: logits, loss,
gradients (with padding and attention masks) and greedy generate."""
import copy

import pytest
import torch
from torch import nn

from pykernels import ops, reference
from pykernels.nn import PromptEmbedding, PromptTuningLM, prompt_tuning

VOCAB, DIM, N = 101, 64, 5
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]  # the op's two kernels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 4), (2, 0, 3), (0, 4, 2)])  # B, S, n
def test_op_matches_reference(dtype, shape, device):
    b, s, n = shape
    weight = torch.randn(VOCAB, 33).to(device, dtype)
    prompt = torch.randn(n, 33).to(device, dtype).requires_grad_(True)
    ids = torch.randint(0, VOCAB, (b, s), device=device)
    out = ops.prompt_embed(ids, weight, prompt)
    assert out.device == weight.device
    ref = reference.prompt_embed(ids, weight, prompt)
    assert out.dtype == dtype and torch.equal(out, ref)  # a gather: exact
    g = torch.randn(out.shape).to(dtype)
    (grad,) = torch.autograd.grad(out, prompt, g)
    (grad_ref,) = torch.autograd.grad(ref, prompt, g)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_ids_and_weight_grad(device):
    weight = torch.randn(VOCAB, 8, dtype=torch.float64, device=device, requires_grad=True)
    prompt = torch.randn(3, 8, dtype=torch.float64, device=device, requires_grad=True)
    ids = torch.randint(0, VOCAB, (6, 4), device=device).t()  # [4, 6], non-contiguous
    assert torch.equal(ops.prompt_embed(ids, weight, prompt), reference.prompt_embed(ids, weight, prompt))
    assert torch.autograd.gradcheck(lambda w, p: ops.prompt_embed(ids, w, p), (weight, prompt))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    weight = torch.randn(VOCAB, 8, device=device)
    prompt = torch.randn(3, 8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.pykernels.prompt_embed.default,
                          (torch.randint(0, VOCAB, (2, 5), device=device), weight, prompt))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_ids(device):
    """Found by the kernel on either device, named by position, and the op still
    works after (on CUDA the error is raised once the stream has been read)."""
    weight, prompt = torch.randn(VOCAB, 8, device=device), torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match=r"input_ids\[1, 2\] = 101 is outside the vocabulary \[0, 101\)"):
        ops.prompt_embed(torch.tensor([[0, 1, 2], [3, 4, 101]], device=device), weight, prompt)
    with pytest.raises(ValueError, match=r"input_ids\[0, 0\] = -1"):
        ops.prompt_embed(torch.tensor([[-1]], device=device), weight, prompt)
    ids = torch.tensor([[0, 100]], device=device)
    assert torch.equal(ops.prompt_embed(ids, weight, prompt), reference.prompt_embed(ids, weight, prompt))


@pytest.mark.cuda
def test_cuda_rejects_ids_on_another_device():
    weight, prompt = torch.randn(VOCAB, 8, device="cuda"), torch.randn(3, 8, device="cuda")
    with pytest.raises(ValueError, match="input_ids"):
        ops.prompt_embed(torch.tensor([[1]]), weight, prompt)


def test_bad_input():
    weight, prompt = torch.randn(VOCAB, 8), torch.randn(3, 8)
    with pytest.raises(TypeError, match="input_ids must be int64"):
        ops.prompt_embed(torch.tensor([[1]], dtype=torch.int32), weight, prompt)
    with pytest.raises(TypeError, match="prompt must have weight's dtype"):
        ops.prompt_embed(torch.tensor([[1]]), weight, prompt.double())
    with pytest.raises(ValueError, match=r"prompt must be \[num_virtual_tokens, 8\]"):
        ops.prompt_embed(torch.tensor([[1]]), weight, torch.randn(3, 7))
    with pytest.raises(ValueError, match="init must be one of"):
        PromptEmbedding(4, 8, init="zeros")
    with pytest.raises(ValueError, match="needs init_text"):
        PromptEmbedding(4, 8, init="text", word_embeddings=weight)


def test_layer_compiles_fullgraph():
    layer = PromptEmbedding(4, 8)
    emb = nn.Embedding(VOCAB, 8)
    ids = torch.randint(0, VOCAB, (2, 5))
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(ids, emb)
    torch.testing.assert_close(out, layer(ids, emb))
    out.sum().backward()
    assert torch.equal(layer.embedding.weight.grad, torch.full((4, 8), 2.0))


class _Tokenizer:
    """A stand-in for AutoTokenizer (nothing downloads here): one id per character."""

    def __call__(self, text):
        return {"input_ids": [1] + [ord(c) % VOCAB for c in text]}


@pytest.mark.parametrize("text", ["hi", "a longer init text than five"])
def test_text_init_repeats_or_crops(text):
    emb = nn.Embedding(VOCAB, 8)
    layer = PromptEmbedding(N, 8, init="text", word_embeddings=emb, init_text=text,
                            tokenizer=_Tokenizer())
    ids = _Tokenizer()(text)["input_ids"]
    want = (ids * N)[:N]
    torch.testing.assert_close(layer.embedding.weight, emb.weight.detach()[want])


def test_vocab_init_samples_rows():
    emb = nn.Embedding(VOCAB, 8)
    layer = PromptEmbedding(N, 8, init="vocab", word_embeddings=emb.weight)
    rows = layer.embedding.weight.detach()
    assert all((emb.weight.detach() == r).all(1).any() for r in rows)


# ---- peft as the oracle ----

def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def peft_prompt(model, init="RANDOM", **kw):
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                     prompt_tuning_init=init, **kw)
    return peft.get_peft_model(copy.deepcopy(model), config)


def ours_like(model, theirs) -> PromptTuningLM:
    ours = prompt_tuning(copy.deepcopy(model), N)
    with torch.no_grad():
        ours.prompt.embedding.weight.copy_(theirs.prompt_encoder["default"].embedding.weight)
    return ours


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    ids[1, :4] = 0
    mask[2, :2] = 0
    ids[2, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def test_matches_peft_logits_loss_and_gradients():
    model = tiny_llama()
    theirs = peft_prompt(model)
    ours = ours_like(model, theirs)
    ids, mask, labels = _batch()
    a = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    b = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert b.logits.shape == (3, N + 9, VOCAB)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(ours.prompt.embedding.weight.grad,
                               theirs.prompt_encoder["default"].embedding.weight.grad,
                               rtol=1e-4, atol=1e-7)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["prompt.embedding.weight"]


def test_labels_ignore_virtual_positions():
    model = tiny_llama()
    ours = prompt_tuning(model, N)
    ids, mask, labels = _batch()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    logits = out.logits[:, N:-1].reshape(-1, VOCAB)  # real positions predicting the next token
    want = nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    # The first real token is predicted from the last virtual one: also a real label.
    first = nn.functional.cross_entropy(out.logits[:, N - 1], labels[:, 0], ignore_index=-100,
                                        reduction="sum")
    count = (labels[:, 1:] != -100).sum() + (labels[:, 0] != -100).sum()
    total = want * (labels[:, 1:] != -100).sum() + first
    torch.testing.assert_close(out.loss, total / count, rtol=1e-5, atol=1e-6)


def test_greedy_generate_matches_peft():
    """peft 0.21.2's cached generate (transformers 5.24) drifts from peft's own forward
    after the first new token: its cache positions do not count the virtual tokens.
    Its uncached generate agrees with its forward; so do ours, cached or not."""
    model = tiny_llama()
    theirs = peft_prompt(model)
    ours = ours_like(model, theirs)
    ids, mask, _ = _batch()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = theirs.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), want)
    assert torch.equal(ours.generate(ids, attention_mask=mask, use_cache=False, **kw), want)
    seq = ids[:1]  # greedy by peft's forward, whole sequence each step (row 0 has no padding)
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, theirs(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(want[:1], seq)


def test_init_modes_match_peft(monkeypatch):
    transformers = pytest.importorskip("transformers")
    model = tiny_llama()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        staticmethod(lambda *a, **k: _Tokenizer()))
    text = "classify this"
    theirs = peft_prompt(model, "TEXT", prompt_tuning_init_text=text, tokenizer_name_or_path="x")
    ours = prompt_tuning(copy.deepcopy(model), N, init="text", init_text=text, tokenizer="x")
    torch.testing.assert_close(ours.prompt.embedding.weight,
                               theirs.prompt_encoder["default"].embedding.weight)
    ours = prompt_tuning(copy.deepcopy(model), N, init="vocab")
    emb = model.get_input_embeddings().weight.detach()
    assert all((emb == r).all(1).any() for r in ours.prompt.embedding.weight.detach())
    random = prompt_tuning(copy.deepcopy(model), N)
    w = random.prompt.embedding.weight.detach()
    assert w.dtype == torch.float32 and 0.5 < w.std() < 2  # N(0, 1), as peft's RANDOM


def test_too_long_names_both_numbers():
    model = tiny_llama()
    ours = prompt_tuning(model, N)
    ids = torch.randint(3, VOCAB, (1, 28))
    with pytest.raises(ValueError, match=r"5 virtual tokens \+ 28 input tokens = 33 exceeds the "
                                         r"model's context of 32"):
        ours(input_ids=ids)
    with pytest.raises(ValueError, match=r"\+ 8 new tokens = 33 exceeds"):
        ours.generate(ids[:, :20], max_new_tokens=8)
