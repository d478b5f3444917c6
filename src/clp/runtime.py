"""The narrow interface the decode loop uses to talk to a backbone, and its transformers runtime.

A runtime keeps one sequence's KV cache. The loop feeds it new tokens and gets their final
hidden states (after the final norm: what the LM head reads), asks for logits of the rows it
needs, and drops cache entries of rejected tokens. Nothing else. Another runtime (llama.cpp,
say) can back the same loop by implementing these few methods.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from typing import Protocol

import torch

from clp.backbones import Backbone


class Runtime(Protocol):
    hidden_size: int
    vocab_size: int

    def reset(self) -> None:
        """Forget the sequence: the next feed starts a new one."""

    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Append tokens to the sequence; return their final hidden states, shape [n, d]
        (a runtime may return only the last row of the first feed, the prompt)."""

    def logits(self, last: int = 1) -> torch.Tensor:
        """Next-token logits (float32) of the last ``last`` tokens of the latest feed: [last, V]."""

    def drop_last(self, n: int) -> None:
        """Remove the last n tokens from the cache (rejected drafts)."""

    @property
    def length(self) -> int:
        """Tokens in the cache."""


def _few_rows_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear for a handful of rows as W @ x^T: on CPUs where MKL's x @ W^T kernel for
    2-8 rows costs 2-3x one row (measured on AMD Zen 3), this form costs about one row."""
    rows = x.numel() // x.shape[-1]
    if rows > 16:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    y = torch.mm(self.weight, x.reshape(rows, -1).t()).t()
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], -1)


def use_few_rows_linear(model: torch.nn.Module) -> None:
    """Route the decoder's fp32 linear layers through ``_few_rows_linear`` (same weights)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
            module.forward = types.MethodType(_few_rows_linear, module)


class TransformersRuntime:
    """Runs a Hugging Face causal LM with its own DynamicCache, no ``generate``."""

    def __init__(self, backbone: Backbone, few_rows_linear: bool = True):
        from transformers import DynamicCache

        self._cache_cls = DynamicCache
        self.backbone = backbone
        self.model = backbone.model
        self.decoder = backbone.model.get_decoder()
        self.lm_head = backbone.model.get_output_embeddings()
        self.softcap = getattr(backbone.config, "final_logit_softcapping", None)
        self.hidden_size = backbone.hidden_size
        self.vocab_size = backbone.vocab_size
        self.cache = None
        self._length = 0
        self._hidden: torch.Tensor | None = None
        if few_rows_linear and backbone.dtype == torch.float32:
            use_few_rows_linear(self.model)

    def reset(self) -> None:
        self.cache = self._cache_cls(config=self.model.config)
        self._length = 0

    @torch.inference_mode()
    def feed(self, tokens: list[int]) -> torch.Tensor:
        if self.cache is None:
            self.reset()
        ids = torch.tensor([tokens], dtype=torch.long)
        out = self.decoder(input_ids=ids, cache=self.cache, use_cache=True)
        self._length += len(tokens)
        self._hidden = out.last_hidden_state[0]
        return self._hidden

    @torch.inference_mode()
    def logits(self, last: int = 1) -> torch.Tensor:
        logits = self.lm_head(self._hidden[-last:]).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def drop_last(self, n: int) -> None:
        if n > 0:
            self._length -= n
            self.cache.crop(-n)  # a negative count removes that many trailing entries

    @property
    def length(self) -> int:
        return self._length


def timed(fn: Callable[[], object], repeats: int = 30) -> float:
    """Mean seconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.inference_mode()
def decode_step_forward(runtime: Runtime, repeats: int = 30):
    """Seconds of the forward a decode step rides on (one token after a ~100-token cache),
    with that position's hidden state, logits and tokens: what per-step extras are timed on."""
    tokens = list(range(100, 200)) + [42]
    runtime.reset()
    hidden = runtime.feed(tokens)[-1]
    logits = runtime.logits(1)[0]

    def one_forward():
        runtime.feed([7])
        runtime.drop_last(1)

    return timed(one_forward, repeats), hidden, logits, tokens
