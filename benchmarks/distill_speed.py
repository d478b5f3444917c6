"""Self-distillation throughput on the same prompts: transformers' padded batches (fp32 and
bf16) against llama.cpp's continuous batching (bf16 GGUF), and how often they agree.

    python benchmarks/distill_speed.py --model qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

import clp
from clp.backbones import load_backbone
from clp.data import interleave
from clp.features import CacheSpec, distill_in_batches, distill_prompts
from clp.metrics import first_divergence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=clp.DEFAULT_MODEL)
    ap.add_argument("--docs", default="1280:1344", help="A slice of the train documents.")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    start, stop = map(int, args.docs.split(":"))
    spec = CacheSpec("distill", max_new_tokens=args.max_new_tokens)
    backbone = load_backbone(args.model, torch.float32)
    docs = interleave(["sharegpt", "stdlib"], "train", stop)[start:stop]
    prompts = distill_prompts(backbone.tokenizer, docs, spec)
    print(f"{args.model}: {len(prompts)} prompts (documents {args.docs}), batch {args.batch_size}")

    engines = {}
    for dtype in (torch.float32, torch.bfloat16):
        b = load_backbone(args.model, dtype)
        engines[f"transformers {dtype}".replace("torch.", "")] = partial(
            distill_in_batches, b, args.batch_size
        )
    from clp.llama_runtime import LlamaDistiller

    engines["llama.cpp bf16"] = LlamaDistiller(
        backbone, args.batch_size, spec.max_prompt_tokens + args.max_new_tokens
    )
    answers = {}
    for name, distill in engines.items():
        t = time.perf_counter()
        answers[name] = [tokens.tolist() for _, tokens in distill(prompts, args.max_new_tokens)]
        seconds = time.perf_counter() - t
        n = sum(map(len, answers[name]))
        print(f"{name:>24}: {n:6d} tokens in {seconds:6.1f} s = {n / seconds:6.1f} tokens/s")
    ref = answers["transformers float32"]
    for name, got in answers.items():
        same = sum(a == b for a, b in zip(ref, got, strict=True))
        prefix = sum(first_divergence(a, b) for a, b in zip(ref, got, strict=True))
        print(
            f"{name:>24}: {same}/{len(ref)} answers identical to transformers fp32, "
            f"common prefix {prefix / sum(map(len, ref)):.2f} of its tokens"
        )


if __name__ == "__main__":
    main()
