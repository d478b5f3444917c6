"""The llama.cpp runtime on the bundled smollm2-135m: same interface, same weights, same loop."""

from __future__ import annotations

import pytest
import torch

from clp.api import Model
from clp.data import mtbench
from clp.errors import ClpError
from clp.metrics import first_divergence
from clp.prompts import encode_prompt

pytest.importorskip("llama_cpp")

from clp.llama_runtime import LlamaCppRuntime, ensure_gguf  # noqa: E402


@pytest.fixture(scope="module")
def llama_fp32(smollm2_fp32) -> Model:
    return Model(smollm2_fp32, runtime="llama.cpp")


def test_hidden_states_and_logits_match_the_transformers_runtime(smollm2_fp32, llama_fp32):
    """The heads read llama.cpp's final hidden states: they must be the ones they trained on."""
    torch_model = Model(smollm2_fp32, runtime="transformers")
    ids = encode_prompt(smollm2_fp32.tokenizer, "Name three prime numbers.")
    for rt in (torch_model.runtime, llama_fp32.runtime):
        rt.reset()
        rt.feed(ids)
    h_torch = torch_model.runtime.feed([330, 1552, 314])
    h_llama = llama_fp32.runtime.feed([330, 1552, 314])
    assert h_llama.shape == h_torch.shape == (3, smollm2_fp32.hidden_size)
    assert torch.nn.functional.cosine_similarity(h_llama, h_torch).min() > 0.999
    lg_torch, lg_llama = torch_model.runtime.logits(3), llama_fp32.runtime.logits(3)
    assert lg_llama.shape == (3, smollm2_fp32.vocab_size)
    assert torch.equal(lg_llama.argmax(-1), lg_torch.argmax(-1))
    assert (lg_llama - lg_torch).abs().max() < 0.05


def test_dropping_rejected_tokens_restores_the_cache(llama_fp32):
    rt = llama_fp32.runtime
    rt.reset()
    rt.feed(list(range(100, 140)))
    rt.feed([7, 8, 9])
    before, after_8 = rt.logits(3)[0].clone(), rt.logits(3)[1].clone()
    rt.drop_last(2)  # as if drafts 8 and 9 were rejected
    assert rt.length == 41
    rt.feed([11])  # the position after 7 is fed again: it must see 100..139, 7 only
    rt.drop_last(1)
    rt.feed([8, 9])
    assert rt.length == 43
    rt.drop_last(3)
    again = rt.feed([7])
    assert again.shape[0] == 1
    # equal up to kernel rounding (one-token vs three-token path); a stale cache is far off
    assert (rt.logits(1)[0] - before).abs().max() < 0.05
    assert (after_8 - before).abs().max() > 1


def test_verify_equals_ar_but_for_near_ties(smollm2_fp32, llama_fp32):
    """llama.cpp's one-token and several-token kernels round differently even in f32, so a
    near-tie can flip between ar and verify; every difference must be one (top-2 gap < 1%)."""
    same, drafted = 0, 0
    prompts = [d.prompt for d in mtbench()[:10]]
    for prompt in prompts:
        ids = encode_prompt(smollm2_fp32.tokenizer, prompt)
        ar = llama_fp32.generate(ids, max_new_tokens=40).token_ids
        ver = llama_fp32.generate(ids, mode="verify", max_new_tokens=40)
        drafted += ver.stats.forward_passes < len(ver.token_ids)
        if ver.token_ids == ar:
            same += 1
            continue
        pos = first_divergence(ar, ver.token_ids)
        rt = llama_fp32.runtime
        rt.reset()
        rt.feed(ids + ar[:pos])
        top2 = torch.softmax(rt.logits(1)[0], -1).topk(2).values
        assert float(top2[0] - top2[1]) < 0.01, prompt
    assert same >= 7 and drafted >= 8


def test_mtp_on_llama_cpp_emits_one_plus_k_per_forward(llama_fp32):
    r = llama_fp32.generate("Write a short story about a dragon.", mode="mtp", max_new_tokens=30)
    assert len(r.token_ids) == 30 and r.stats.forward_passes == 10


def test_wrong_model_or_type_fails_clearly(tiny, smollm2_fp32):
    with pytest.raises(ClpError, match="bundled backbones"):
        ensure_gguf("some/other-model")
    with pytest.raises(ClpError, match="unknown GGUF type"):
        ensure_gguf("smollm2-135m", "q3")
    with pytest.raises(ClpError, match="is not the backbone 'tiny'"):
        LlamaCppRuntime(tiny, ensure_gguf("smollm2-135m", "f32"))
    with pytest.raises(ClpError, match="unknown runtime"):
        Model(smollm2_fp32, runtime="vllm")


def test_batched_distillation_answers_as_one_sequence_would(smollm2_fp32, llama_fp32):
    """Continuous batching (2 slots for 5 prompts, so slots are reused) must give each prompt
    the answer and hidden states of decoding it alone, but for near-ties (top-2 gap < 1%)."""
    from clp.llama_runtime import LlamaDistiller

    distill = LlamaDistiller(smollm2_fp32, batch_size=2, max_tokens=160, gguf_type="f32")
    prompts = [encode_prompt(smollm2_fp32.tokenizer, d.prompt) for d in mtbench()[:5]]
    answers = distill(prompts, 24)
    assert len(answers) == len(prompts)
    rt = llama_fp32.runtime
    for ids, (hidden, tokens) in zip(prompts, answers, strict=True):
        alone = llama_fp32.generate(ids, max_new_tokens=24).token_ids
        assert hidden.shape == (len(tokens), smollm2_fp32.hidden_size)
        assert len(tokens) == 24 or int(tokens[-1]) in smollm2_fp32.eos_token_ids
        tokens = tokens.tolist()
        pos = first_divergence(alone, tokens)
        n = min(pos + 1, len(tokens))  # rows chosen from a context both runs share
        rt.reset()
        rows = [rt.feed(ids)] + ([rt.feed(tokens[: n - 1])] if n > 1 else [])
        cos = torch.nn.functional.cosine_similarity(hidden[:n].float(), torch.cat(rows).float())
        assert cos.min() > 0.999
        if pos < min(len(alone), len(tokens)):  # they differ at pos: must be a near-tie
            top2 = torch.softmax(rt.logits(1)[0], -1).topk(2).values
            assert float(top2[0] - top2[1]) < 0.01


def test_extra_weight_buffers_are_dropped_only_on_cpus_with_amx():
    from types import SimpleNamespace

    from clp.llama_runtime import _model_params

    def fake(info: bytes):
        return SimpleNamespace(
            llama_model_default_params=lambda: SimpleNamespace(use_extra_bufts=True),
            llama_print_system_info=lambda: info,
        )

    amx = b"CPU : AVX512 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | REPACK = 1 |"
    assert _model_params(fake(amx)).use_extra_bufts is False
    assert _model_params(fake(b"CPU : AVX2 = 1 | REPACK = 1 |")).use_extra_bufts is True
