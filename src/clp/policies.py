"""The decoding modes (docs/design.md, Policies), as policies of the one loop in ``clp.decoding``.

Every policy but ``competing`` keeps the backbone's own token at n+1; they differ only in
how many head proposals follow it and whether the backbone checks them.
"""

from __future__ import annotations

import torch

from clp.decoding import Policy, Tree
from clp.errors import ClpError
from clp.heads import TREE_SHAPES, MTPHeads
from clp.predictor import Gate, LengthPredictor, accept_length, confidence_features


class AcceptAll(Policy):
    """``mtp``: naive multi-token prediction, every proposal accepted unverified."""

    name = "mtp"

    def __init__(self, heads: MTPHeads):
        self.heads = heads

    def propose(self, hidden, tokens, logits):
        return self.heads.propose(hidden, tokens[-1])


class PredictedLength(Policy):
    """``clp``: the paper's linear predictor on h_n picks L; only heads 1..L run."""

    name = "clp"

    def __init__(self, heads: MTPHeads, predictor: LengthPredictor, tau: float):
        self.heads, self.predictor, self.tau = heads, predictor, tau

    def length(self, hidden, tokens, logits) -> int:
        if self.tau > 1:
            return 0
        with torch.inference_mode():
            probs = torch.softmax(self.predictor(hidden[None]), -1)
        return int(accept_length(probs, self.tau)[0])

    def propose(self, hidden, tokens, logits):
        n = self.length(hidden, tokens, logits)
        return self.heads.propose(hidden, tokens[-1], n) if n else []


class PredictedLengthPlus(PredictedLength):
    """``clp+``: one linear layer over [h_n ; confidence of the backbone and of each head].
    The heads run first (their confidence is an input), so all k always run."""

    name = "clp+"

    def propose(self, hidden, tokens, logits):
        if self.tau > 1:
            return []
        with torch.inference_mode():
            ids, head_logits, _ = self.heads.run(hidden, tokens[-1])
            feats = confidence_features(logits[None], [lg[None] for lg in head_logits])
            x = torch.cat([hidden[None].float(), feats], dim=-1)
            n = int(accept_length(torch.softmax(self.predictor(x), -1), self.tau)[0])
        return ids[:n]


class Gated(Policy):
    """``gate``: prior work's per-position binary gate; accept while P(accept) >= 0.5."""

    name = "gate"

    def __init__(self, heads: MTPHeads, gate: Gate, threshold: float = 0.5):
        self.heads, self.gate, self.threshold = heads, gate, threshold

    def propose(self, hidden, tokens, logits):
        with torch.inference_mode():
            ids, _, states = self.heads.run(hidden, tokens[-1])
            accepted = []
            for token, state in zip(ids, states, strict=True):
                if torch.sigmoid(self.gate(hidden[None], state)).item() < self.threshold:
                    break
                accepted.append(token)
        return accepted


def prompt_lookup(tokens: list[int], num_tokens: int, max_ngram: int = 2, min_ngram: int = 1):
    """The tokens that followed the first earlier occurrence of the sequence's last n-gram
    (longest n first, down to ``min_ngram``): prompt-lookup decoding's draft."""
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + num_tokens]
    return []


class Verified(Policy):
    """``verify``: proposals are checked by the backbone in the next forward (lossless).
    With a predictor, only as many proposals as it accepts are sent. With ``lookup`` > 0,
    when the last two tokens occurred earlier in the prompt or output, the ``lookup`` tokens
    that followed them are the drafts instead of the heads': copied spans (names, code,
    quoted text) are where the heads miss and a lookup rarely does (see
    benchmarks/draft_sim.py). With ``tree_nodes`` > 0 the drafts are a tree of that many
    nodes, the lookup span one more branch: the heads' dynamic tree (``MTPHeads.tree``), or
    with ``tree`` "static" the shape their held-out rank accuracy suggests
    (``MTPHeads.static_shape``). A chain of the heads' drafts stops before the first whose
    chain probability under the heads is below ``min_prob`` (``MTPHeads.propose``)."""

    name = "verify"
    verifies = True

    def __init__(
        self,
        heads: MTPHeads,
        predictor: LengthPredictor | None = None,
        tau: float = 0.0,
        lookup: int = 0,
        tree_nodes: int = 0,
        tree: str = "dynamic",
        min_prob: float = 0.0,
    ):
        if tree not in TREE_SHAPES:
            raise ClpError(f"unknown tree '{tree}'; choose from {', '.join(TREE_SHAPES)}")
        if not 0 <= min_prob < 1:
            raise ClpError(f"the drafts' minimum probability must be in [0, 1), got {min_prob}")
        self.heads, self.lookup, self.tree_nodes = heads, lookup, tree_nodes
        self.min_prob = min_prob
        self.length = PredictedLength(heads, predictor, tau).length if predictor else None
        self.shapes = None
        if tree == "static" and tree_nodes:  # per budget left beside the lookup span
            self.shapes = {b: heads.static_shape(b) for b in range(1, tree_nodes + 1)}

    def propose(self, hidden, tokens, logits):
        copied = prompt_lookup(tokens, self.lookup, min_ngram=2) if self.lookup else []
        if copied and not self.tree_nodes:
            return copied
        n = self.length(hidden, tokens, logits) if self.length else None
        if not self.tree_nodes:
            return self.heads.propose(hidden, tokens[-1], n, self.min_prob) if n != 0 else []
        budget = self.tree_nodes - len(copied)  # the lookup span is one more branch
        tree = None
        if n != 0 and budget > 0:
            if self.shapes:
                tree = self.heads.static_tree(hidden, tokens[-1], self.shapes[budget], n)
            else:
                tree = self.heads.tree(hidden, tokens[-1], budget, n)
        return Tree(*(tree or ([], []))).with_chain(copied)


class PromptLookup(Policy):
    """``lookup``: prompt-lookup decoding as a baseline on the same loop and runtime — drafts
    are ``prompt_lookup``'s, checked by the backbone like ``verify``. No heads, nothing
    trained."""

    name = "lookup"
    verifies = True

    def __init__(self, num_tokens: int = 3, max_ngram: int = 2):
        self.num_tokens, self.max_ngram = num_tokens, max_ngram

    def propose(self, hidden, tokens, logits):
        return prompt_lookup(tokens, self.num_tokens, self.max_ngram)


class Competing(Policy):
    """``competing``: the ablation the paper warns against — a head, not the backbone,
    chooses token n+1, and the remaining heads follow it unverified."""

    name = "competing"

    def __init__(self, heads: MTPHeads):
        if heads.config.first_offset != 0:
            raise ValueError("competing mode needs heads trained with --arch competing")
        self.heads = heads
        self._pending: list[int] = []

    def first_token(self, hidden, backbone_token):
        self._pending = self.heads.propose(hidden, backbone_token)
        return self._pending[0]

    def propose(self, hidden, tokens, logits):
        return self._pending[1:]
