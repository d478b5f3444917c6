"""The narrow interface the decode loop uses to talk to a backbone, and its transformers runtime.

A runtime keeps one sequence's KV cache. The loop feeds it new tokens and gets their final
hidden states (after the final norm: what the LM head reads), asks for logits of the rows it
needs, and drops cache entries of rejected tokens. Nothing else. Another runtime (llama.cpp,
say) can back the same loop by implementing these few methods.
"""

from __future__ import annotations

from typing import Protocol

import torch

from clp.backbones import Backbone


class Runtime(Protocol):
    hidden_size: int
    vocab_size: int

    def reset(self) -> None:
        """Forget the sequence: the next feed starts a new one."""

    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Append tokens to the sequence; return their final hidden states, shape [n, d]."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (float32) for hidden states of shape [n, d]."""

    def drop_last(self, n: int) -> None:
        """Remove the last n tokens from the cache (rejected drafts)."""

    @property
    def length(self) -> int:
        """Tokens in the cache."""


class TransformersRuntime:
    """Runs a Hugging Face causal LM with its own DynamicCache, no ``generate``."""

    def __init__(self, backbone: Backbone):
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
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
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
