"""What one forward over n new tokens costs (KV cache after a 100-token prompt, logits of
every new row included), per runtime and weight format: the premise of multi-token decoding.

    python benchmarks/forward_cost.py --model qwen2.5-coder-0.5b --runtimes cpu,llama.cpp
    python benchmarks/forward_cost.py --model qwen2.5-coder-1.5b --runtimes cpu --weights q4
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import clp
from clp.backbones import load_backbone, packaged_gguf
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


def runtimes(model: str, which: list[str], formats: list[str]):
    """(label, runtime) pairs, built one at a time so only one holds memory while timed."""
    if "cpu" in which:
        from clp.cpu.runtime import CpuRuntime

        backbone = load_backbone(model, "bf16")
        for fmt in formats:
            yield f"cpu {fmt}", CpuRuntime(backbone, fmt)
    if "transformers" in which:
        for dtype in ("bf16", "fp32"):
            yield f"transformers {dtype}", TransformersRuntime(load_backbone(model, dtype))
        stock = TransformersRuntime(load_backbone(model, "bf16"), patched=False)
        yield "transformers bf16, stock kernels", stock
    if "llama.cpp" in which and importlib.util.find_spec("llama_cpp"):
        from clp.llama_runtime import LlamaCppRuntime, ensure_gguf

        backbone = load_backbone(model, "bf16")
        yield "llama.cpp bf16 GGUF", LlamaCppRuntime(backbone, ensure_gguf(model, "bf16"))
        yield "llama.cpp packaged GGUF", LlamaCppRuntime(backbone, packaged_gguf(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=clp.DEFAULT_MODEL)
    ap.add_argument("--tokens", default="1,2,3,4,5,8")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--runtimes", default="cpu,transformers,llama.cpp")
    ap.add_argument("--weights", default="q4,q8,bf16", help="the cpu runtime's weight formats")
    args = ap.parse_args()
    sizes = [int(x) for x in args.tokens.split(",")]
    wide = [n for n in (3, 4) if n in sizes]  # the k=2 step (3 rows) and verify's widest (4)
    print(
        f"| {args.model} | "
        + " | ".join(f"{n} tokens" for n in sizes)
        + "".join(f" | {n} vs {sizes[0]}" for n in wide)
        + " |"
    )
    print("|---" * (len(sizes) + len(wide) + 1) + "|")
    for label, rt in runtimes(args.model, args.runtimes.split(","), args.weights.split(",")):
        ms = [cost_ms(rt, n, args.repeats) for n in sizes]
        ratios = "".join(f" | {ms[sizes.index(n)] / ms[0]:.2f}" for n in wide)
        print(f"| {label} | " + " | ".join(f"{m:.1f}" for m in ms) + ratios + " |", flush=True)
        del rt


if __name__ == "__main__":
    main()
