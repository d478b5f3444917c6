"""The narrow interface the decode loop uses to talk to a backbone, and its transformers runtime.

A runtime keeps one sequence's KV cache. The loop feeds it new tokens and gets their final
hidden states (after the final norm: what the LM head reads), asks for logits of the rows it
needs, and drops cache entries of rejected tokens. Nothing else. Another runtime (llama.cpp,
say) can back the same loop by implementing these few methods.

Token trees: ``feed(tokens, parents)`` runs several draft branches in one forward, each token
attending to the cache and its own ancestors at position cache length + depth, and
``keep(rows)`` then compacts the cache to the accepted path.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from clp.backbones import Backbone


class Runtime(Protocol):
    hidden_size: int
    vocab_size: int

    def reset(self) -> None:
        """Forget the sequence: the next feed starts a new one."""

    def feed(self, tokens: list[int], parents: list[int] | None = None) -> torch.Tensor:
        """Append tokens to the sequence; return their final hidden states, shape [n, d]
        (a runtime may return only the last row of the first feed, the prompt). With
        ``parents`` the tokens are a tree: token i follows token parents[i] (< i), or the
        cache when -1; each row gets the bits it would get if its path were fed alone."""

    def logits(self, last: int = 1) -> torch.Tensor:
        """Next-token logits (float32) of the last ``last`` tokens of the latest feed: [last, V]."""

    def drop_last(self, n: int) -> None:
        """Remove the last n tokens from the cache (rejected drafts)."""

    def keep(self, rows: list[int]) -> None:
        """Keep only rows ``rows`` (ascending: a root-to-node path) of the latest feed, moved
        into place after the cache before it: the cache of that path fed alone."""

    @property
    def length(self) -> int:
        """Tokens in the cache."""


def tree_rows(parents: list[int]) -> tuple[list[int], list[list[int]]]:
    """Each fed row's depth (0 for a child of the cache) and its ancestors and itself, in
    order: where it sits and which of the new rows it attends to."""
    depths: list[int] = []
    lines: list[list[int]] = []
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"row {i} has parent {p}: a parent must come before its child")
        depths.append(0 if p == -1 else depths[p] + 1)
        lines.append([i] if p == -1 else [*lines[p], i])
    return depths, lines


def tree_keys(start: int, parents: list[int]) -> list[torch.Tensor]:
    """Per fed row, the cache indices its attention reads: the cache before the feed, then
    its ancestors and itself (gathered: the same values, in the order its path fed alone
    reads them, so the same bits)."""
    _, lines = tree_rows(parents)
    return [torch.cat([torch.arange(start), torch.tensor(line) + start]) for line in lines]


def _few_rows_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear for a handful of rows as W @ x^T: on CPUs where MKL's x @ W^T kernel for
    2-8 rows costs several times one row, this form costs about one row."""
    rows = x.numel() // x.shape[-1]
    if rows > 16:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    y = torch.mm(self.weight, x.reshape(rows, -1).t()).t()
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], -1)


def _one_kernel_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear with one row computed as two: oneDNN's bf16 one-row kernel sums a long
    row in another order than its several-row kernel, so the same token would round differently
    in a 1-token and a 3-token forward and `verify` would drift from `ar` at near-ties. The
    several-row kernel gives each row the same bits for 2-8 rows and costs what one row
    costs (measured on AMD Zen 4, AVX512-BF16)."""
    if x.numel() != x.shape[-1]:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    pair = torch.cat([x, x], dim=-2) if x.dim() > 1 else torch.stack([x, x])
    return torch.nn.functional.linear(pair, self.weight, self.bias)[..., :1, :].reshape(
        *x.shape[:-1], -1
    )


ROW_BY_ROW_ATTENTION = "clp_row_by_row_sdpa"


def _row_by_row_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, except that new tokens over a cache (up to 16) attend one
    query row at a time, each with its own keys, no mask, and the query heads of a key/value
    group packed as rows. Why: transformers attends one new token (grouped heads, no mask) and
    several (heads expanded, mask) through different kernels that round bf16 differently,
    so `verify` would drift from `ar` at near-ties; row by row, a token gets the same bits in
    a 1-token and a 3-token forward. The packed layout also avoids torch's slow CPU path for a
    one-token grouped-query SDPA (~240 against ~30 us a layer, Zen 4). A prefill, longer
    feeds, padded batches and sliding windows in reach keep transformers' path. A token tree
    (``tree_keys``, one key index per row) always runs here: a node reads exactly the keys
    its path fed alone reads, in the same order."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    (b, heads, q_len, dim), (kv_heads, kv_len) = query.shape, key.shape[1:3]
    window = kwargs.get("sliding_window")
    tree = kwargs.get("tree_keys") is not None  # a token tree: always row by row
    if not tree and (
        q_len == kv_len
        or q_len > 16
        or (window and kv_len > window)
        or _padded(attention_mask)  # checked last: it reads the mask
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    group = heads // kv_heads
    keys = kwargs.get("tree_keys") or [None] * q_len
    rows = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, i].reshape(b, kv_heads, group, dim),
            *row_keys(key, value, kv_len - q_len + i + 1, keys[i]),
            scale=kwargs.get("scaling"),
        ).reshape(b, 1, heads, dim)
        for i in range(q_len)
    ]
    return torch.cat(rows, dim=1), None


def row_keys(key, value, end: int, index: torch.Tensor | None, dim: int = 2):
    """One row's keys and values along sequence axis ``dim``: the causal prefix up to
    ``end``, or a tree row's own (``tree_keys``)."""
    if index is None:
        return key.narrow(dim, 0, end), value.narrow(dim, 0, end)
    return key.index_select(dim, index), value.index_select(dim, index)


def _padded(attention_mask: torch.Tensor | None) -> bool:
    """Whether a batched caller padded: the last new token sees every key unless it did."""
    if attention_mask is None:
        return False
    return not (attention_mask.dtype == torch.bool and bool(attention_mask[..., -1, :].all()))


def patch_kernels(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Route the model's linear layers and attention through the forms above (same weights,
    no copied modeling code): fp32 linear layers through ``_few_rows_linear`` (speed), bf16
    ones through ``_one_kernel_linear`` and SDPA attention through ``_row_by_row_sdpa`` (a
    token gets the same bits whatever the forward's width)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    form = {torch.float32: _few_rows_linear, torch.bfloat16: _one_kernel_linear}.get(dtype)
    for module in model.modules():
        if form and isinstance(module, torch.nn.Linear) and module.weight.dtype == dtype:
            module.forward = types.MethodType(form, module)
    if model.config._attn_implementation == "sdpa":
        AttentionInterface.register(ROW_BY_ROW_ATTENTION, _row_by_row_sdpa)
        AttentionMaskInterface.register(ROW_BY_ROW_ATTENTION, sdpa_mask)
        model.set_attn_implementation(ROW_BY_ROW_ATTENTION)


@contextmanager
def stock_kernels(model: torch.nn.Module) -> Iterator[None]:
    """transformers' own linear layers and attention for the duration: baselines such as
    ``model.generate`` are timed as users get them."""
    patched = {m: m.__dict__.pop("forward") for m in model.modules() if "forward" in m.__dict__}
    attention = model.config._attn_implementation
    if attention == ROW_BY_ROW_ATTENTION:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        for module, forward in patched.items():
            module.forward = forward
        if attention == ROW_BY_ROW_ATTENTION:
            model.set_attn_implementation(attention)


class TransformersRuntime:
    """Runs a Hugging Face causal LM with its own DynamicCache, no ``generate``."""

    def __init__(self, backbone: Backbone, patched: bool = True):
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
        self._fed = 0  # tokens of the latest feed
        self._hidden: torch.Tensor | None = None
        if patched:  # see patch_kernels; False keeps transformers' kernels (comparisons)
            patch_kernels(self.model, backbone.dtype)

    def reset(self) -> None:
        self.cache = self._cache_cls(config=self.model.config)
        self._length = 0

    @torch.inference_mode()
    def feed(self, tokens: list[int], parents: list[int] | None = None) -> torch.Tensor:
        if self.cache is None:
            self.reset()
        ids = torch.tensor([tokens], dtype=torch.long)
        tree = self._tree_inputs(parents) if parents is not None else {}
        out = self.decoder(input_ids=ids, cache=self.cache, use_cache=True, **tree)
        self._length += len(tokens)
        self._fed = len(tokens)
        self._hidden = out.last_hidden_state[0]
        return self._hidden

    def _tree_inputs(self, parents: list[int]) -> dict:
        """Positions (cache length + depth), the 4D mask of each row's keys (the cache and
        its ancestors) and the same as index lists for the row-by-row attention."""
        start, n = self._length, len(parents)
        depths, lines = tree_rows(parents)
        mask = torch.zeros(1, 1, n, start + n, dtype=torch.bool)
        mask[..., :start] = True
        for i, line in enumerate(lines):
            mask[0, 0, i, [start + j for j in line]] = True
        return {
            "position_ids": torch.tensor([depths]) + start,
            "attention_mask": mask,
            "tree_keys": tree_keys(start, parents),
        }

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

    def keep(self, rows: list[int]) -> None:
        start = self._length - self._fed
        if rows == list(range(len(rows))):  # a prefix: nothing moves
            return self.drop_last(self._fed - len(rows))
        index = torch.cat([torch.arange(start), torch.tensor(rows) + start])
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
        self._length = start + len(rows)

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
    with that position's hidden state, logits and tokens: what per-step extras are timed on.
    Token ids wrap at the vocabulary size, so tiny test vocabularies work too."""
    tokens = [i % runtime.vocab_size for i in [*range(100, 200), 42]]
    runtime.reset()
    hidden = runtime.feed(tokens)[-1]
    logits = runtime.logits(1)[0]

    def one_forward():
        runtime.feed([7])
        runtime.drop_last(1)

    return timed(one_forward, repeats), hidden, logits, tokens
