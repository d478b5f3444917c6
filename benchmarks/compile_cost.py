"""Does torch.compile pay on the cpu runtime's decode steps? One forward over 1 / 3 / 4 new
tokens (``forward_cost.cost_ms``: KV cache after a 100-token prompt, logits included), eager
and then compiled (what ``CLP_COMPILE=1`` turns on), in one process.

    python benchmarks/compile_cost.py --model qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse

from forward_cost import cost_ms

import clp
from clp.backbones import load_backbone
from clp.cpu.runtime import CpuRuntime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=clp.DEFAULT_MODEL)
    ap.add_argument("--weights", default="q4")
    ap.add_argument("--tokens", default="1,3,4")
    ap.add_argument("--repeats", type=int, default=12)
    args = ap.parse_args()
    rows = [int(n) for n in args.tokens.split(",")]
    backbone = load_backbone(args.model, "bf16")
    for compiled in (False, True):
        runtime = CpuRuntime(backbone, args.weights, compile=compiled)
        for n in rows:  # warm-up (and compilation)
            cost_ms(runtime, n, 2)
        costs = {n: round(cost_ms(runtime, n, args.repeats), 1) for n in rows}
        print("compiled" if compiled else "eager", costs, flush=True)
        del runtime


if __name__ == "__main__":
    main()
