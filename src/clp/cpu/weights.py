"""Weights of the CPU runtime in the forms torch's CPU kernels take.

A GGUF Q4_0, Q4_1 or Q4_K tensor is, group by group of 32 weights, an affine map of 4-bit
integers: w = scale * q + offset. torch's ``_weight_int4pack_mm_for_cpu`` computes
w = (q - 8) * scale + zero per group, so those tensors run as int4 with nothing quantized a
second time (only each group's scale and zero rounded to bf16). Other GGUF types (Q6_K, Q8_0,
...) and dense checkpoints are dequantized and packed as int8 (per output row) or kept bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

GROUP = 32  # the GGUF 4-bit types' own group (sub-block) size
# Forwards of more rows (a prompt) run on a bf16 copy of the same weights: the weight-only
# kernels work in tiles of 4 rows and a 200-token prompt cost ~50 tiles of weight reads.
PREFILL_ROWS = 16
FORMATS = ("q4", "q8", "bf16")


@dataclass
class Int4Groups:
    """w[n, k] = scale[n, k // G] * q[n, k] + offset[n, k // G], q in 0..15 (float32 maps)."""

    q: torch.Tensor  # uint8 [N, K]
    scale: torch.Tensor  # float32 [N, K // G]
    offset: torch.Tensor  # float32 [N, K // G]

    def dense(self) -> torch.Tensor:
        group = self.q.shape[1] // self.scale.shape[1]
        s = self.scale.repeat_interleave(group, 1)
        return self.q.float() * s + self.offset.repeat_interleave(group, 1)

    @staticmethod
    def cat(parts: list[Int4Groups]) -> Int4Groups:
        return Int4Groups(*(torch.cat([getattr(p, f) for p in parts]) for f in Int4Groups.fields))

    def rows(self, index: torch.Tensor) -> Int4Groups:
        return Int4Groups(self.q[index], self.scale[index], self.offset[index])

    fields = ("q", "scale", "offset")


def _nibbles(qs: np.ndarray, n_blocks: int, width: int) -> np.ndarray:
    """GGUF packs 2 x ``width`` 4-bit values per ``width`` bytes: low nibbles first."""
    qs = qs.reshape(n_blocks, -1, 1, width) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (qs & np.uint8(0x0F)).reshape(n_blocks, -1)


def gguf_int4_groups(tensor) -> Int4Groups | None:
    """The int4 groups of a GGUF reader tensor of type Q4_0, Q4_1 or Q4_K; None for others."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import Q4_K

    kind = T(int(tensor.tensor_type))
    if kind not in (T.Q4_0, T.Q4_1, T.Q4_K):
        return None
    rows, k = int(tensor.shape[1]), int(tensor.shape[0])
    raw = np.asarray(tensor.data, dtype=np.uint8)
    if kind == T.Q4_K:  # 256 weights: d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 qs
        blocks = raw.reshape(-1, 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        scale = d * sc.astype(np.float32)  # [blocks, 8]
        offset = -(dmin * mn.astype(np.float32))
        q = _nibbles(blocks[:, 16:], len(blocks), 32)
    else:  # 32 weights: d (f16), [m (f16)], 16 bytes of qs; Q4_0 is d * (q - 8)
        size = 18 if kind == T.Q4_0 else 20
        blocks = raw.reshape(-1, size)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        scale = d
        if kind == T.Q4_0:
            offset = -8 * d
        else:
            offset = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        q = _nibbles(blocks[:, size - 16 :], len(blocks), 16)
    return Int4Groups(
        torch.from_numpy(q.reshape(rows, k).astype(np.uint8)),
        torch.from_numpy(np.ascontiguousarray(scale).reshape(rows, k // GROUP)),
        torch.from_numpy(np.ascontiguousarray(offset).reshape(rows, k // GROUP)),
    )


def gguf_dense(tensor) -> torch.Tensor:
    """Any GGUF reader tensor as float32 [rows, cols] (1-D tensors stay 1-D)."""
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    shape = [int(s) for s in reversed(tensor.shape.tolist())]
    return torch.from_numpy(values.reshape(shape))


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> Int4Groups:
    """Affine 4-bit groups of a dense matrix (for checkpoints that are not GGUF)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return Int4Groups(q.reshape(n, k), scale, lo)


def prefill_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A prompt's many rows on the dense copy ``w``, in its dtype (see ``set_prefill_dtype``);
    the result in the activations' dtype."""
    if w.dtype == x.dtype:
        return F.linear(x, w, bias)
    return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype)).to(x.dtype)


def set_prefill_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hold the prompt's dense weight copies in ``dtype``: bf16 or fp32, the same values
    either way (each is a bf16 number). Where bf16 matmuls are emulated (no AVX512-BF16),
    fp32 ones are several times faster (benchmarks/prefill_cost.py)."""
    for m in model.modules():
        if getattr(m, "prefill_weight", None) is not None:
            m.prefill_weight = m.prefill_weight.to(dtype)


class Int4Linear(torch.nn.Module):
    """y = x W^T (+ b) on torch's weight-only int4 CPU kernel, bf16 activations. The kernel
    gives a row the same bits whatever the number of rows (what keeps ``verify`` exact)."""

    def __init__(self, groups: Int4Groups, bias: torch.Tensor | None = None, prefill=True):
        super().__init__()
        n, k = groups.q.shape
        self.group = k // groups.scale.shape[1]
        self.out_features = n
        pad = -n % 16  # the kernel packs output rows in sixteens; padded rows are cut off
        q, scale = F.pad(groups.q, (0, 0, 0, pad)), F.pad(groups.scale, (0, 0, 0, pad))
        zero = F.pad(groups.offset + 8 * groups.scale, (0, 0, 0, pad))  # (q - 8) * scale + zero
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))
        dense = None
        if prefill:  # the same values as the kernel's, rounded to bf16
            sz = self.scales_zeros[:, :n].float().repeat_interleave(self.group, 0)  # [K, N, 2]
            dense = ((groups.q.float() - 8) * sz[..., 0].t() + sz[..., 1].t()).to(torch.bfloat16)
        self.register_buffer("prefill_weight", dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > PREFILL_ROWS and self.prefill_weight is not None:
            return prefill_linear(x, self.prefill_weight, self.bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group, self.scales_zeros
        )
        if y.shape[-1] != self.out_features:
            y = y[..., : self.out_features]
        return y if self.bias is None else y + self.bias


class Int8Linear(torch.nn.Module):
    """y = x W^T (+ b), W symmetric int8 per output row, on torch's ``_weight_int8pack_mm``."""

    def __init__(self, w: torch.Tensor, bias=None, dtype=torch.bfloat16, prefill=True):
        super().__init__()
        w = w.float()
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
        self.out_features = w.shape[0]
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        dense = self.weight.float() * self.scale.float()[:, None] if prefill else None
        self.register_buffer("prefill_weight", None if dense is None else dense.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > PREFILL_ROWS and self.prefill_weight is not None:
            return prefill_linear(x, self.prefill_weight, self.bias)
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias


class BF16Linear(torch.nn.Module):
    """y = x W^T (+ b) in bf16. One row is computed as two: oneDNN's one-row bf16 kernel sums
    in another order than its several-row kernel, which would break ``verify``'s exactness."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features = w.shape[0]
        self.register_buffer("weight", w.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return F.linear(torch.cat([x, x]), self.weight, self.bias)[:1]
        return F.linear(x, self.weight, self.bias)


class Concat(torch.nn.Module):
    """Several linear layers over the same input, outputs side by side (a fused projection
    whose parts came in different formats)."""

    def __init__(self, parts: list[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], -1)


@dataclass
class Source:
    """One weight matrix as found: int4 groups when its GGUF blocks map, else dense values."""

    groups: Int4Groups | None
    dense: torch.Tensor | None = None

    def values(self) -> torch.Tensor:
        return self.groups.dense() if self.groups is not None else self.dense

    def rows(self, index: torch.Tensor) -> Source:
        if self.groups is not None:
            return Source(self.groups.rows(index))
        return Source(None, self.dense[index])

    def kind(self, fmt: str) -> str:
        """The kernel this matrix runs on in weight format ``fmt``: q4 runs every matrix as
        int4 groups of 32 (4-bit GGUF blocks as they are, others quantized to 4 bits); q8
        keeps 4-bit blocks as they are and runs the rest as int8, never below the packaged
        precision; bf16 runs dense values."""
        if fmt == "bf16":
            return "bf16"
        if self.groups is not None or (fmt == "q4" and self.dense.shape[1] % GROUP == 0):
            return "q4"
        return "q8"


def make_linear(sources: list[Source], fmt: str, bias=None, prefill: bool = True):
    """One projection over ``sources`` stacked by output rows, in weight format ``fmt`` (see
    ``Source.kind``). Neighbouring sources on the same kernel fuse into one call. ``prefill``:
    keep a bf16 copy for forwards of many rows (a prompt)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt}")
    runs: list[tuple[str, list[Source]]] = []
    for s in sources:
        kind = s.kind(fmt)
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(s)
        else:
            runs.append((kind, [s]))
    parts, start = [], 0
    for kind, run in runs:
        n = sum((s.groups.q if s.groups is not None else s.dense).shape[0] for s in run)
        b = None if bias is None else bias[start : start + n]
        start += n
        if kind == "q4":
            groups = [s.groups if s.groups is not None else quantize_int4(s.dense) for s in run]
            parts.append(Int4Linear(Int4Groups.cat(groups), b, prefill))
        else:
            w = torch.cat([s.values() for s in run])
            parts.append(Int8Linear(w, b, prefill=prefill) if kind == "q8" else BF16Linear(w, b))
    return parts[0] if len(parts) == 1 else Concat(parts)
