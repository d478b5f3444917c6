"""What the linear layers of one forward cost at 1 / 2 / 4 / 8 rows, per CPU kernel: does any
of torch's kernels make a several-token forward cost what one costs?

The layers' fused qkv, o, fused gate-up and down projections plus the LM head, random
weights of the model's shapes (a kernel's speed does not depend on the values):

- int4 weight-only (``_weight_int4pack_mm_for_cpu``, groups of 32): the cpu runtime's `q4`;
- int8 weight-only (``_weight_int8pack_mm``): the cpu runtime's `q8`;
- int8 weights and activations on oneDNN's prepacked kernel (``onednn::qlinear_pointwise``,
  AMX-INT8 where the CPU has it), one fixed activation scale so a row's result does not depend
  on the other rows (quantizing activations also changes the model's outputs: speed only);
- bf16 on oneDNN's prepacked kernel (``mkldnn::_linear_pointwise``, AMX-BF16 where present).

``--per-matrix`` times each kind of matrix alone on one kernel instead, each cycled through
enough copies (~400 MB in int4) that its weights come from memory, not the CPU's cache.

    python benchmarks/linear_kernels.py --rows 1,2,4,8
    python benchmarks/linear_kernels.py --model qwen2.5-coder-1.5b --per-matrix --rows 1,2,3,4,8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from clp.cpu.weights import Int4Linear, Int8Linear, quantize_int4

# hidden, intermediate, key/value width, layers
MODELS = {"qwen2.5-coder-0.5b": (896, 4864, 128, 24), "qwen2.5-coder-1.5b": (1536, 8960, 256, 28)}
VOCAB = 151936


def matrices(model: str) -> dict[str, tuple[int, int]]:
    """Each kind of matrix of one layer, and the LM head: name -> (out, in) features."""
    hidden, intermediate, kv, _ = MODELS[model]
    return {
        "qkv": (hidden + 2 * kv, hidden),
        "o": (hidden, hidden),
        "gate-up": (2 * intermediate, hidden),
        "down": (hidden, intermediate),
        "LM head": (VOCAB, hidden),
    }


def int4_layer(w: torch.Tensor) -> Callable:
    return Int4Linear(quantize_int4(w), prefill=False)


def int8_layer(w: torch.Tensor) -> Callable:
    return Int8Linear(w, prefill=False)


def onednn_int8_layer(w: torch.Tensor) -> Callable:
    scale = w.float().abs().amax(1) / 127
    q = torch.round(w.float() / scale[:, None]).to(torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(q, [1, w.shape[1]])
    zeros = torch.zeros(w.shape[0], dtype=torch.int64)

    def forward(x: torch.Tensor) -> torch.Tensor:
        qx = torch.clamp(torch.round(x.float() / 0.02) + 128, 0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(
            qx, 0.02, 128, packed, scale, zeros, None, 1.0, 0, torch.bfloat16, "none", [], ""
        )

    return forward


def onednn_bf16_layer(w: torch.Tensor) -> Callable:
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


KERNELS = {
    "int4 weight-only": int4_layer,
    "int8 weight-only": int8_layer,
    "int8 w8a8, oneDNN prepacked": onednn_int8_layer,
    "bf16, oneDNN prepacked": onednn_bf16_layer,
}


def cost_ms(layers: list[Callable], shapes: list[tuple[int, int]], rows: int, repeats: int):
    """Median ms of one pass through ``layers`` at ``rows`` rows."""
    inputs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in {k for _, k in shapes}}
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        for layer, (_, k) in zip(layers, shapes, strict=True):
            layer(inputs[k])
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", choices=sorted(MODELS))
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--per-matrix", action="store_true", help="each kind of matrix alone")
    ap.add_argument("--kernel", default="int4 weight-only", choices=list(KERNELS),
                    help="the kernel --per-matrix times")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    kinds = matrices(args.model)
    print(
        f"{args.model}, torch {torch.__version__}, {args.threads} threads, median of {args.repeats}"
    )
    first = f"{args.kernel}: matrix" if args.per_matrix else "kernel"
    print(f"| {first} | " + " | ".join(f"{r} rows (ms)" for r in rows) + f" | {rows[-1]} / 1 |")
    print("|---|" + "---|" * (len(rows) + 1))
    if args.per_matrix:
        make = KERNELS[args.kernel]
        for name, (n, k) in kinds.items():
            w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
            copies = max(2, round(400e6 / (n * k * 0.625)))  # int4 and its scales: ~400 MB
            layers = [make(w) for _ in range(copies)]
            ms = [cost_ms(layers, [(n, k)] * copies, r, args.repeats) / copies for r in rows]
            del layers
            cells = " | ".join(f"{m:.3f}" for m in ms)
            print(f"| {name} {n}x{k} | {cells} | {ms[-1] / ms[0]:.2f}x |", flush=True)
        return
    layers_n = MODELS[args.model][3]
    shapes = [kinds[m] for m in ("qkv", "o", "gate-up", "down")] * layers_n + [kinds["LM head"]]
    for name, make in KERNELS.items():  # one kernel's weights in memory at a time
        layers = [make(torch.randn(n, k, dtype=torch.bfloat16) * 0.02) for n, k in shapes]
        ms = [cost_ms(layers, shapes, r, args.repeats) for r in rows]
        del layers
        cells = " | ".join(f"{m:.1f}" for m in ms)
        print(f"| {name} | {cells} | {ms[-1] / ms[0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
