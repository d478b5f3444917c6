"""Where one verify decode step's time goes on the cpu runtime: the backbone's linear kernels,
its attention, the rest of its forward (norms, rotary, activations, Python), the LM head, and
the heads' drafting. Wall-clock shares over a real generation, from torch's profiler.

    python benchmarks/step_profile.py --model qwen2.5-coder-0.5b --weights q4
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile, record_function

import clp

PROMPT = "Write a Python function that checks whether a string is a palindrome, with tests."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=clp.DEFAULT_MODEL)
    ap.add_argument("--weights", default="q4")
    ap.add_argument("--mode", default="verify")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    model = clp.load(args.model, runtime="cpu", weights=args.weights)
    rt, heads = model.runtime, model.heads()
    model.generate(PROMPT, mode=args.mode, max_new_tokens=32)  # warm-up
    timed = ("backbone forward", "LM head", "heads")

    def wrap(label, fn):
        def inner(*a, **k):
            with record_function(label):
                return fn(*a, **k)

        return inner

    rt.decoder.forward = wrap("backbone forward", rt.decoder.forward)
    rt.decoder.logits = wrap("LM head", rt.decoder.logits)
    heads.propose, heads.run = wrap("heads", heads.propose), wrap("heads", heads.run)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        r = model.generate(PROMPT, mode=args.mode, max_new_tokens=args.max_new_tokens)
        wall = time.perf_counter() - start
    ops = defaultdict(float)
    for e in prof.key_averages():
        ops[e.key] += e.self_cpu_time_total / 1e6
    spans = dict.fromkeys(timed, 0.0)
    spans.update({e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in timed})
    int_mm = sum(v for k, v in ops.items() if "int4pack_mm" in k or "int8pack_mm" in k)
    attn = sum(v for k, v in ops.items() if "scaled_dot_product" in k)
    steps = r.stats.forward_passes
    print(
        f"{args.model} {args.weights} {args.mode}: {r.stats.new_tokens} tokens, {steps} steps, "
        f"{r.stats.tokens_per_forward:.2f} tokens/forward, {wall / steps * 1e3:.1f} ms/step"
    )
    rows = {
        "backbone forward (layers)": spans["backbone forward"],
        "  its attention": attn,
        "backbone LM head": spans["LM head"],
        "heads (drafting)": spans.get("heads", 0.0),
        "rest (loop, verification, Python)": wall - sum(spans.values()),
        "weight-only int4/int8 kernels, everywhere": int_mm,
    }
    for label, seconds in rows.items():
        print(f"| {label} | {seconds / steps * 1e3:.1f} ms | {seconds / wall:.0%} |")


if __name__ == "__main__":
    main()
