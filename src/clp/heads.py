"""MTP head architectures on a frozen backbone, and their save / load with a fingerprint.

Head j (1..k) proposes token n+1+j; no head proposes n+1, which the backbone always chooses
(Backbone-as-Architect), except the ``competing`` ablation. Heads reuse the backbone's frozen
input embedding and LM head (optionally restricted to a reduced draft vocabulary), so only
their small blocks are trained and saved.

- ``medusa``: head j = ResBlock(s) on h_n -> LM head. It does not know token n+1.
- ``chain``: head 1 reads [norm h_n ; norm E(x_{n+1})] through a 2d->d projection and an MLP
  block; head j+1 reads head j's output state and the embedding of head j's token. With
  ``context``, head 1 also attends over the earlier positions of the reply (each one's
  [h_i ; E(x_{i+1})] projected the same way), as EAGLE's draft layer does: h_n alone was
  computed before x_{n+1} was known, so it cannot say what followed x_{n+1} the last time.
- ``competing``: medusa-style heads for offsets 0..k-1: head 0 proposes n+1 itself.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from clp.errors import ClpError

ARCHS = ("medusa", "chain", "competing")


@dataclass
class HeadConfig:
    arch: str = "chain"
    k: int = 2
    hidden_size: int = 0
    vocab_size: int = 0
    draft_vocab_size: int = 0  # 0: the full vocabulary
    layers: int = 1  # blocks per head
    mlp_ratio: float = 2.0
    context: bool = False  # chain only: head 1 attends over the reply so far
    context_window: int = 0  # the longest reply context heads were trained on (0: unknown)
    fingerprint: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # data, steps, held-out metrics

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ClpError(
                f"unknown head architecture '{self.arch}'; use one of {', '.join(ARCHS)}"
            )
        if not 1 <= self.k <= 4:
            raise ClpError(f"k must be 1..4, got {self.k}")
        if self.context and self.arch != "chain":
            raise ClpError(f"context attention needs --arch chain, not '{self.arch}'")

    @property
    def first_offset(self) -> int:
        """Offset after n+1 of head 1's token: 1 (n+2), or 0 (n+1) for the competing ablation."""
        return 0 if self.arch == "competing" else 1


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(
            x.dtype
        ) * self.weight


class ResBlock(nn.Module):
    """Medusa's block: x + SiLU(Wx), W zero-initialised so a new head starts as the LM head."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, d)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x):
        return x + F.silu(self.linear(x))


class MLPBlock(nn.Module):
    def __init__(self, d: int, ratio: float):
        super().__init__()
        self.norm = RMSNorm(d)
        self.up = nn.Linear(d, int(d * ratio), bias=False)
        self.down = nn.Linear(int(d * ratio), d, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, x):
        return x + self.down(F.silu(self.up(self.norm(x))))


def rotate(x: torch.Tensor, start: int) -> torch.Tensor:
    """Rotary position embedding of [B, H, T, dh] at positions start..start+T-1."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
    angle = torch.arange(start, start + x.shape[-2], dtype=torch.float32)[:, None] * freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


Past = tuple[torch.Tensor, torch.Tensor]  # keys and values [B, H, P, dh] of earlier positions


class ContextAttention(nn.Module):
    """Causal self-attention over the reply's positions; output zero-initialised, so new
    context heads start as plain chain heads."""

    def __init__(self, d: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, d // head_dim)
        self.norm = RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(
        self, x: torch.Tensor, past: Past | None = None, start: int | None = None
    ) -> tuple[torch.Tensor, Past]:
        """x [B, T, d] at positions ``start``.. (default: right after ``past``), attending
        over ``past`` and itself: (output [B, T, d], keys and values of past and x)."""
        B, T, d = x.shape
        q, k, v = (
            t.view(B, T, self.heads, -1).transpose(1, 2)
            for t in self.qkv(self.norm(x)).chunk(3, dim=-1)
        )
        cached = 0 if past is None else past[0].shape[2]
        start = cached if start is None else start
        q, k = rotate(q, start), rotate(k, start)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        mask = torch.ones(T, cached + T, dtype=torch.bool).tril(cached)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, d)), (k, v)


class ChainStep(nn.Module):
    """One chain head: (previous state, embedding of the token before mine) -> my state."""

    def __init__(self, d: int, layers: int, ratio: float, context: bool = False):
        super().__init__()
        self.norm_state = RMSNorm(d)
        self.norm_token = RMSNorm(d)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.attention = ContextAttention(d) if context else None
        self.blocks = nn.Sequential(*[MLPBlock(d, ratio) for _ in range(layers)])
        self.norm_out = RMSNorm(d)

    def mix(self, state, token_emb):
        return self.proj(torch.cat([self.norm_state(state), self.norm_token(token_emb)], dim=-1))

    def forward(self, state, token_emb, context=None):
        """``context``: what ``attention`` read from the reply up to here (context heads)."""
        x = self.mix(state, token_emb)
        if context is not None:
            x = x + context
        x = self.blocks(x)
        return x, self.norm_out(x)


class MTPHeads(nn.Module):
    """k heads over a frozen backbone's embedding and LM head.

    ``forward`` is teacher-forced (training): ``tokens[:, j]`` is the token before head j+1's,
    i.e. x_{n+1}, x_{n+2}, ... ``propose`` chains the heads on their own argmax (decoding).
    Logits are over the draft vocabulary; ``draft_ids`` maps them back to backbone token ids.
    """

    def __init__(
        self,
        config: HeadConfig,
        embedding: torch.Tensor,
        lm_head: torch.Tensor,
        draft_ids: torch.Tensor | None = None,
    ):
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        if draft_ids is None:
            draft_ids = torch.arange(config.vocab_size)
        self.register_buffer("draft_ids", draft_ids.long(), persistent=False)
        # frozen backbone weights, shared (not copied) where possible; never saved
        self.embedding = embedding
        self.lm_head = lm_head[self.draft_ids] if len(draft_ids) < lm_head.shape[0] else lm_head
        if config.arch == "chain":
            self.steps = nn.ModuleList(
                ChainStep(d, config.layers, config.mlp_ratio, config.context and j == 0)
                for j in range(config.k)
            )
        else:
            self.steps = nn.ModuleList(
                nn.Sequential(*[ResBlock(d) for _ in range(config.layers)]) for _ in range(config.k)
            )

    def truncated(self, k: int) -> MTPHeads:
        """The first ``k`` heads, sharing weights: head j never depends on later heads, so
        this is what heads trained with horizon k would be if trained jointly with more."""
        if not 1 <= k <= self.config.k:
            raise ClpError(f"these heads have k={self.config.k}; cannot run the first {k}")
        if k == self.config.k:
            return self
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.config = replace(self.config, k=k)
        new.steps = nn.ModuleList(list(self.steps)[:k])
        return new

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def draft_logits(self, state):
        return F.linear(state, self.lm_head.to(state.dtype))

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor, context=None):
        """Draft-vocabulary logits of each head, teacher-forced: [B, V'] per head."""
        return [self.draft_logits(s) for s in self.states(hidden, tokens, context)]

    def context(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        past: Past | None = None,
        start: int | None = None,
    ) -> tuple[torch.Tensor, Past]:
        """Head 1's attention over reply positions [B, T] (h_i and the token x_{i+1} that
        followed), each position seeing itself and those before it, after ``past``:
        (context [B, T, d] for ``states`` / ``chain``, keys and values for the next call)."""
        step = self.steps[0]
        x = step.mix(hidden, self.embedding[next_ids].to(hidden.dtype))
        return step.attention(x, past, start)

    def states(self, hidden: torch.Tensor, tokens: torch.Tensor, context=None) -> list:
        """Each head's output state (what the LM head reads), teacher-forced: [B, d] per head.
        Head j's state stands in for the backbone's hidden state one position before its token.
        Context heads need ``context``, head 1's attention output at each row."""
        out = []
        state = hidden
        for j, step in enumerate(self.steps):
            if self.config.arch == "chain":
                state, normed = step(
                    state,
                    self.embedding[tokens[:, j]].to(hidden.dtype),
                    context if j == 0 else None,
                )
                out.append(normed)
            else:
                out.append(step(hidden))
        return out

    def chain(
        self, hidden: torch.Tensor, first_token: torch.Tensor, n: int | None = None, context=None
    ):
        """Greedy proposals of the first ``n`` heads (all by default) for a batch, each chain
        head fed the previous head's token: ids [B, n] for positions n+2, n+3, ... (n+1, ...
        for the competing ablation), with each head's logits and output state."""
        n = self.config.k if n is None else n
        ids, logits_out, states = [], [], []
        state, prev = hidden, first_token
        for j, step in enumerate(self.steps[:n]):
            if self.config.arch == "chain":
                ctx = context if j == 0 else None
                state, normed = step(state, self.embedding[prev].to(hidden.dtype), ctx)
            else:
                state = normed = step(hidden)
            logits = self.draft_logits(normed)
            prev = self.draft_ids[logits.argmax(-1)]
            ids.append(prev)
            logits_out.append(logits)
            states.append(state)
        ids = torch.stack(ids, 1) if ids else torch.zeros((len(hidden), 0), dtype=torch.long)
        return ids, logits_out, states

    @torch.inference_mode()
    def run(self, hidden: torch.Tensor, token: int, n: int | None = None, context=None):
        """``chain`` for one position, as decoding uses it: (ids, logits [V'], states [1, d]).
        Context heads need ``context`` [d] from a ``ReplyContext``."""
        if self.config.context and context is None and (n is None or n > 0):
            raise ClpError("context heads propose with the reply's context (ReplyContext)")
        ids, logits, states = self.chain(
            hidden[None].to(self.lm_head.dtype),
            torch.tensor([token]),
            n,
            None if context is None else context[None].to(self.lm_head.dtype),
        )
        return ids[0].tolist(), [lg[0] for lg in logits], states

    def propose(self, hidden: torch.Tensor, token: int, n: int | None = None, context=None):
        return self.run(hidden, token, n, context)[0]


class ReplyContext:
    """Decoding-time state of a context head: keys and values of the reply's committed
    positions. ``advance`` takes the positions committed since its last call, ending with the
    current one, and returns head 1's context for the current one (None for other heads).
    Past the longest reply the heads were trained on, only that many latest positions are
    kept: no distance the attention never saw."""

    def __init__(self, heads: MTPHeads):
        self.heads = heads
        self.window = heads.config.context_window
        self.reset()

    def reset(self) -> None:
        self.past: Past | None = None
        self.length = 0

    @torch.inference_mode()
    def advance(self, hidden: torch.Tensor, next_ids: list[int]) -> torch.Tensor | None:
        """``hidden`` [m, d] of the new positions, ``next_ids`` the m tokens that follow them."""
        if not self.heads.config.context:
            return None
        keep = self.window - len(next_ids)
        if self.past is not None and self.window and self.past[0].shape[2] > keep:
            self.past = tuple(t[:, :, max(0, self.past[0].shape[2] - keep) :] for t in self.past)
            self.past = self.past if self.past[0].shape[2] else None
        dtype = self.heads.lm_head.dtype
        out, self.past = self.heads.context(
            hidden[None].to(dtype), torch.tensor([next_ids]), self.past, self.length
        )
        self.length += len(next_ids)
        return out[0, -1]


# ----- save / load --------------------------------------------------------------------------------


def save_heads(heads: MTPHeads, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in heads.state_dict().items()}
    state["draft_ids"] = heads.draft_ids.to(torch.int32)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json.tmp").write_text(json.dumps(asdict(heads.config), indent=1))
    os.replace(out / "config.json.tmp", out / "config.json")


def read_config(path: str | Path) -> HeadConfig:
    path = Path(path)
    try:
        return HeadConfig(**json.loads((path / "config.json").read_text()))
    except FileNotFoundError as exc:
        raise ClpError(f"no heads at {path} (config.json missing)") from exc
    except (json.JSONDecodeError, TypeError) as exc:
        raise ClpError(f"corrupted heads config at {path}/config.json: {exc}") from exc


def check_fingerprint(expected: dict, actual: dict, what: str) -> None:
    """Fail clearly when saved artifacts belong to another backbone."""
    keys = ("hidden_size", "vocab_size", "lm_head_sha")
    diff = [k for k in keys if expected.get(k) != actual.get(k)]
    if diff:
        raise ClpError(
            f"{what} were trained for backbone {_describe(expected)}, not for "
            f"{_describe(actual)}; mismatch in {', '.join(diff)}"
        )


def _describe(fp: dict) -> str:
    return f"'{fp.get('name')}' (d={fp.get('hidden_size')}, vocab={fp.get('vocab_size')})"


def load_heads(path: str | Path, backbone, dtype: torch.dtype | None = None) -> MTPHeads:
    from clp.features import fingerprint

    path = Path(path)
    config = read_config(path)
    check_fingerprint(config.fingerprint, fingerprint(backbone), f"heads at {path}")
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ClpError(f"corrupted heads weights at {path}/model.safetensors: {exc}") from exc
    draft_ids = state.pop("draft_ids").long()
    dtype = dtype or backbone.dtype
    heads = MTPHeads(config, *frozen_weights(backbone, dtype), draft_ids=draft_ids)
    try:
        heads.load_state_dict(state)
    except RuntimeError as exc:
        raise ClpError(f"heads weights at {path} do not match their config: {exc}") from exc
    return heads.to(dtype).eval().requires_grad_(False)


def frozen_weights(backbone, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's input embedding and LM-head matrices, detached."""
    emb = backbone.model.get_input_embeddings().weight.detach().to(dtype)
    head = backbone.model.get_output_embeddings().weight.detach().to(dtype)
    return emb, head
