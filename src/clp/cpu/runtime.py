"""``--runtime cpu``: the decode loop's narrow interface over ``clp.cpu.model.Decoder``.

Bundled backbones run their packaged GGUF's own 4-bit blocks (weight format q4, the default),
or int8 (q8) / bf16 copies; other checkpoints are quantized from their dense weights. Heads
and predictors run on the hidden states it returns, as on the other runtimes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from clp.backbones import BUNDLED, Backbone, cached_dir, cpu_has_fast_bf16, packaged_gguf
from clp.cpu.model import Decoder, DecoderConfig, Layer
from clp.cpu.weights import (
    FORMATS,
    GROUP,
    PREFILL_ROWS,
    Int4Linear,
    Int8Linear,
    Source,
    gguf_dense,
    gguf_int4_groups,
    make_linear,
    quantize_int4,
    set_prefill_dtype,
)
from clp.errors import ClpError
from clp.runtime import tree_keys, tree_rows

FAMILIES = ("llama", "qwen2")
DEFAULT_CONTEXT = 8192  # rows of the static KV cache unless the model's context is shorter

_GGUF_NAMES = {  # canonical (transformers) name -> GGUF name, per layer
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def decoder_config(config, context: int | None) -> DecoderConfig:
    """The decoder's shape from a transformers config; unsupported families fail clearly."""
    family = getattr(config, "model_type", "?")
    if family not in FAMILIES:
        raise ClpError(
            f"the cpu runtime runs {' and '.join(FAMILIES)} decoders; this model is "
            f"'{family}': use --runtime transformers"
        )
    heads = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        raise ClpError(f"the cpu runtime has no '{rope['rope_type']}' rotary scaling")
    limit = int(getattr(config, "max_position_embeddings", 0) or DEFAULT_CONTEXT)
    context = context or min(limit, DEFAULT_CONTEXT)
    if context < 2:
        raise ClpError(f"the static cache needs at least 2 rows, got {context}")
    return DecoderConfig(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        eps=config.rms_norm_eps,
        rope_theta=float(theta),
        context=context,
    )


def _unpermute(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's conversion of llama q/k projections (its rotary
    layout pairs neighbouring dimensions; transformers' splits each head in halves)."""
    return torch.arange(rows).view(heads, -1, 2).transpose(1, 2).reshape(-1)


def gguf_weights(name: str, cfg: DecoderConfig) -> Callable[[str], Source | None]:
    """Every tensor of a bundled backbone's GGUF under its transformers name, read once."""
    from gguf import GGUFReader

    reader = GGUFReader(packaged_gguf(name))  # joined and checked once, shared with llama.cpp
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    found: dict[str, Source] = {}
    for t in reader.tensors:
        groups = gguf_int4_groups(t) if t.name.endswith(".weight") else None
        found[t.name] = Source(groups, None if groups is not None else gguf_dense(t))
    order = {
        "attn_q.weight": _unpermute(cfg.heads * cfg.head_dim, cfg.heads),
        "attn_k.weight": _unpermute(cfg.kv_heads * cfg.head_dim, cfg.kv_heads),
    }

    def get(key: str) -> Source | None:
        if key.startswith("model.layers."):
            i, rest = key.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{i}.{_GGUF_NAMES[rest]}"
        else:
            gguf_name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[key]
        source = found.get(gguf_name)
        suffix = gguf_name.split(".", 2)[-1]
        if source is not None and arch == "llama" and suffix in order:
            source = source.rows(order[suffix])
        return source

    return get


def checkpoint_weights(model: torch.nn.Module) -> Callable[[str], Source | None]:
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return lambda key: Source(None, state[key].float()) if key in state else None


def build_decoder(cfg: DecoderConfig, get: Callable[[str], Source | None], fmt: str) -> Decoder:
    def vector(key: str) -> torch.Tensor | None:
        source = get(key)
        return None if source is None else source.values().reshape(-1)

    layers = []
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        biases = [vector(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
        qkv_bias = torch.cat(biases) if all(b is not None for b in biases) else None
        qkv = [get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
        gate_up = [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]
        layers.append(
            Layer(
                cfg,
                vector(p + "input_layernorm.weight"),
                make_linear(qkv, fmt, qkv_bias),
                make_linear([get(p + "self_attn.o_proj.weight")], fmt),
                vector(p + "post_attention_layernorm.weight"),
                make_linear(gate_up, fmt),
                make_linear([get(p + "mlp.down_proj.weight")], fmt),
            )
        )
    embed = get("model.embed_tokens.weight")
    head = get("lm_head.weight") or embed  # tied
    lm_head = make_linear([head], fmt, prefill=False)  # only ever applied to a few rows
    return Decoder(cfg, embed.values(), layers, vector("model.norm.weight"), lm_head)


def _cached_decoder(backbone: Backbone, cfg: DecoderConfig, fmt: str) -> Decoder:
    """A bundled backbone's decoder is built from its GGUF once (~30 s) and kept under
    $CLP_HOME keyed by this code's hash (a later load takes seconds); others are built
    from their checkpoint each time."""
    if backbone.name not in BUNDLED:
        return build_decoder(cfg, checkpoint_weights(backbone.model), fmt)
    code = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        code.update(path.read_bytes())
    code.update(torch.__version__.encode())
    path = cached_dir(backbone.name) / f"cpu-{fmt}-{code.hexdigest()[:12]}.pt"
    if path.is_file():
        decoder = torch.load(path, weights_only=False)  # our own file, written below
        decoder.allocate_cache(cfg.context)
        return decoder
    get = gguf_weights(backbone.name, cfg)
    decoder = build_decoder(cfg, get, fmt)
    for old in path.parent.glob(f"cpu-{fmt}-*.pt"):  # built by other code: never read again
        old.unlink()
    decoder.allocate_cache(0)  # the cache is not saved
    tmp = path.with_suffix(".tmp")
    torch.save(decoder, tmp)
    tmp.replace(path)
    decoder.allocate_cache(cfg.context)
    return decoder


class CpuRuntime:
    """One sequence on the static-cache decoder; returns final hidden states."""

    # torch's weight-only kernels compute 4 rows per tile: a forward of 5 rows costs about
    # twice one of 4, so verify sends at most 3 drafts here
    max_drafts = 3

    def __init__(
        self,
        backbone: Backbone,
        weights: str = "q4",
        context: int | None = None,
        threads: int | None = None,
        compile: bool | None = None,
    ):
        if weights not in FORMATS:
            raise ClpError(f"unknown weight format '{weights}'; choose from {', '.join(FORMATS)}")
        if not cpu_runs_bf16_kernels():
            raise ClpError("the cpu runtime needs a CPU with AVX2 or AVX512 (none found)")
        if threads:
            torch.set_num_threads(threads)
        cfg = decoder_config(backbone.config, context)
        self.decoder = _cached_decoder(backbone, cfg, weights)
        # decode steps run eager unless asked (CLP_COMPILE=1): the graphs that keep a row's
        # bits whatever the row count were no faster than eager (docs/design.md)
        if os.environ.get("CLP_COMPILE", "0") == "1" if compile is None else compile:
            self.decoder.compile()
        self.weights = weights
        self.context = cfg.context
        self.hidden_size = cfg.hidden
        self.vocab_size = self.decoder.lm_head.out_features
        if (self.hidden_size, self.vocab_size) != (backbone.hidden_size, backbone.vocab_size):
            raise ClpError(f"the GGUF of '{backbone.name}' does not match its converted copy")
        # A prompt runs in one forward on a dense copy of the weights: bf16, or fp32 where
        # bf16 matmuls are emulated (no AVX512-BF16), several times faster there than bf16
        # or the decode kernels a few rows at a time (benchmarks/prefill_cost.py)
        if not cpu_has_fast_bf16():
            set_prefill_dtype(self.decoder, torch.float32)
        self._length = 0
        self._fed = 0  # tokens of the latest feed
        self._hidden: torch.Tensor | None = None

    def reset(self) -> None:
        self._length = 0
        self._hidden = None

    def prepare_heads(self, heads: torch.nn.Module) -> None:
        """The heads in bf16, their linear layers on the int8 kernel and their draft LM head on
        the int4 one, whatever the backbone's dtype: heads only draft (the backbone verifies),
        a one-row dense product is slower, and with fp32 activations (a CPU without native
        bf16) these kernels are several times slower than with bf16 ones."""
        heads.to(torch.bfloat16)
        heads.lm_head = heads.lm_head.to(torch.bfloat16)
        for module in list(heads.steps.modules()):
            for name, child in module.named_children():
                if isinstance(child, torch.nn.Linear):
                    w, b = child.weight, child.bias
                    setattr(module, name, Int8Linear(w, b, torch.bfloat16, prefill=False))
        if heads.lm_head.shape[1] % GROUP == 0:
            heads.draft_head = Int4Linear(quantize_int4(heads.lm_head), prefill=False)
        else:
            heads.draft_head = Int8Linear(heads.lm_head, None, torch.bfloat16, prefill=False)

    def feed(self, tokens: list[int], parents: list[int] | None = None) -> torch.Tensor:
        if self._length + len(tokens) > self.context:
            raise ClpError(
                f"the sequence would reach {self._length + len(tokens)} tokens; the cpu "
                f"runtime's static cache holds {self.context} (set a larger --context)"
            )
        ids = torch.tensor(tokens, dtype=torch.long)
        tree = None
        if parents is not None:
            if len(tokens) > PREFILL_ROWS:  # wider forwards take the prefill kernels
                raise ClpError(f"a token tree holds at most {PREFILL_ROWS} rows on the cpu runtime")
            depths, _ = tree_rows(parents)
            tree = (torch.tensor(depths) + self._length, tree_keys(self._length, parents))
        self._hidden = self.decoder(ids, self._length, tree)
        self._length += len(tokens)
        self._fed = len(tokens)
        return self._hidden

    def logits(self, last: int = 1) -> torch.Tensor:
        return self.decoder.logits(self._hidden[-last:])

    def drop_last(self, n: int) -> None:
        self._length -= max(n, 0)

    def keep(self, rows: list[int]) -> None:
        start = self._length - self._fed
        if rows != list(range(len(rows))):  # else a prefix: nothing moves
            self.decoder.keep(start, torch.tensor(rows))
        self._length = start + len(rows)

    @property
    def length(self) -> int:
        return self._length


def cpu_runs_bf16_kernels() -> bool:
    """torch's CPU int4/int8/bf16 kernels here need at least AVX2 (they run slowly or not at
    all below it)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
