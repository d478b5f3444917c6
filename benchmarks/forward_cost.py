"""What one forward over n new tokens costs (KV cache after a 100-token prompt, logits of
every new row included), per runtime and weight type: the premise of multi-token decoding.

    python benchmarks/forward_cost.py --model qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import clp
from clp.backbones import BUNDLED, load_backbone, verified_gguf
from clp.runtime import TransformersRuntime


def cost_ms(rt, n: int, repeats: int) -> float:
    rt.reset()
    rt.feed(list(range(100, 200)))
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        rt.feed(list(range(300, 300 + n)))
        rt.logits(n)
        times.append(time.perf_counter() - start)
        rt.drop_last(n)
    return statistics.median(times[3:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=clp.DEFAULT_MODEL)
    ap.add_argument("--tokens", default="1,2,3,4,6,8")
    ap.add_argument("--repeats", type=int, default=12)
    args = ap.parse_args()
    sizes = [int(x) for x in args.tokens.split(",")]

    def row(label, rt):
        ms = [cost_ms(rt, n, args.repeats) for n in sizes]
        cells = " | ".join(f"{m:.1f}" for m in ms)
        print(f"| {label} | {cells} | {ms[ref] / ms[0]:.2f} |", flush=True)

    ref = sizes.index(3) if 3 in sizes else len(sizes) - 1  # the k=2 step: 3 tokens
    print(
        f"| {args.model} | "
        + " | ".join(f"{n} tokens" for n in sizes)
        + f" | {sizes[ref]} vs {sizes[0]} |"
    )
    print("|---" * (len(sizes) + 2) + "|")
    for dtype in ("bf16", "fp32"):
        row(f"transformers {dtype}", TransformersRuntime(load_backbone(args.model, dtype)))
    stock = TransformersRuntime(load_backbone(args.model, "bf16"), patched=False)
    row("transformers bf16, stock kernels", stock)
    if importlib.util.find_spec("llama_cpp") is None:
        return
    from clp.llama_runtime import LlamaCppRuntime, ensure_gguf

    backbone = load_backbone(args.model, "bf16")
    for kind in ("bf16", "f16"):
        row(f"llama.cpp {kind} GGUF", LlamaCppRuntime(backbone, ensure_gguf(args.model, kind)))
    with verified_gguf(BUNDLED[args.model]) as packaged:
        row("llama.cpp packaged (quantised) GGUF", LlamaCppRuntime(backbone, packaged))


if __name__ == "__main__":
    main()
