"""What reading a prompt costs on the cpu runtime: one forward over every prompt token on the
bf16 copy of the weights, or the decode kernels (int4 / int8) a few rows at a time, which the
runtime does where the CPU has no native bf16 (``CpuRuntime.prompt_chunk``).

    python benchmarks/prefill_cost.py --model qwen2.5-coder-0.5b --lengths 32,128,512
"""

from __future__ import annotations

import argparse
import statistics
import time

import clp
from clp.backbones import load_backbone
from clp.cpu.runtime import CpuRuntime


def prefill_ms(rt: CpuRuntime, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        rt.reset()
        start = time.perf_counter()
        rt.feed(list(range(100, 100 + n)))
        rt.logits(1)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=clp.DEFAULT_MODEL)
    ap.add_argument("--weights", default="q4")
    ap.add_argument("--lengths", default="32,128,512")
    ap.add_argument("--chunks", default="0,2,4,8", help="rows per forward; 0: the whole prompt")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rt = CpuRuntime(load_backbone(args.model, "fp32"), args.weights)
    print(f"default here: {rt.prompt_chunk or 'the whole prompt'} rows per forward\n")
    print(
        f"| {args.model} {args.weights}, ms | " + " | ".join(f"{n} tokens" for n in lengths) + " |"
    )
    print("|---" * (len(lengths) + 1) + "|")
    for chunk in (int(x) for x in args.chunks.split(",")):
        rt.prompt_chunk = chunk
        label = f"{chunk} rows per forward" if chunk else "one forward (bf16 copy)"
        ms = [prefill_ms(rt, n, args.repeats) for n in lengths]
        print(f"| {label} | " + " | ".join(f"{m:.0f}" for m in ms) + " |", flush=True)


if __name__ == "__main__":
    main()
