"""What reading a prompt costs on the cpu runtime: one forward over every prompt token on the
dense copy of the weights (held in bf16, or in fp32 as the runtime does where the CPU has no
native bf16), or the decode kernels (int4 / int8) a few rows at a time.

    python benchmarks/prefill_cost.py --model qwen2.5-coder-0.5b --lengths 32,128,512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import clp
from clp.backbones import load_backbone
from clp.cpu.runtime import CpuRuntime
from clp.cpu.weights import set_prefill_dtype

COPIES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def prefill_ms(rt: CpuRuntime, n: int, chunk: int, repeats: int) -> float:
    """Median ms to read n tokens from an empty cache (``chunk`` rows a forward, 0: all)
    and take the last row's logits."""
    tokens = list(range(100, 100 + n))
    step = chunk or n
    times = []
    for _ in range(repeats + 1):
        rt.reset()
        start = time.perf_counter()
        for i in range(0, n, step):
            rt.feed(tokens[i : i + step])
        rt.logits(1)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=clp.DEFAULT_MODEL)
    ap.add_argument("--weights", default="q4")
    ap.add_argument("--lengths", default="32,128,512")
    ap.add_argument("--copies", default="bf16,fp32", help="dtypes of the dense copy to time")
    ap.add_argument("--chunks", default="4,8", help="rows a forward on the decode kernels")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rt = CpuRuntime(load_backbone(args.model, "fp32"), args.weights)
    paths = [(f"one forward, {c} copy", c, 0) for c in args.copies.split(",") if c]
    paths += [(f"{k} rows a forward", None, int(k)) for k in args.chunks.split(",") if k]
    header = " | ".join(f"{n} tokens" for n in lengths)
    print(f"| {args.model} {args.weights}, ms | {header} |")
    print("|---" * (len(lengths) + 1) + "|")
    for label, copy, chunk in paths:
        if copy:
            set_prefill_dtype(rt.decoder, COPIES[copy])
        ms = [prefill_ms(rt, n, chunk, args.repeats) for n in lengths]
        print(f"| {label} | " + " | ".join(f"{m:.0f}" for m in ms) + " |", flush=True)


if __name__ == "__main__":
    main()
