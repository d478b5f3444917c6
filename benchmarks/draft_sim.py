"""Tokens per forward that draft shapes would reach, measured offline on greedy outputs.

`verify` is lossless, so its output is the `ar` output; which drafts it accepts depends
only on the decode hidden states and the tokens. This records both during one `ar` run
per prompt and then replays several draft shapes (chains, small trees, prompt lookup)
against the known continuation: a cheap way to choose a shape before timing it. (A tree's
rows are counted once per distinct prefix; "head 2 reused" chains past the heads' k.)

    python benchmarks/draft_sim.py --prompts sharegpt --n 30 --max-new-tokens 96 --record runs/sg.pt

(`--record` keeps the recorded runs, so other shapes replay in about a minute.)

Measured on an AMD EPYC Zen 4 (2 vCPUs, AVX512-BF16; qwen2.5-coder-0.5b bf16, committed k=2
heads), tokens per forward and rows fed per forward; chosen on the held-out ShareGPT prompts,
MT-Bench (64 tokens) as a check:

    shape                         ShareGPT 30x96   MT-Bench 80x64
    chain2 (verify, heads only)   1.646 @ 2.96     1.631 @ 2.96
    lookup3 (prompt lookup)       1.463 @ 2.51     1.289 @ 2.35
    tree chain2 + lookup2         2.169 @ 3.90     1.895 @ 3.74
    bigram2 | chain2              2.032 @ 2.96     1.794 @ 2.96
    bigram3 | chain2              2.169 @ 3.25     1.843 @ 3.15
    bigram4 | chain2 (default)    2.246 @ 3.51     1.871 @ 3.31
    tri4 | bi3 | chain2           2.244 @ 3.40     1.864 @ 3.23

"bigramN | chain2": N tokens copied after the last bigram's earlier occurrence if there is
one, else the heads' two. A tree needs rows that attend off the first branch; on the
transformers runtime that cost ~5.5 ms a forward more than a chain of as many rows (Zen 4,
400-token context: 1/3/4/5-token chains 80.6/85.9/90.2/94.0 ms, 4/5-row trees 95.7/99.3),
so the chain that picks one source wins.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from tqdm import tqdm

import clp
from clp.bench import load_prompts
from clp.decoding import Policy, generate
from clp.policies import prompt_lookup as lookup
from clp.prompts import encode_prompt


class Recorder(Policy):
    """``ar`` that keeps each step's hidden state and the backbone's token."""

    def __init__(self):
        self.rows: list[tuple[torch.Tensor, int]] = []

    def propose(self, hidden, tokens, logits):
        self.rows.append((hidden.clone(), tokens[-1]))
        return []


def matched(draft: list[int], truth: list[int]) -> int:
    m = 0
    for d, t in zip(draft, truth, strict=False):
        if d != t:
            break
        m += 1
    return m


@torch.inference_mode()
def candidates(heads, h, token, width: int, depth: int):
    """Top-``width`` tokens of head 1, each followed by a greedy chain of ``depth - 1`` more
    (head 2 reused past its own offset): a list of branches, best first."""
    dtype = heads.lm_head.dtype
    step1 = heads.steps[0]
    state, normed = step1(h[None].to(dtype), heads.embedding[torch.tensor([token])].to(dtype))
    top = heads.draft_logits(normed)[0].topk(width).indices
    branches = []
    for i in top:
        tok = int(heads.draft_ids[i])
        branch, s, prev = [tok], state, torch.tensor([tok])
        for _ in range(depth - 1):
            step = heads.steps[min(len(branch), len(heads.steps) - 1)]
            s, nrm = step(s, heads.embedding[prev].to(dtype))
            prev = heads.draft_ids[heads.draft_logits(nrm).argmax(-1)]
            branch.append(int(prev))
        branches.append(branch)
    return branches


def simulate(shapes, prompt, out_ids, rows, heads):
    """Replay each shape over one output: (steps, tokens, rows fed) per shape."""
    res = {name: [0, 0, 0] for name in shapes}
    for name, shape in shapes.items():
        i = 0
        while i < len(out_ids):
            if i >= len(rows):  # the last token: generation ended, nothing proposed after it
                res[name][0] += 1
                res[name][1] += 1
                res[name][2] += 1
                break
            h, token = rows[i]
            truth = out_ids[i + 1 :]
            branches = shape(heads, h, token, prompt + out_ids[: i + 1])
            fed = 1 + len({tuple(b[:j]) for b in branches for j in range(1, len(b) + 1)})
            m = max((matched(b, truth) for b in branches), default=0)
            res[name][0] += 1
            res[name][1] += 1 + m
            res[name][2] += fed
            i += 1 + m
    return res


def first(*drafts):
    return next((d for d in drafts if d), [])


SHAPES = {
    "chain2": lambda H, h, t, c: candidates(H, h, t, 1, 2),
    "lookup3": lambda H, h, t, c: [lookup(c, 3)],
    "tree chain2+lookup2": lambda H, h, t, c: [candidates(H, h, t, 1, 2)[0], lookup(c, 2)],
    "bigram2|chain2": lambda H, h, t, c: [first(lookup(c, 2, 2, 2), candidates(H, h, t, 1, 2)[0])],
    "bigram3|chain2": lambda H, h, t, c: [first(lookup(c, 3, 2, 2), candidates(H, h, t, 1, 2)[0])],
    "bigram4|chain2": lambda H, h, t, c: [first(lookup(c, 4, 2, 2), candidates(H, h, t, 1, 2)[0])],
    "trigram3|chain2": lambda H, h, t, c: [first(lookup(c, 3, 3, 3), candidates(H, h, t, 1, 2)[0])],
    "tri3|bi2|chain2": lambda H, h, t, c: [
        first(lookup(c, 3, 3, 3), lookup(c, 2, 2, 2), candidates(H, h, t, 1, 2)[0])
    ],
    "tri4|bi3|chain2": lambda H, h, t, c: [
        first(lookup(c, 4, 3, 3), lookup(c, 3, 2, 2), candidates(H, h, t, 1, 2)[0])
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--prompts", default="sharegpt")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--record", default=None, help="Save (or reuse) the ar runs in this file.")
    args = ap.parse_args()
    model = clp.load(args.model, args.dtype)
    heads = model.heads()
    if args.record and os.path.exists(args.record):
        runs = torch.load(args.record)
    else:
        runs = []
        for doc in tqdm(load_prompts(args.prompts, args.n), desc="ar"):
            ids = encode_prompt(model.tokenizer, doc.prompt)
            rec = Recorder()
            res = generate(
                model.runtime,
                model.tokenizer,
                ids,
                rec,
                args.max_new_tokens,
                eos_ids=model.backbone.eos_token_ids,
            )
            runs.append((ids, res.token_ids, rec.rows))
        if args.record:
            torch.save(runs, args.record)
    totals = {name: [0, 0, 0] for name in SHAPES}
    for ids, out, rows in tqdm(runs, desc="replay"):
        for name, (s, t, f) in simulate(SHAPES, ids, out, rows, heads).items():
            totals[name][0] += s
            totals[name][1] += t
            totals[name][2] += f
    report = {
        name: {"tokens_per_forward": round(t / s, 4), "rows_per_forward": round(f / s, 3)}
        for name, (s, t, f) in totals.items()
    }
    print(json.dumps({"prompts": args.prompts, "n": args.n, "shapes": report}, indent=1))


if __name__ == "__main__":
    main()
