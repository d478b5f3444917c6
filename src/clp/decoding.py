"""The one decode loop. Every mode (docs/design.md, Policies) is a policy plugged into it.

Each step feeds the runtime ``[token the backbone chose] + drafts``. A policy that does not
verify has already committed its drafts (they are part of the text); a verifying policy's
drafts are checked here against the backbone's own choice at each position, the longest
agreeing prefix is kept, and the rejected tail is dropped from the cache. Either way the
backbone then picks the next token itself (Backbone-as-Architect) and the policy proposes
drafts after it.

A verifying policy may instead propose a ``Tree`` of drafts: every branch is checked in the
same one forward (each node attends to the cache and its own ancestors), the longest path the
backbone agrees with is kept and the cache is compacted to it (``Runtime.keep``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from clp.errors import ClpError
from clp.runtime import Runtime, tree_rows


@dataclass
class SamplingConfig:
    """How the backbone's own token is chosen: greedy when temperature is 0."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise ClpError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ClpError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ClpError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    def __init__(self, config: SamplingConfig):
        config.validate()
        self.config = config
        self.generator = torch.Generator()
        self.generator.manual_seed(config.seed if config.seed is not None else 0)

    def __call__(self, logits: torch.Tensor) -> int:
        """One token from one row of logits."""
        c = self.config
        if c.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / c.temperature
        if c.top_k:
            kth = torch.topk(logits, min(c.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if c.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, 0) - sorted_probs > c.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))


class Policy:
    """What a decoding mode decides after the backbone chose its token.

    ``propose`` returns draft tokens to follow the sequence so far (whose last token the
    backbone just chose, from state ``hidden`` and next-token ``logits``). If ``verifies`` is False
    they are accepted as they are; if True the loop checks them in the next forward.
    """

    name = "ar"
    verifies = False

    def reset(self) -> None:
        """Called before each generation."""

    def first_token(self, hidden: torch.Tensor, backbone_token: int) -> int:
        """The token at n+1. Only the competing-head ablation overrides the backbone here."""
        return backbone_token

    def propose(self, hidden: torch.Tensor, tokens: list[int], logits: torch.Tensor) -> list[int]:
        return []


@dataclass(frozen=True)
class Tree:
    """Draft tokens as a tree: ``parents[i]`` is the index of node i's parent (< i), or -1
    for a child of the backbone's own token. A chain is the tree whose parents are i - 1."""

    tokens: list[int]
    parents: list[int]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("a tree needs one parent per token")
        tree_rows(self.parents)  # each node's parent comes before it (or is -1)

    @classmethod
    def chain(cls, tokens: list[int]) -> Tree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    def with_chain(self, tokens: list[int]) -> Tree:
        """This tree with ``tokens`` as one more branch from the root, sharing the nodes
        that already hold its first tokens."""
        out_tokens, out_parents, node = list(self.tokens), list(self.parents), -1
        for token in tokens:
            pairs = list(zip(out_parents, out_tokens, strict=True))
            if (node, token) in pairs:
                node = pairs.index((node, token))
            else:
                out_tokens.append(token)
                out_parents.append(node)
                node = len(out_tokens) - 1
        return Tree(out_tokens, out_parents)

    def depths(self) -> list[int]:
        """Depth of each node: 1 for a child of the backbone's token."""
        return [d + 1 for d in tree_rows(self.parents)[0]]


@dataclass
class Stats:
    new_tokens: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    policy_seconds: float = 0.0  # spent in the policy (heads, predictor, gate), not the backbone
    prompt_tokens: int = 0
    accepted_lengths: Counter = field(default_factory=Counter)  # extra tokens kept per step
    offset_proposed: Counter = field(default_factory=Counter)  # draft offset j -> times sent
    offset_accepted: Counter = field(default_factory=Counter)  # draft offset j -> times kept

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forward_passes if self.forward_passes else 0.0

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "forward_passes": self.forward_passes,
            "seconds": round(self.seconds, 4),
            "policy_seconds": round(self.policy_seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "prompt_tokens": self.prompt_tokens,
            "accepted_lengths": dict(sorted(self.accepted_lengths.items())),
            "acceptance_by_offset": {
                j: self.offset_accepted[j] / n for j, n in sorted(self.offset_proposed.items())
            },
        }


@dataclass
class Result:
    text: str
    token_ids: list[int]
    stats: Stats
    stop_reason: str  # "eos", "stop_string", "max_new_tokens", "context" or "cancelled"


class Output:
    """Collects committed tokens: stops at EOS, stop strings or the token budget, and streams
    text once it can no longer change (no half character, no possible start of a stop string)."""

    def __init__(
        self,
        tokenizer,
        max_new_tokens: int,
        eos_ids: set[int],
        stop: list[str],
        on_text: Callable[[str], None] | None,
    ):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stop_reason: str | None = None

    def add(self, tokens: list[int]) -> int:
        """Commit tokens in order until one ends generation; return how many were kept."""
        for i, token in enumerate(tokens):
            self.ids.append(token)
            if token in self.eos_ids:
                self.stop_reason = "eos"
            elif len(self.ids) >= self.max_new_tokens:
                self.stop_reason = "max_new_tokens"
            if self.stop or self.on_text:
                self._update_text()
            if self.stop_reason:
                self._flush()
                return i + 1
        self._flush(final=False)
        return len(tokens)

    def _update_text(self) -> None:
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            # only a stop string that ends in the newest token can be new
            start = self.text.find(s, max(0, self.emitted - len(s)))
            if start != -1:
                self.text = self.text[:start]
                self.stop_reason = "stop_string"
                return

    def _flush(self, final: bool = True) -> None:
        if not self.on_text:
            return
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end -= 1
            for s in self.stop:  # hold back what may be the start of a stop string
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text[end - n : end] == s[:n]:
                        end = min(end, len(self.text) - n)
                        break
        if end > self.emitted:
            self.on_text(self.text[self.emitted : end])
            self.emitted = end

    def final_text(self) -> str:
        if not (self.stop or self.on_text):
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self.text


def generate(
    runtime: Runtime,
    tokenizer,
    prompt_ids: list[int],
    policy: Policy | None = None,
    max_new_tokens: int = 128,
    sampling: SamplingConfig | None = None,
    eos_ids: set[int] | None = None,
    stop: list[str] | None = None,
    context_length: int | None = None,
    on_text: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Result:
    """Decode from ``prompt_ids`` with ``policy`` (plain autoregressive when None).

    ``should_stop`` is asked before each forward: when it says True the loop ends there with
    stop reason "cancelled" (a server whose client went away stops paying for its tokens).
    """
    policy = policy or Policy()
    if not prompt_ids:
        raise ClpError("the prompt is empty")
    if max_new_tokens <= 0:
        raise ClpError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if context_length and len(prompt_ids) >= context_length:
        raise ClpError(
            f"the prompt has {len(prompt_ids)} tokens; the model's context holds {context_length}"
        )
    select = Sampler(sampling or SamplingConfig())
    budget = max_new_tokens
    if context_length:
        budget = min(budget, context_length - len(prompt_ids))
    out = Output(tokenizer, budget, eos_ids or set(), stop or [], on_text)
    stats = Stats(prompt_tokens=len(prompt_ids))
    policy.reset()
    runtime.reset()
    start = time.perf_counter()

    prompt_ids = list(prompt_ids)
    feed, drafts = prompt_ids, []
    while True:
        if should_stop is not None and should_stop():
            out.stop_reason = "cancelled"
            break
        tree = drafts if isinstance(drafts, Tree) else None
        if tree is not None:  # the backbone's token is the root, row 0
            hidden = runtime.feed(feed, [-1] + [p + 1 for p in tree.parents])
        else:
            hidden = runtime.feed(feed)
        stats.forward_passes += 1
        committed = 0
        if tree is not None:
            rows = hidden[-(len(tree.tokens) + 1) :]
            all_logits = runtime.logits(len(rows))
            path, choices = _walk(tree, all_logits, select)
            depths = set(tree.depths())
            for j in depths:
                stats.offset_proposed[j] += 1
                stats.offset_accepted[j] += j <= len(path)
            runtime.keep([0] + [i + 1 for i in path])
            committed += out.add([tree.tokens[i] for i in path])
            last = path[-1] + 1 if path else 0
            h, logits, token = rows[last], all_logits[last], choices[-1]
        elif policy.verifies and drafts:
            rows = hidden[-(len(drafts) + 1) :]
            all_logits = runtime.logits(len(rows))
            kept, choices = _verify(drafts, all_logits, select)
            for j in range(1, len(drafts) + 1):
                stats.offset_proposed[j] += 1
                stats.offset_accepted[j] += j <= kept
            runtime.drop_last(len(drafts) - kept)
            committed += out.add(drafts[:kept])
            h, logits, token = rows[kept], all_logits[kept], choices[kept]
        else:
            h = hidden[-1]
            logits = runtime.logits(1)[0]
            token = select(logits)
        drafts = []
        if not out.stop_reason:
            tick = time.perf_counter()
            token = policy.first_token(h, token)
            stats.policy_seconds += time.perf_counter() - tick
            committed += out.add([token])
        if not out.stop_reason:
            tick = time.perf_counter()
            drafts = policy.propose(h, prompt_ids + out.ids, logits)
            stats.policy_seconds += time.perf_counter() - tick
            if not policy.verifies:  # unverified drafts are final at once
                committed += out.add(drafts)
        stats.accepted_lengths[committed - 1] += 1
        if out.stop_reason:
            break
        if isinstance(drafts, Tree) and not drafts.tokens:
            drafts = []
        feed = [token] + (drafts.tokens if isinstance(drafts, Tree) else drafts)
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = len(out.ids)
    reason = out.stop_reason
    if reason == "max_new_tokens" and budget < max_new_tokens:
        reason = "context"
    return Result(out.final_text(), out.ids, stats, reason)


def _verify(drafts: list[int], logits: torch.Tensor, select: Sampler) -> tuple[int, list[int]]:
    """The backbone's own choice at each draft position, up to the first disagreement.

    Returns how many drafts it confirms and its choices (one more than that). Sampling each
    position and keeping drafts equal to the sample leaves the output distribution unchanged.
    """
    choices: list[int] = []
    for row in logits:
        choices.append(select(row))
        j = len(choices) - 1
        if j == len(drafts) or choices[j] != drafts[j]:
            return j, choices
    raise AssertionError("logits must have one row more than drafts")


def _walk(tree: Tree, logits: torch.Tensor, select: Sampler) -> tuple[list[int], list[int]]:
    """The backbone's own choice at each node from the root, descending into the child that
    holds it, until no child does.

    Returns the accepted nodes (indices into the tree) and the choices made (one more).
    ``logits`` row 0 is the root's, row i + 1 node i's. Each choice is drawn from the
    backbone's distribution given exactly the path above it, and becomes the next output
    token whether or not a child holds it, so the output is drawn as plain sampling draws it
    (with the same seed, the same draws): the sampling distribution is unchanged.
    """
    children: dict[tuple[int, int], int] = {}
    for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents, strict=True)):
        children.setdefault((parent, token), i)
    path: list[int] = []
    choices: list[int] = []
    node = -1
    while True:
        choices.append(select(logits[node + 1]))
        node = children.get((node, choices[-1]), -2)
        if node == -2:
            return path, choices
        path.append(node)
