"""The decode loop on a tiny random backbone: stopping, streaming, sampling, verification."""

from __future__ import annotations

import random

import pytest
import torch

from clp.decoding import Policy, SamplingConfig, generate
from clp.errors import ClpError
from clp.runtime import TransformersRuntime

PROMPTS = ["Hello, world!", "abc", "The quick brown fox", "x = 1 + 2\n", "Why?"]


def run(backbone, prompt="Hello", policy=None, **kw):
    ids = backbone.tokenizer(prompt)["input_ids"]
    kw.setdefault("eos_ids", {backbone.tokenizer.eos_token_id})
    return generate(TransformersRuntime(backbone), backbone.tokenizer, ids, policy=policy, **kw)


def test_stops_exactly_at_max_new_tokens(tiny):
    for n in (1, 2, 7, 30):
        r = run(tiny, max_new_tokens=n, eos_ids=set())
        assert len(r.token_ids) == n and r.stats.new_tokens == n
        assert r.stats.forward_passes == n and r.stop_reason == "max_new_tokens"


def test_eos_ends_generation_and_is_kept_in_ids(tiny):
    free = run(tiny, max_new_tokens=20, eos_ids=set())
    eos = free.token_ids[5]
    r = run(tiny, max_new_tokens=20, eos_ids={eos})
    first = free.token_ids.index(eos)
    assert r.token_ids == free.token_ids[: first + 1] and r.stop_reason == "eos"


def test_stop_string_truncates_text(tiny):
    free = run(tiny, max_new_tokens=30, eos_ids=set())
    stop = free.text[10:12]
    r = run(tiny, max_new_tokens=30, eos_ids=set(), stop=[stop])
    assert r.stop_reason == "stop_string"
    assert r.text == free.text[: free.text.index(stop)]
    assert free.token_ids[: len(r.token_ids)] == r.token_ids


def test_streamed_pieces_join_to_the_final_text(tiny):
    for stop in ([], ["zz"], [free_piece for free_piece in ["N."]]):
        pieces: list[str] = []
        r = run(tiny, max_new_tokens=40, eos_ids=set(), stop=stop, on_text=pieces.append)
        assert "".join(pieces) == r.text
        assert all(not any(s in p for s in stop) for p in pieces)


def test_sampling_is_seeded_and_differs_from_greedy(tiny):
    cfg = SamplingConfig(temperature=1.5, top_k=20, top_p=0.95, seed=7)
    a = run(tiny, max_new_tokens=30, eos_ids=set(), sampling=cfg)
    b = run(tiny, max_new_tokens=30, eos_ids=set(), sampling=cfg)
    greedy = run(tiny, max_new_tokens=30, eos_ids=set())
    assert a.token_ids == b.token_ids != greedy.token_ids


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be > 0"),
        ({"sampling": SamplingConfig(temperature=-1)}, "temperature must be >= 0"),
        ({"sampling": SamplingConfig(temperature=1, top_p=0)}, "top_p must be in"),
        ({"context_length": 3}, "the model's context holds 3"),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny, kwargs, message):
    with pytest.raises(ClpError, match=message):
        run(tiny, **kwargs)


def test_empty_prompt_ids_rejected(tiny):
    with pytest.raises(ClpError, match="empty"):
        generate(TransformersRuntime(tiny), tiny.tokenizer, [], max_new_tokens=3)


def test_generation_stops_at_the_end_of_the_context(tiny):
    r = run(tiny, "Hello", max_new_tokens=100, eos_ids=set(), context_length=12)
    assert len(r.token_ids) == 12 - 5 and r.stop_reason == "context"


class NoisyOracle(Policy):
    """Drafts the true greedy continuation, corrupted at random: exercises verification."""

    verifies = True

    def __init__(self, reference: list[int], k: int, error_rate: float, seed: int = 0):
        self.reference, self.k, self.error_rate, self.rng = reference, k, error_rate, None
        self.seed = seed

    def reset(self):
        self.rng = random.Random(self.seed)

    def propose(self, hidden, tokens, logits):
        n = len(tokens)
        drafts = list(self.reference[n : n + self.rng.randint(0, self.k)])
        noisy = self.rng.random
        return [t if noisy() > self.error_rate else self.rng.randrange(99) for t in drafts]


class Unverified(NoisyOracle):
    verifies = False


@pytest.mark.parametrize("error_rate", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_verified_drafts_give_exactly_the_greedy_output(tiny, prompt, error_rate):
    ids = tiny.tokenizer(prompt)["input_ids"]
    ref = run(tiny, prompt, max_new_tokens=40, eos_ids=set())
    policy = NoisyOracle(ids + ref.token_ids + [0] * 8, k=4, error_rate=error_rate)
    for n in (40, 13, 1):  # the budget falls inside accepted spans too
        r = run(tiny, prompt, policy=policy, max_new_tokens=n, eos_ids=set())
        assert r.token_ids == ref.token_ids[:n]
        assert sum((n_extra + 1) * c for n_extra, c in r.stats.accepted_lengths.items()) == n
        assert sum(r.stats.accepted_lengths.values()) == r.stats.forward_passes
    if error_rate == 0.0:
        assert r.stats.forward_passes < ref.stats.forward_passes or n == 1


def test_eos_inside_a_verified_span_stops_there(tiny):
    ids = tiny.tokenizer("Hello")["input_ids"]
    ref = run(tiny, max_new_tokens=30, eos_ids=set())
    eos = ref.token_ids[9]
    policy = NoisyOracle(ids + ref.token_ids, k=4, error_rate=0.0)
    r = run(tiny, policy=policy, max_new_tokens=30, eos_ids={eos})
    assert r.token_ids == ref.token_ids[: ref.token_ids.index(eos) + 1]


def test_unverified_drafts_count_as_output_and_stats_add_up(tiny):
    ids = tiny.tokenizer("Hello")["input_ids"]
    ref = run(tiny, max_new_tokens=30, eos_ids=set())
    policy = Unverified(ids + ref.token_ids + [0] * 8, k=3, error_rate=0.0)
    r = run(tiny, policy=policy, max_new_tokens=30, eos_ids=set())
    assert r.token_ids == ref.token_ids  # perfect drafts: same text, fewer forwards
    assert r.stats.forward_passes < 30
    assert sum((n_extra + 1) * c for n_extra, c in r.stats.accepted_lengths.items()) == 30


def wide_bf16_backbone(seed: int):
    """Wide enough (d=512, grouped-query attention) that transformers' own kernels round a
    token differently in a 1-token and a 3-token bf16 forward on AVX512-BF16 CPUs."""
    from conftest import make_tiny_backbone

    return make_tiny_backbone(
        seed, dtype=torch.bfloat16, hidden_size=512, intermediate_size=2048, num_attention_heads=8
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_token_gets_the_same_bits_in_a_one_and_a_several_token_forward(seed):
    runtime = TransformersRuntime(wide_bf16_backbone(seed))
    g = torch.Generator().manual_seed(seed)
    prompt, new = torch.randint(3, 90, (60,), generator=g).tolist(), [5, 17, 33, 8]
    runtime.reset()
    runtime.feed(prompt)
    together = runtime.feed(new).clone(), runtime.logits(len(new))
    runtime.reset()
    runtime.feed(prompt)
    alone = [(runtime.feed([t]).clone(), runtime.logits(1)) for t in new]
    assert torch.equal(together[0], torch.cat([h for h, _ in alone]))
    assert torch.equal(together[1], torch.cat([lg for _, lg in alone]))


def test_verify_equals_greedy_in_bf16():
    backbone = wide_bf16_backbone(0)
    for prompt in PROMPTS:
        ids = backbone.tokenizer(prompt)["input_ids"]
        ref = run(backbone, prompt, max_new_tokens=30, eos_ids=set())
        policy = NoisyOracle(ids + ref.token_ids + [0] * 8, k=3, error_rate=0.3)
        assert run(backbone, prompt, policy=policy, max_new_tokens=30, eos_ids=set()).token_ids == (
            ref.token_ids
        )


def test_patched_kernels_respect_padding_in_a_batch():
    """Batched callers (self-distillation) pass left padding: the row-by-row attention must
    hand those forwards back to transformers rather than attend the pads."""
    from conftest import make_tiny_backbone
    from transformers import DynamicCache

    from clp.runtime import patch_kernels

    model = make_tiny_backbone(seed=3).model
    ids, mask = torch.tensor([[0, 0, 5, 6], [8, 9, 10, 11]]), torch.tensor([[0, 0, 1, 1], [1] * 4])

    def run() -> torch.Tensor:
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, cache=cache)
        full = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
        return model(input_ids=ids[:, 1:] + 10, attention_mask=full, cache=cache).logits

    reference = run()  # transformers' kernels
    patch_kernels(model, torch.float32)
    assert torch.allclose(run(), reference, atol=1e-5)


def test_stock_kernels_are_restored_after_a_baseline(tiny):
    from clp.runtime import stock_kernels

    model = TransformersRuntime(tiny).model
    patched = [m for m in model.modules() if "forward" in m.__dict__]
    assert patched and model.config._attn_implementation != "sdpa"
    with stock_kernels(model):
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert model.config._attn_implementation == "sdpa"
    assert [m for m in model.modules() if "forward" in m.__dict__] == patched
    assert model.config._attn_implementation != "sdpa"


def test_bf16_runtime_runs(tiny):
    from conftest import make_tiny_backbone

    bb = make_tiny_backbone(dtype=torch.bfloat16)
    r = run(bb, max_new_tokens=5, eos_ids=set())
    assert len(r.token_ids) == 5
