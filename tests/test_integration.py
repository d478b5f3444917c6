"""The bundled smollm2-135m in fp32: our loop against transformers' own generate."""

from __future__ import annotations

import pytest
import torch

from clp.api import Model
from clp.prompts import encode_prompt

PROMPTS = [
    "What is the capital of France?",  # answered in a few tokens: ends at EOS
    "Write a Python function that reverses a string.",
    "Explain photosynthesis in one paragraph.",
    "List three colors.",
    "def fibonacci(n):",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 13?",
    "Give me a haiku about autumn.",
    "Why is the sky blue?",
    "Summarize the plot of Hamlet.",
]

pytestmark = pytest.mark.integration


def test_ar_greedy_matches_model_generate(smollm2_fp32):
    model = Model(smollm2_fp32)
    hit_eos = 0
    for prompt in PROMPTS:
        ids = encode_prompt(model.tokenizer, prompt)
        ours = model.generate(ids, max_new_tokens=48)
        with torch.inference_mode():
            ref = smollm2_fp32.model.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=48,
                eos_token_id=sorted(smollm2_fp32.eos_token_ids),
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        assert ours.token_ids == ref, prompt
        hit_eos += ours.stop_reason == "eos"
    assert hit_eos >= 1


VERIFY_PROMPTS = PROMPTS + [
    "Name a prime number.",
    "Write a for loop in Python that prints 0 to 4.",
    "What is the boiling point of water?",
    "Say hello in French.",
    "What does CPU stand for?",
    "Give one synonym for happy.",
    "How many legs does a spider have?",
    "Write a SQL query selecting all rows from users.",
    "What color is a ripe banana?",
    "Complete: The early bird catches the",
]


def test_verify_with_committed_heads_equals_ar_greedy(smollm2_fp32):
    from clp.api import default_heads_dir

    if default_heads_dir("smollm2-135m") is None:
        pytest.fail("the committed smollm2-135m artifacts are missing")
    model = Model(smollm2_fp32)
    accepted = eos = 0
    for prompt in VERIFY_PROMPTS:
        for n in (40, 13):
            ar = model.generate(prompt, max_new_tokens=n)
            ver = model.generate(prompt, mode="verify", max_new_tokens=n)
            assert ver.token_ids == ar.token_ids, (prompt, n)
            accepted += sum(c for extra, c in ver.stats.accepted_lengths.items() if extra)
            eos += ver.stop_reason == "eos"
    assert accepted > 0 and eos > 0
