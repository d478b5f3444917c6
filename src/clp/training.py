"""Head training from a feature cache (the backbone is never run here), and its held-out report.

The truth is always the backbone's greedy token: head j at row n is scored against the greedy
token at n+1+j (``greedy[n+j]``), whether the cache was self-distilled or read from real text.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from clp.errors import ClpError
from clp.heads import TREE_RANKS, HeadConfig, MTPHeads, save_heads

IGNORE = -100


class Rows:
    """Index arithmetic over a loaded cache for heads with horizon k."""

    def __init__(self, data: dict[str, torch.Tensor], config: HeadConfig):
        self.data = data
        span = config.k - 1 + config.first_offset  # farthest row whose greedy token is a target
        doc = data["doc"]
        n = len(doc)
        valid = torch.zeros(n, dtype=torch.bool)
        if n > span:
            valid[: n - span] = doc[: n - span] == doc[span:]
        self.index = valid.nonzero()[:, 0]
        self.k, self.first = config.k, config.first_offset

    def batch(self, rows: torch.Tensor):
        """hidden [B, d]; input tokens [B, k] (x_{n+1}..x_{n+k}); greedy targets [B, k]."""
        d = self.data
        hidden = d["hidden"][rows]
        tokens = torch.stack([d["next"][rows + j] for j in range(self.k)], 1).long()
        targets = torch.stack([d["greedy"][rows + j + self.first] for j in range(self.k)], 1).long()
        return hidden, tokens, targets

    def target_states(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's hidden state each head's token is read from: [B, d] per head."""
        return [self.data["hidden"][rows + j + self.first] for j in range(self.k)]


def draft_vocabulary(greedy: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor | None:
    """The ``size`` most frequent backbone tokens in the training data (None: full vocab)."""
    if not size or size >= vocab_size:
        return None
    counts = torch.bincount(greedy.long(), minlength=vocab_size)
    return torch.sort(torch.topk(counts, size).indices).values


def _target_map(draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    table = torch.full((vocab_size,), IGNORE, dtype=torch.long)
    table[draft_ids] = torch.arange(len(draft_ids))
    return table


def train_heads(
    heads: MTPHeads,
    data: dict[str, torch.Tensor],
    out: str | Path,
    epochs: float = 2.0,
    batch_size: int = 256,
    lr: float = 1e-3,
    checkpoint_every: int = 200,
    seed: int = 0,
    feature_loss: float = 0.0,
    log=print,
) -> dict:
    """Train in place with AdamW and a cosine schedule; checkpoint and resume from ``out``.

    ``feature_loss`` > 0 adds EAGLE's feature regression: each head's output state is pulled
    towards the backbone's own hidden state at the position its token is read from (smooth L1
    on states scaled to unit RMS), a d-dimensional target per row instead of one token id."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = Rows(data, heads.config)
    if len(rows.index) == 0:
        raise ClpError("the feature cache has no rows long enough for these heads")
    to_draft = _target_map(heads.draft_ids, heads.config.vocab_size)
    scale = data["hidden"][:4096].float().pow(2).mean().sqrt().clamp(min=1e-6)
    steps_per_epoch = math.ceil(len(rows.index) / batch_size)
    total = max(1, int(epochs * steps_per_epoch))
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)),
    )
    ckpt = out / "checkpoint.pt"
    step, losses = 0, []
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, losses = state["step"], state["losses"]
        log(f"resuming from step {step} of {total}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [torch.randperm(len(rows.index), generator=gen) for _ in range(math.ceil(epochs) + 1)]
    )
    heads.train()
    start = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="training heads", unit="step", mininterval=5)
    while step < total:
        pick = rows.index[order[step * batch_size : (step + 1) * batch_size]]
        hidden, tokens, targets = rows.batch(pick)
        states = heads.states(hidden.float(), tokens)
        loss = _loss([heads.draft_logits(s) for s in states], to_draft[targets])
        if feature_loss:
            truth = rows.target_states(pick)
            loss = loss + feature_loss * sum(
                F.smooth_l1_loss(s / scale, t.float() / scale)
                for s, t in zip(states, truth, strict=True)
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
        if step % checkpoint_every == 0 or step == total:
            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                {
                    "heads": heads.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step,
                    "losses": losses,
                },
                tmp,
            )
            os.replace(tmp, ckpt)
    bar.close()
    heads.eval()
    return {
        "steps": total,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "feature_loss": feature_loss,
        "rows": len(rows.index),
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "first_loss": round(sum(losses[:20]) / max(1, len(losses[:20])), 4),
        "last_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
    }


def _loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over heads and rows whose target is in the draft vocabulary (a
    batch where none is must not give NaN)."""
    total = sum(
        F.cross_entropy(lg.float(), targets[:, j], ignore_index=IGNORE, reduction="sum")
        for j, lg in enumerate(logits)
    )
    return total / (targets != IGNORE).sum().clamp(min=1)


@torch.no_grad()
def evaluate_heads(
    heads: MTPHeads,
    data: dict[str, torch.Tensor],
    batch_size: int = 512,
    max_rows: int | None = None,
) -> dict:
    """Held-out agreement with the backbone's greedy tokens, per offset.

    top1 / top3: teacher-forced (each head gets the true previous tokens); ranks: the share
    at which the token is each head's r-th likeliest, teacher-forced (static trees' input).
    chained: the heads run on their own proposals, as decoding uses them. prefix: heads 1..j
    all right, chained — what verification would accept; 1 + sum(prefix) is the tokens per
    forward it allows.
    """
    rows = Rows(data, heads.config)
    index = rows.index if max_rows is None else rows.index[:max_rows]
    k = heads.config.k
    hits = {m: torch.zeros(k) for m in ("top1", "top3", "chained", "prefix")}
    rank_hits = torch.zeros(k, TREE_RANKS)
    coverage = 0
    for b in range(0, len(index), batch_size):
        hidden, tokens, targets = rows.batch(index[b : b + batch_size])
        hidden = hidden.float()
        tf_logits = heads(hidden, tokens)
        chained = heads.chain(hidden, tokens[:, 0])[0]
        all_right = torch.ones(len(targets), dtype=torch.bool)
        for j in range(k):
            ranks = min(TREE_RANKS, tf_logits[j].shape[-1])
            ranked = heads.draft_ids[tf_logits[j].float().topk(ranks, dim=-1).indices]
            right_at = ranked == targets[:, j, None]  # [B, ranks]: which rank is the token
            rank_hits[j, :ranks] += right_at.sum(0)
            hits["top1"][j] += right_at[:, 0].sum()
            hits["top3"][j] += right_at[:, :3].any(-1).sum()
            right = chained[:, j] == targets[:, j]
            hits["chained"][j] += right.sum()
            all_right &= right
            hits["prefix"][j] += all_right.sum()
        coverage += torch.isin(targets, heads.draft_ids).float().mean(1).sum()
    n = max(1, len(index))
    offsets = [j + 1 + heads.config.first_offset for j in range(k)]
    report = {
        m: {f"n+{o}": round(float(v[j]) / n, 4) for j, o in enumerate(offsets)}
        for m, v in hits.items()
    }
    report["ranks"] = {
        f"n+{o}": [round(float(v) / n, 4) for v in rank_hits[j]] for j, o in enumerate(offsets)
    }
    report["rows"] = int(len(index))
    report["draft_vocab_coverage"] = round(float(coverage) / n, 4)
    report["tokens_per_forward_if_verified"] = round(1 + float(hits["prefix"].sum()) / n, 4)
    return report


def new_heads(config: HeadConfig, backbone, data: dict[str, torch.Tensor], draft_vocab: int):
    from clp.features import fingerprint
    from clp.heads import frozen_weights

    config.hidden_size, config.vocab_size = backbone.hidden_size, backbone.vocab_size
    config.fingerprint = fingerprint(backbone)
    draft_ids = draft_vocabulary(data["greedy"], draft_vocab, backbone.vocab_size)
    config.draft_vocab_size = 0 if draft_ids is None else len(draft_ids)
    return MTPHeads(config, *frozen_weights(backbone, torch.float32), draft_ids=draft_ids)


def warm_heads(
    init: str | Path, config: HeadConfig, backbone, data: dict[str, torch.Tensor], draft_vocab: int
) -> MTPHeads:
    """Saved heads made trainable, to continue training on new data (e.g. self-distilled
    after teacher-forced, or on more of it). They must be what was asked for: a silent switch
    of architecture would train something else than the command says. The draft vocabulary
    is taken anew from ``data`` (the trained blocks do not depend on it), so more data also
    covers more of the tokens the heads must propose."""
    from clp.heads import load_heads

    heads = load_heads(init, backbone, torch.float32)
    saved = heads.config
    draft_vocab = 0 if draft_vocab >= backbone.vocab_size else draft_vocab
    asked = {
        "arch": config.arch,
        "k": config.k,
        "layers": config.layers,
        "mlp-ratio": config.mlp_ratio,
        "draft-vocab": draft_vocab,
    }
    have = {
        "arch": saved.arch,
        "k": saved.k,
        "layers": saved.layers,
        "mlp-ratio": saved.mlp_ratio,
        "draft-vocab": saved.draft_vocab_size,
    }
    diff = [f"--{key} {have[key]} (asked {asked[key]})" for key in asked if asked[key] != have[key]]
    if diff:
        raise ClpError(
            f"heads at {init} have {', '.join(diff)}; pass the same options to train them further"
        )
    warm = new_heads(replace(saved, training={}), backbone, data, draft_vocab)
    warm.steps.load_state_dict(heads.steps.state_dict())
    return warm.train().requires_grad_(True)


def finish(heads: MTPHeads, out: str | Path, info: dict) -> None:
    heads.config.training = info
    save_heads(heads, out)
    ckpt = Path(out) / "checkpoint.pt"
    if ckpt.exists():
        ckpt.unlink()
