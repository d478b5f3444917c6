"""Where `verify` and `ar` differ in bf16, re-run the prompt in fp32: a bf16 near-tie makes
them agree there. Prints, per differing prompt, the first divergence and the fp32 verdict.

    python benchmarks/verify_bf16_check.py --model qwen2.5-coder-0.5b --n 12 --max-new-tokens 64
    python benchmarks/verify_bf16_check.py \
        --bench results/qwen2.5-coder-0.5b-transformers-mtbench36-modes-textheads-zen3

With ``--bench DIR`` the outputs come from a `clp bench` run (its runs.jsonl, any runtime)
instead of being generated again; the top-1/top-2 gap at the first divergence is measured on
the runtime and dtype that were timed and in fp32 on transformers.
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
    ap.add_argument("--bench", default=None, help="a clp bench folder (mtbench prompts)")
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
                differing.append((i, pos, top2_gap(bf16, ids + ar[:pos])))
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


def top2_gap(model, ids: list[int]) -> float:
    """Probability gap between the two likeliest next tokens after ``ids``."""
    model.runtime.reset()
    model.runtime.feed(ids)
    top2 = torch.softmax(model.runtime.logits(1)[0], -1).topk(2).values
    return float(top2[0] - top2[1])


@torch.inference_mode()
def from_bench(folder: Path) -> None:
    settings = json.loads((folder / "run.json").read_text())
    records = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    runtime = settings.get("runtime", "transformers")
    timed = clp.load(settings["model"], settings["dtype"], runtime=runtime)
    fp32 = clp.load(settings["model"], "fp32")
    docs = mtbench()[:: settings.get("every", 1)]
    budget = settings["max_new_tokens"]
    differing = [r for r in records if r["runs"]["verify"]["ids"] != r["runs"]["ar"]["ids"]]
    print(
        f"{settings['dtype']} on {runtime}: verify differs from ar on {len(differing)} of "
        f"{len(records)}"
    )
    ties = 0
    for r in differing:
        ids = encode_prompt(fp32.tokenizer, docs[r["prompt"]].prompt)
        ar_timed = r["runs"]["ar"]["ids"]
        pos = first_divergence(ar_timed, r["runs"]["verify"]["ids"])
        gap_timed = top2_gap(timed, ids + ar_timed[:pos])
        gap_fp32 = top2_gap(fp32, ids + ar_timed[:pos])
        ar = fp32.generate(ids, max_new_tokens=budget).token_ids
        ver = fp32.generate(ids, mode="verify", max_new_tokens=budget).token_ids
        ties += ar == ver
        print(
            f"prompt {r['prompt']}: first divergence at token {pos}, top-1/top-2 probability "
            f"gap there {gap_timed:.4f} as timed, {gap_fp32:.4f} in fp32 (transformers); "
            f"fp32 verify == ar: {ar == ver}",
            flush=True,
        )
    print(f"fp32 verify == ar on {ties} of the {len(differing)} differing prompts")


if __name__ == "__main__":
    main()
