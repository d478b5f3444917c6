"""Our `ar` greedy loop against transformers' `model.generate` greedy: same prompts, same
process, interleaved prompt by prompt after a warm-up. Prints tokens/s of both and the ratio.

    python benchmarks/ar_vs_generate.py --model qwen2.5-coder-0.5b --dtype bf16 --n 8
"""

from __future__ import annotations

import argparse
import json

import clp
from clp.bench import hf_generate
from clp.prompts import encode_prompt

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain the difference between a list and a tuple in Python.",
    "What does the HTTP status code 404 mean?",
    "Write a SQL query that counts orders per customer.",
    "How do I reverse a linked list in C?",
    "Give three tips for writing readable code.",
    "What is a closure in JavaScript?",
    "Write a bash one-liner that counts lines in all .py files.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=clp.DEFAULT_MODEL)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--n", type=int, default=8, help=f"prompts (at most {len(PROMPTS)})")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    model = clp.load(args.model, args.dtype)
    prompts = [encode_prompt(model.tokenizer, p) for p in PROMPTS[: args.n]]
    for ids in prompts[:2]:  # warm-up both paths
        model.generate(ids, max_new_tokens=8)
        hf_generate(model, ids, 8, lookup=0)

    totals = {"clp_ar": [0, 0.0], "hf_generate": [0, 0.0]}
    for _ in range(args.rounds):
        for i, ids in enumerate(prompts):
            for runner in ("clp_ar", "hf_generate")[:: 1 if i % 2 == 0 else -1]:  # alternate
                if runner == "clp_ar":
                    r = model.generate(ids, max_new_tokens=args.max_new_tokens)
                    n, sec = r.stats.new_tokens, r.stats.seconds
                else:
                    rec = hf_generate(model, ids, args.max_new_tokens, lookup=0)
                    n, sec = rec["new_tokens"], rec["seconds"]
                totals[runner][0] += n
                totals[runner][1] += sec
    tps = {k: n / s for k, (n, s) in totals.items()}
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "tokens_per_second": {k: round(v, 2) for k, v in tps.items()},
        "ratio_clp_over_generate": round(tps["clp_ar"] / tps["hf_generate"], 3),
    }
    print(f"clp ar      : {tps['clp_ar']:.2f} tok/s")
    print(f"hf generate : {tps['hf_generate']:.2f} tok/s")
    print(f"ratio       : {result['ratio_clp_over_generate']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
