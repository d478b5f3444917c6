"""The bundled smollm2-135m: our loop against transformers' own generate, verify against ar."""

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
    model = Model(smollm2_fp32, runtime="transformers")
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


@pytest.mark.parametrize("runtime", ["transformers", "cpu"])
def test_verify_with_a_tree_of_head_drafts_equals_ar(smollm2_fp32, runtime):
    """Greedy and seeded sampling: the committed heads' dynamic tree (8 nodes) and the lookup
    span, verified in one forward per step, give exactly ar's tokens."""
    model = Model(smollm2_fp32, runtime=runtime)
    deeper = 0
    for i, prompt in enumerate(VERIFY_PROMPTS[:10]):
        for kw in ({}, {"temperature": 0.8, "top_p": 0.9, "seed": i})[: 1 + (i < 3)]:
            ar = model.generate(prompt, max_new_tokens=40, **kw)
            tree = model.generate(prompt, mode="verify", tree_nodes=8, max_new_tokens=40, **kw)
            assert tree.token_ids == ar.token_ids, (prompt, kw)
            deeper += sum(c for extra, c in tree.stats.accepted_lengths.items() if extra)
    assert deeper > 0


def test_verify_equals_ar_in_bf16_as_well():
    """bf16 rounds every step, so this holds only because the runtime gives each token the
    same bits however many tokens a forward carries (clp.runtime.patch_kernels)."""
    from clp.backbones import load_backbone

    model = Model(load_backbone("smollm2-135m", "bf16"))
    for prompt in VERIFY_PROMPTS:
        ar = model.generate(prompt, max_new_tokens=40)
        ver = model.generate(prompt, mode="verify", max_new_tokens=40)
        assert ver.token_ids == ar.token_ids, prompt
        assert ver.stats.forward_passes <= ar.stats.forward_passes


def test_bench_smoke_runs_everything_with_consistent_numbers(tmp_path):
    """`clp bench --smoke`: every mode, both baselines and both sweeps on smollm2-135m."""
    import json
    import math

    from click.testing import CliRunner

    from clp.cli import SMOKE, main

    torch.set_num_threads(2)
    res = CliRunner().invoke(main, ["bench", "--smoke", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "results.json").read_text())
    for key in ("model", "dtype", "prompts", "n", "max_new_tokens", "modes"):
        assert key in r
    assert (r["model"], r["n"], r["completed_prompts"]) == ("smollm2-135m", 3, 3)
    plots = (
        "speed_vs_repetition",
        "speed_vs_nll",
        "acceptance_by_offset",
        "accepted_length_histogram",
    )
    for png in plots:
        assert (tmp_path / f"{png}.png").stat().st_size > 1000
    names = set(r["modes"])
    assert set(SMOKE["modes"].split(",")) <= names
    assert {"clp@tau=0.5", "clp+@tau=0.9", "verify@tau=0.5", "mtp@k=1", "verify@k=1"} <= names
    ar = r["modes"]["ar"]
    for name, s in r["modes"].items():
        for key in ("tokens_per_second", "speedup", "tokens_per_forward", "repetition_ratio",
                    "repetition_delta", "backbone_nll", "distinct_2"):  # fmt: skip
            assert math.isfinite(s[key]) and s[key] >= -1, (name, key)
        assert s["speedup"] == pytest.approx(s["tokens_per_second"] / ar["tokens_per_second"], 1e-3)
        assert s["tokens_per_second"] == pytest.approx(s["new_tokens"] / s["seconds"], 1e-3)
        assert s["tokens_per_forward"] == pytest.approx(s["new_tokens"] / s["forward_passes"], 1e-3)
        assert s["repetition_delta"] == pytest.approx(
            s["repetition_ratio"] - ar["repetition_ratio"], abs=2e-4
        )
        assert 0 <= s["agreement_with_ar"]["common_prefix"] <= 1
        assert (s["policy_share"] is None) == (
            name in ("hf-generate", "prompt-lookup", "llama.cpp")
        )
        assert s["vs_llama_cpp"] == pytest.approx(
            s["tokens_per_second"] / r["modes"]["llama.cpp"]["tokens_per_second"], 1e-3
        )
        assert s["policy_share"] is None or 0 <= s["policy_share"] < 1
        assert all(0 <= v <= 1 for v in s["acceptance_by_offset"].values())
    assert r["modes"]["mtp"]["tokens_per_forward"] == 3.0
    assert r["runtime"] == "cpu" and r["machine"]["peak_rss_mb"] > 100
    # lossless on any runtime; the transformers baselines (hf-generate, prompt-lookup) run the
    # dense checkpoint, not the cpu runtime's q4 weights, so they are not compared with its ar
    for name in ("verify", "verify@k=1", "verify@tau=0.5", "lookup"):
        assert r["modes"][name]["agreement_with_ar"]["identical"] == 1.0, name
