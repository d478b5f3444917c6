"""What each mode's policy adds to a decode step (heads + predictor or gate), as a share of
one backbone forward of one token after a ~100-token cache, on the given runtime and dtype.

    python benchmarks/policy_overhead.py --model qwen2.5-coder-0.5b --dtype bf16 \
        --runtime llama.cpp
"""

from __future__ import annotations

import argparse
import json

import torch

import clp
from clp.runtime import decode_step_forward, timed


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=clp.DEFAULT_MODEL)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--runtime", default="transformers", choices=clp.RUNTIMES)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()

    model = clp.load(args.model, args.dtype, runtime=args.runtime)
    base, h, logits, tokens = decode_step_forward(model.runtime, args.repeats)
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "runtime": args.runtime,
        "backbone_forward_ms": round(base * 1e3, 2),
    }
    for mode in ("mtp", "clp", "clp+", "gate", "verify"):
        policy = model.policy(mode, 0.0 if mode in ("clp", "clp+") else None)  # tau 0: all run
        ms = timed(lambda p=policy: p.propose(h, tokens, logits), args.repeats)
        result[mode] = {"ms": round(ms * 1e3, 2), "share": round(ms / base, 4)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
