"""One decoder definition for the llama and qwen2 families (nanoGPT-sized), with a static
KV cache: dropping rejected drafts is moving a length, and every tensor a decode step writes
has a fixed place.

Exactness: a token gets the same bits in a 1-token and a several-token forward. The linear
kernels and elementwise ops give a row the same bits whatever the row count; attention of
new tokens over the cache runs one query row at a time, each over exactly its own keys, the
query heads of a key/value group packed as rows (the call a 1-token forward makes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from clp.cpu.weights import PREFILL_ROWS
from clp.runtime import row_keys


@dataclass(frozen=True)
class DecoderConfig:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    context: int  # rows of the static cache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers' llama/qwen2 norm: normalised in fp32, rounded, then scaled."""
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, transformers' half-split layout, computed in fp32. x: [T, heads, dim]."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def project(layer: Layer, x, cos, sin):
    """Norm, fused q/k/v projection and rotary embedding of the new rows (queries and keys
    rotated in one call: the same elementwise ops, half the dispatches)."""
    cfg, t = layer.cfg, x.shape[0]
    qk, v = layer.qkv(rms_norm(x, layer.attn_norm, cfg.eps)).split(layer.split, -1)
    qk = rotate(qk.view(t, cfg.heads + cfg.kv_heads, cfg.head_dim), cos, sin)
    q, k = qk.split([cfg.heads, cfg.kv_heads], 1)
    return q, k, v.view(t, cfg.kv_heads, cfg.head_dim)


def finish(layer: Layer, x, attn):
    """Output projection, residual, and the MLP block."""
    x = x + layer.o(attn)
    gate, up = layer.gate_up(rms_norm(x, layer.ffn_norm, layer.cfg.eps)).chunk(2, -1)
    return x + layer.down(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: DecoderConfig, attn_norm, qkv, o, ffn_norm, gate_up, down):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("attn_norm", attn_norm.to(torch.bfloat16))
        self.register_buffer("ffn_norm", ffn_norm.to(torch.bfloat16))
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down
        self.split = [(cfg.heads + cfg.kv_heads) * cfg.head_dim, cfg.kv_heads * cfg.head_dim]

    def forward(self, x, cos, sin, k_cache, v_cache, start: int, keys=None, parts=None):
        """``parts``: the two row-wise parts, (project, finish) by default, compiled ones for
        decode steps if so; attention between them runs eager, row by row."""
        project_, finish_ = parts or (project, finish)
        q, k, v = project_(self, x, cos, sin)
        t = x.shape[0]
        k_cache[:, start : start + t] = k.transpose(0, 1)
        v_cache[:, start : start + t] = v.transpose(0, 1)
        return finish_(self, x, attend(q, k_cache, v_cache, start, keys))


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, keys=None):
    """Attention of the new rows ``q`` [T, H, dim] at positions start.. over the cache
    [KV, context, dim] (their own keys already written): [T, H * dim]. ``keys``: for a token
    tree, each row's cache indices (the cache before it, its ancestors, itself)."""
    t, heads, dim = q.shape
    kv = k_cache.shape[0]
    end = start + t
    if keys is not None or (start and t <= PREFILL_ROWS):  # a decode step: row by row
        keys = keys or [None] * t
        rows = [
            F.scaled_dot_product_attention(
                q[i].view(1, kv, heads // kv, dim),
                *(kv[None] for kv in row_keys(k_cache, v_cache, start + i + 1, keys[i], 1)),
            ).reshape(1, heads * dim)
            for i in range(t)
        ]
        return torch.cat(rows) if t > 1 else rows[0]
    mask = None
    if start:
        mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k_cache[None, :, :end],
        v_cache[None, :, :end],
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1).reshape(t, heads * dim)


def _rows_unbacked(part):
    """``part`` compiled once for any number of rows (1 to PREFILL_ROWS): the first
    dimension of its tensor arguments is marked unbacked at every call."""

    def rows_known(layer, *tensors):
        # what the graph must know of the unbacked row counts: all equal, and a decode
        # step's (the linear layers then take their decode kernels)
        torch._check(tensors[0].shape[0] <= PREFILL_ROWS)
        for t in tensors[1:]:
            torch._check(t.shape[0] == tensors[0].shape[0])
        return part(layer, *tensors)

    compiled = torch.compile(rows_known, dynamic=True, fullgraph=True)

    def call(layer, *tensors):
        for t in tensors:
            torch._dynamo.decorators.mark_unbacked(t, 0)
        return compiled(layer, *tensors)

    return call


class Decoder(nn.Module):
    """Embedding, layers, final norm; ``forward`` returns the final hidden states (what the
    LM head reads) of the new tokens and writes their keys and values into the cache."""

    def __init__(self, cfg: DecoderConfig, embed: torch.Tensor, layers, norm, lm_head):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("embed", embed.to(torch.bfloat16))
        self.layers = nn.ModuleList(layers)
        self.register_buffer("norm", norm.to(torch.bfloat16))
        self.lm_head = lm_head
        self.decode_parts = None  # compiled parts, if compiled
        self.allocate_cache(cfg.context)

    def allocate_cache(self, context: int) -> None:
        """The static KV cache and rotary tables for ``context`` positions (0: none)."""
        cfg = self.cfg = replace(self.cfg, context=context)
        shape = (cfg.layers, cfg.kv_heads, context, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=torch.bfloat16)
        self.v_cache = torch.zeros(shape, dtype=torch.bfloat16)
        # as transformers computes them: fp32 inverse frequencies times fp32 positions
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        angles = torch.outer(torch.arange(context).float(), inv_freq)
        angles = torch.cat([angles, angles], -1)
        self.cos, self.sin = angles.cos(), angles.sin()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, tree=None) -> torch.Tensor:
        """``tree``: (positions [T], each row's cache indices) of a token tree, whose rows
        sit at start + depth and attend to the cache and their ancestors only."""
        end = start + len(tokens)
        positions, keys = tree if tree is not None else (slice(start, end), None)
        cos, sin = self.cos[positions], self.sin[positions]
        x = self.embed[tokens]
        # a prompt runs eager (its length varies); decode steps run compiled, if so
        parts = self.decode_parts if start and len(tokens) <= PREFILL_ROWS else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, self.k_cache[i], self.v_cache[i], start, keys, parts)
        return rms_norm(x, self.norm, self.cfg.eps)

    def keep(self, start: int, rows: torch.Tensor) -> None:
        """Move the cache entries at start + rows to start, start + 1, ... (every layer)."""
        end = start + len(rows)
        self.k_cache[:, :, start:end] = self.k_cache[:, :, start + rows]
        self.v_cache[:, :, start:end] = self.v_cache[:, :, start + rows]

    def compile(self) -> None:
        """torch.compile the row-wise parts of a layer for decode steps: fuses the norms,
        rotary and activation ops between the kernels. One graph per part serves every layer
        and every row count (the row count is an unbacked size: never specialised, not even
        at 1), so a row's bits cannot depend on how many rows a forward has: graphs
        specialised per row count fused and vectorised differently and rounded a token
        apart alone and among drafts (qwen2.5-coder-1.5b, from its fifth token)."""
        self.decode_parts = (_rows_unbacked(project), _rows_unbacked(finish))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
