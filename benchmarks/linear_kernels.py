"""What the linear layers of one qwen2.5-coder-0.5b forward cost at 1 / 2 / 4 / 8 rows, per
CPU kernel: does any of torch's kernels make a several-token forward cost what one costs?

The 24 layers' fused qkv, o, fused gate-up and down projections plus the LM head, random
weights of the model's shapes (a kernel's speed does not depend on the values):

- int4 weight-only (``_weight_int4pack_mm_for_cpu``, group 128): the cpu runtime's `q4`;
- int8 weight-only (``_weight_int8pack_mm``): the cpu runtime's `q8`;
- int8 weights and activations on oneDNN's prepacked kernel (``onednn::qlinear_pointwise``,
  AMX-INT8 where the CPU has it), one fixed activation scale so a row's result does not depend
  on the other rows (quantizing activations also changes the model's outputs: speed only);
- bf16 on oneDNN's prepacked kernel (``mkldnn::_linear_pointwise``, AMX-BF16 where present).

    python benchmarks/linear_kernels.py --rows 1,2,4,8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from clp.cpu.weights import Int4Linear, Int8Linear, quantize_int4

HIDDEN, INTERMEDIATE, KV, LAYERS, VOCAB = 896, 4864, 128, 24, 151936
SHAPES = [
    (HIDDEN + 2 * KV, HIDDEN),
    (HIDDEN, HIDDEN),
    (2 * INTERMEDIATE, HIDDEN),
    (HIDDEN, INTERMEDIATE),
] * LAYERS + [(VOCAB, HIDDEN)]


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


def cost_ms(layers: list[Callable], rows: int, repeats: int) -> float:
    inputs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in (HIDDEN, INTERMEDIATE)}
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        for layer, (_, k) in zip(layers, SHAPES, strict=True):
            layer(inputs[k])
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print("| kernel | " + " | ".join(f"{r} rows (ms)" for r in rows) + f" | {rows[-1]} / 1 |")
    print("|---|" + "---|" * (len(rows) + 1))
    for name, make in KERNELS.items():  # one kernel's weights in memory at a time
        layers = [make(torch.randn(n, k, dtype=torch.bfloat16) * 0.02) for n, k in SHAPES]
        ms = [cost_ms(layers, r, args.repeats) for r in rows]
        del layers
        cells = " | ".join(f"{m:.1f}" for m in ms)
        print(f"| {name} | {cells} | {ms[-1] / ms[0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
