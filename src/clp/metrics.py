"""The measurements (docs/design.md, Metrics), one definition each."""

from __future__ import annotations

import statistics

import torch


def repetition_ratio(ids: list[int], n: int = 4) -> float:
    """seq-rep-n of one output: 1 - unique n-grams / all n-grams (0 when too short)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def standard_error(values: list[float]) -> float:
    """Standard error of the mean (0 for fewer than two values): how far a mean over these
    prompts could move on other prompts like them."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def distinct_n(ids: list[int], n: int = 2) -> float:
    """Unique n-grams / all n-grams of one output."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def first_divergence(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token sequences."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def common_prefix_share(a: list[int], b: list[int]) -> float:
    """Length of the common prefix / length of the longer sequence (1.0 when identical)."""
    longest = max(len(a), len(b))
    return first_divergence(a, b) / longest if longest else 1.0


@torch.inference_mode()
def backbone_nll(backbone, prompt_ids: list[int], output_ids: list[int]) -> float:
    """Mean negative log-likelihood per output token under the backbone, teacher-forced."""
    if not output_ids:
        return 0.0
    ids = torch.tensor([prompt_ids + output_ids])
    hidden = backbone.model.get_decoder()(input_ids=ids).last_hidden_state[0]
    rows = hidden[len(prompt_ids) - 1 : -1]
    logp = torch.log_softmax(backbone.model.get_output_embeddings()(rows).float(), -1)
    return float(-logp[torch.arange(len(output_ids)), torch.tensor(output_ids)].mean())


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
