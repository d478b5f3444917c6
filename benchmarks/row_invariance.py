"""Does a token get the same bits fed alone and among others on a real backbone? The cpu
runtime's exactness (verify equal to ar) rests on it: greedy tokens are generated one per
forward, then fed again 2, 3 and 4 at a time, and every hidden state is compared bit for bit.

    python benchmarks/row_invariance.py --model qwen2.5-coder-1.5b [--compile]
"""

from __future__ import annotations

import argparse

import torch

import clp
from clp.backbones import load_backbone
from clp.cpu.runtime import CpuRuntime
from clp.data import chat_ids

PROMPT = "Explain how a hash map works and write a small one in Python."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=clp.DEFAULT_MODEL)
    ap.add_argument("--weights", default="q4")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--compile", action="store_true", help="decode steps compiled (CLP_COMPILE=1)")
    args = ap.parse_args()
    backbone = load_backbone(args.model, "bf16")
    runtime = CpuRuntime(backbone, args.weights, context=1024, compile=args.compile)
    prompt = chat_ids(backbone.tokenizer, PROMPT)
    runtime.feed(prompt)
    tokens, alone = [], []
    for _ in range(args.tokens):
        tokens.append(int(runtime.logits().argmax()))
        alone.append(runtime.feed(tokens[-1:])[-1].clone())
    for width in (2, 3, 4):
        runtime.reset()
        runtime.feed(prompt)
        differ = []
        for s in range(0, len(tokens), width):
            hidden = runtime.feed(tokens[s : s + width])
            differ += [s + j for j, h in enumerate(hidden) if not torch.equal(h, alone[s + j])]
        first = f", the first at token {differ[0]}" if differ else ""
        print(f"fed {width} at a time: {len(differ)} of {len(tokens)} hidden states differ{first}")


if __name__ == "__main__":
    main()
