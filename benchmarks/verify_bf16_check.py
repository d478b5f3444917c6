"""Where `verify` and `ar` differ in bf16, re-run the prompt in fp32: a bf16 near-tie makes
them agree there. Prints, per differing prompt, the first divergence and the fp32 verdict.

    python benchmarks/verify_bf16_check.py --model qwen2.5-coder-0.5b --n 12 --max-new-tokens 64
    python benchmarks/verify_bf16_check.py --bench results/qwen2.5-coder-0.5b-bf16-mtbench80

With ``--bench DIR`` the bf16 outputs come from a `clp bench` run (its runs.jsonl) instead of
being generated again, and the top-1/top-2 gap is measured in fp32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import clp
from clp.data import mtbench
from clp.metrics import first_divergence
from clp.prompts import encode_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=clp.DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--bench", default=None, help="a clp bench folder (mtbench prompts, bf16)")
    args = ap.parse_args()
    if args.bench:
        from_bench(Path(args.bench))
        return
    bf16 = clp.load(args.model, "bf16")
    prompts = [encode_prompt(bf16.tokenizer, d.prompt) for d in mtbench()[: args.n]]
    differing = []
    for i, ids in enumerate(prompts):
        ar = bf16.generate(ids, max_new_tokens=args.max_new_tokens).token_ids
        ver = bf16.generate(ids, mode="verify", max_new_tokens=args.max_new_tokens).token_ids
        if ar != ver:
            pos = first_divergence(ar, ver)
            with torch.inference_mode():  # the bf16 margin of ar's choice at that position
                rt = bf16.runtime
                rt.reset()
                rt.feed(ids + ar[:pos])
                top2 = torch.softmax(rt.logits(1)[0], -1).topk(2).values
            differing.append((i, pos, float(top2[0] - top2[1])))
    print(f"bf16: verify differs from ar on {len(differing)} of {len(prompts)} prompts")
    del bf16
    fp32 = clp.load(args.model, "fp32")
    for i, pos, margin in differing:
        ar = fp32.generate(prompts[i], max_new_tokens=args.max_new_tokens).token_ids
        ver = fp32.generate(prompts[i], mode="verify", max_new_tokens=args.max_new_tokens).token_ids
        print(
            f"prompt {i}: first bf16 divergence at token {pos}, bf16 top-1/top-2 probability "
            f"gap there {margin:.4f}; fp32 verify == ar: {ar == ver}"
        )


@torch.inference_mode()
def from_bench(folder: Path) -> None:
    settings = json.loads((folder / "run.json").read_text())
    records = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    fp32 = clp.load(settings["model"], "fp32")
    docs = mtbench()
    budget = settings["max_new_tokens"]
    differing = [r for r in records if r["runs"]["verify"]["ids"] != r["runs"]["ar"]["ids"]]
    print(f"{settings['dtype']}: verify differs from ar on {len(differing)} of {len(records)}")
    ties = 0
    for r in differing:
        ids = encode_prompt(fp32.tokenizer, docs[r["prompt"]].prompt)
        ar_bf16 = r["runs"]["ar"]["ids"]
        pos = first_divergence(ar_bf16, r["runs"]["verify"]["ids"])
        rt = fp32.runtime
        rt.reset()
        rt.feed(ids + ar_bf16[:pos])
        top2 = torch.softmax(rt.logits(1)[0], -1).topk(2).values
        gap = float(top2[0] - top2[1])
        ar = fp32.generate(ids, max_new_tokens=budget).token_ids
        ver = fp32.generate(ids, mode="verify", max_new_tokens=budget).token_ids
        ties += ar == ver
        print(
            f"prompt {r['prompt']}: first divergence at token {pos}, fp32 top-1/top-2 "
            f"probability gap there {gap:.4f}; fp32 verify == ar: {ar == ver}",
            flush=True,
        )
    print(f"fp32 verify == ar on {ties} of the {len(differing)} differing prompts")


if __name__ == "__main__":
    main()
