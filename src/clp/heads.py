"""MTP head architectures on a frozen backbone, and their save / load with a fingerprint.

Head j (1..k) proposes token n+1+j; no head proposes n+1, which the backbone always chooses
(Backbone-as-Architect), except the ``competing`` ablation. Heads reuse the backbone's frozen
input embedding and LM head (optionally restricted to a reduced draft vocabulary), so only
their small blocks are trained and saved.

- ``medusa``: head j = ResBlock(s) on h_n -> LM head. It does not know token n+1.
- ``chain``: head 1 reads [norm h_n ; norm E(x_{n+1})] through a 2d->d projection and an MLP
  block; head j+1 reads head j's output state and the embedding of head j's token.
- ``competing``: medusa-style heads for offsets 0..k-1: head 0 proposes n+1 itself.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from clp.errors import ClpError
from clp.runtime import tree_rows

ARCHS = ("medusa", "chain", "competing")
TREE_SHAPES = ("dynamic", "static")  # verify's draft trees: see MTPHeads.tree / static_tree
TREE_RANKS = 8  # proposals per head whose held-out accuracy is recorded (static trees' input)


@dataclass
class HeadConfig:
    arch: str = "chain"
    k: int = 2
    hidden_size: int = 0
    vocab_size: int = 0
    draft_vocab_size: int = 0  # 0: the full vocabulary
    layers: int = 1  # blocks per head
    mlp_ratio: float = 2.0
    fingerprint: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # data, steps, held-out metrics

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ClpError(
                f"unknown head architecture '{self.arch}'; use one of {', '.join(ARCHS)}"
            )
        if not 1 <= self.k <= 4:
            raise ClpError(f"k must be 1..4, got {self.k}")

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


class ChainStep(nn.Module):
    """One chain head: (previous state, embedding of the token before mine) -> my state."""

    def __init__(self, d: int, layers: int, ratio: float):
        super().__init__()
        self.norm_state = RMSNorm(d)
        self.norm_token = RMSNorm(d)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.blocks = nn.Sequential(*[MLPBlock(d, ratio) for _ in range(layers)])
        self.norm_out = RMSNorm(d)

    def forward(self, state, token_emb):
        x = self.proj(torch.cat([self.norm_state(state), self.norm_token(token_emb)], dim=-1))
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
        self.draft_head: nn.Module | None = None
        if config.arch == "chain":
            self.steps = nn.ModuleList(
                ChainStep(d, config.layers, config.mlp_ratio) for _ in range(config.k)
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
        if self.draft_head is not None:  # a runtime's faster kernel for decoding (no grad)
            return self.draft_head(state)
        return F.linear(state, self.lm_head.to(state.dtype))

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Draft-vocabulary logits of each head, teacher-forced: [B, V'] per head."""
        return [self.draft_logits(s) for s in self.states(hidden, tokens)]

    def states(self, hidden: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Each head's output state (what the LM head reads), teacher-forced: [B, d] per head.
        Head j's state stands in for the backbone's hidden state one position before its token."""
        out = []
        state = hidden = hidden.to(self.lm_head.dtype)  # a runtime may run the heads in bf16
        for j, step in enumerate(self.steps):
            if self.config.arch == "chain":
                state, normed = step(state, self.embedding[tokens[:, j]].to(hidden.dtype))
                out.append(normed)
            else:
                out.append(step(hidden))
        return out

    def chain(self, hidden: torch.Tensor, first_token: torch.Tensor, n: int | None = None):
        """Greedy proposals of the first ``n`` heads (all by default) for a batch, each chain
        head fed the previous head's token: ids [B, n] for positions n+2, n+3, ... (n+1, ...
        for the competing ablation), with each head's logits and output state."""
        steps = list(self.chain_steps(hidden, first_token, n))
        if not steps:
            return torch.zeros((len(hidden), 0), dtype=torch.long), [], []
        ids, logits, states = zip(*steps, strict=True)
        return torch.stack(ids, 1), list(logits), list(states)

    def chain_steps(self, hidden: torch.Tensor, first_token: torch.Tensor, n: int | None = None):
        """``chain`` one head at a time: (ids [B], logits [B, V'], state) per head, so a caller
        that stops early does not run the later heads."""
        hidden = hidden.to(self.lm_head.dtype)  # a runtime may run the heads in bf16
        state, prev = hidden, first_token
        for step in self.steps[: self.config.k if n is None else n]:
            if self.config.arch == "chain":
                state, normed = step(state, self.embedding[prev].to(hidden.dtype))
            else:
                state = normed = step(hidden)
            logits = self.draft_logits(normed)
            prev = self.draft_ids[logits.argmax(-1)]
            yield prev, logits, state

    @torch.inference_mode()
    def run(self, hidden: torch.Tensor, token: int, n: int | None = None):
        """``chain`` for one position, as decoding uses it: (ids, logits [V'], states [1, d])."""
        ids, logits, states = self.chain(hidden[None], torch.tensor([token]), n)
        return ids[0].tolist(), [lg[0] for lg in logits], states

    @torch.inference_mode()
    def propose(
        self, hidden: torch.Tensor, token: int, n: int | None = None, min_prob: float = 0.0
    ) -> list[int]:
        """The heads' greedy chain, cut before the first draft whose chain probability (the
        product of each head's probability of its own token so far) is below ``min_prob``:
        a draft that will most likely be rejected costs a row of the next forward for
        nothing. The heads after a cut do not run."""
        ids, log_chain = [], 0.0
        floor = math.log(min_prob) if min_prob > 0 else None
        for prev, logits, _ in self.chain_steps(hidden[None], torch.tensor([token]), n):
            if floor is not None:
                lg = logits[0].float()
                log_chain += float(lg.max() - torch.logsumexp(lg, -1))
                if log_chain < floor:
                    break
            ids.append(int(prev[0]))
        return ids

    @torch.inference_mode()
    def tree(
        self, hidden: torch.Tensor, token: int, nodes: int, n: int | None = None, branch: int = 4
    ) -> tuple[list[int], list[int]]:
        """A dynamic draft tree of ``nodes`` nodes (EAGLE-2's idea): at each depth the heads
        give each of the ``branch`` most probable nodes so far their ``branch`` likeliest
        children (one batched call per head, each branch's chain head fed its own token),
        and the ``nodes`` candidates of highest path probability are kept. A node's path
        probability never exceeds its parent's, so every kept node's parent is kept too.
        Returns (tokens, parents) in breadth-first order, parents as in ``clp.decoding.Tree``
        (-1: a child of ``token``)."""
        dtype = self.lm_head.dtype
        state, prev = hidden[None].to(dtype), torch.tensor([token])
        score = torch.zeros(1)  # log path probability of the nodes expanded next
        parent_of = torch.tensor([-1])  # their candidate index (-1: the root)
        found: list[tuple[float, int, int, int]] = []  # (log prob, depth, parent, token)
        for depth, step in enumerate(self.steps[: self.config.k if n is None else n], 1):
            if self.config.arch == "chain":
                state, normed = step(state, self.embedding[prev].to(dtype))
            else:
                normed = step(hidden[None].to(dtype)).expand(len(prev), -1)
            logp = torch.log_softmax(self.draft_logits(normed).float(), -1) + score[:, None]
            top = logp.topk(min(branch, logp.shape[-1]), -1)
            first = len(found)
            for row, (values, ids) in enumerate(zip(top.values, top.indices, strict=True)):
                for value, i in zip(values.tolist(), ids.tolist(), strict=True):
                    found.append((value, depth, int(parent_of[row]), int(self.draft_ids[i])))
            best = top.values.flatten().topk(min(branch, top.values.numel())).indices
            rows = torch.div(best, top.values.shape[1], rounding_mode="floor")
            state = state[rows] if self.config.arch == "chain" else state
            prev = self.draft_ids[top.indices.flatten()[best]]
            score, parent_of = top.values.flatten()[best], first + best
        return _best_nodes(found, nodes)

    @torch.inference_mode()
    def static_tree(
        self,
        hidden: torch.Tensor,
        token: int,
        shape: tuple[list[int], list[int]],
        n: int | None = None,
    ) -> tuple[list[int], list[int]]:
        """Drafts along a static tree ``shape`` (ranks, parents) from ``static_shape``: node i
        is the ranks[i]-th likeliest proposal of the head at its depth, each chain head fed
        its parent's token (one batched call per depth); nodes deeper than ``n`` left out.
        Returns (tokens, parents)."""
        ranks, parents = shape
        depths = [d + 1 for d in tree_rows(parents)[0]]
        keep = sum(d <= (n if n is not None else len(self.steps)) for d in depths)
        ranks, parents, depths = ranks[:keep], parents[:keep], depths[:keep]  # breadth-first
        if not ranks:
            return [], []
        dtype = self.lm_head.dtype
        tokens = [0] * len(ranks)
        states: dict[int, torch.Tensor] = {-1: hidden[None].to(dtype)}
        for depth, step in enumerate(self.steps[: max(depths)], 1):
            level = [i for i, d in enumerate(depths) if d == depth]
            above = sorted({parents[i] for i in level})
            state = torch.cat([states[p] for p in above])
            if self.config.arch == "chain":
                prev = torch.tensor([token if p < 0 else tokens[p] for p in above])
                state, normed = step(state, self.embedding[prev].to(dtype))
            else:
                normed = step(hidden[None].to(dtype))
            top = self.draft_logits(normed).topk(max(ranks[i] for i in level) + 1, -1).indices
            for i in level:
                row = above.index(parents[i])
                tokens[i] = int(self.draft_ids[top[min(row, len(top) - 1), ranks[i]]])
                states[i] = state[min(row, len(state) - 1)][None]
        return tokens, parents

    def static_shape(self, nodes: int) -> tuple[list[int], list[int]]:
        """The static tree of ``nodes`` nodes these heads' held-out rank accuracy suggests."""
        ranks = self.config.training.get("heldout", {}).get("ranks")
        if not ranks:
            raise ClpError(
                "these heads record no held-out rank accuracy (config.json: training.heldout."
                "ranks), which a static tree is chosen from: run `clp train evaluate` on them, "
                "or use the dynamic tree"
            )
        return static_shape([ranks[key] for key in sorted(ranks)], nodes)


def static_shape(rank_accuracy: list[list[float]], nodes: int) -> tuple[list[int], list[int]]:
    """A static tree chosen as Medusa chooses one: the ``nodes`` paths of head ranks
    (r1, r2, ...) with the highest expected acceptance, a path's acceptance taken as the
    product of its heads' held-out accuracies at those ranks (``rank_accuracy[j][r]``: head
    j+1's r-th likeliest proposal is the backbone's token). Returns (ranks, parents) in
    breadth-first order, parents as in ``clp.decoding.Tree``."""
    found: list[tuple[float, int, int, int]] = []
    frontier = [(0.0, -1)]  # (log acceptance of the path, its node's index in found)
    for depth, accuracy in enumerate(rank_accuracy, 1):
        grown = []
        for score, parent in frontier:
            for rank, p in enumerate(accuracy):
                if p > 0:
                    found.append((score + math.log(p), depth, parent, rank))
                    grown.append((found[-1][0], len(found) - 1))
        frontier = grown
    return _best_nodes(found, nodes)


def _best_nodes(found: list[tuple[float, int, int, int]], nodes: int):
    """The ``nodes`` candidates of highest path probability (a parent before its children
    at equal probability), in breadth-first order: (tokens, parents)."""
    chosen = sorted(range(len(found)), key=lambda i: (-found[i][0], found[i][1]))[:nodes]
    chosen.sort(key=lambda i: (found[i][1], -found[i][0]))
    index = {c: j for j, c in enumerate(chosen)}
    return [found[c][3] for c in chosen], [index.get(found[c][2], -1) for c in chosen]


# ----- save / load --------------------------------------------------------------------------------


def save_heads(heads: MTPHeads, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in heads.state_dict().items()}
    state["draft_ids"] = heads.draft_ids.to(torch.int32)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    save_config(heads.config, out)


def save_config(config: HeadConfig, out: str | Path) -> None:
    out = Path(out)
    (out / "config.json.tmp").write_text(json.dumps(asdict(config), indent=1))
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
