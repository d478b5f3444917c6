"""A llama.cpp runtime behind the same narrow interface as ``TransformersRuntime``.

Why: on these CPUs transformers' bf16 forward costs about one full weight read per new token
(2 tokens ~1.5x one, 4 tokens ~2.6x), so multi-token decoding cannot pay there; llama.cpp's
batched kernels read the weights once per forward. The backbone's weights are the same: the
packaged GGUF converted once to a bf16 GGUF (``ensure_gguf``). Heads and predictor still run
in torch on the hidden states llama.cpp returns (after the final norm, what the LM head
reads), and the loop gets the backbone's logits from the same forward.

Needs the optional dependency ``llama-cpp-python`` (``pip install 'clp-mtp[llama]'``).
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from clp.backbones import (
    BUNDLED,
    Backbone,
    cached_dir,
    ensure_converted,
    packaged_gguf,
    verified_gguf,
)
from clp.errors import ClpError

GGUF_TYPES = {"bf16": 32, "f16": 1, "f32": 0}  # llama.cpp's LLAMA_FTYPE_* values


def _llama():
    try:
        import llama_cpp
    except ImportError as exc:
        raise ClpError(
            "the llama.cpp runtime needs llama-cpp-python: pip install 'clp-mtp[llama]' "
            "(it compiles llama.cpp, about 10 minutes on 2 cores)"
        ) from exc
    return llama_cpp


def _quiet(llama_cpp) -> None:
    """Silence llama.cpp's log lines on stderr (errors still surface as return codes)."""
    callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
    _quiet.keep = callback  # the C side keeps only a pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def _model_params(llama_cpp):
    """llama.cpp's default model parameters, less its extra weight buffers (AMX, repacked
    blocks) on CPUs with AMX, where its AMX matrix product crashes (a segfault on the first
    forward of the packaged Q4_K_M GGUF; llama.cpp issue 20824): what ``--no-repack`` does."""
    params = llama_cpp.llama_model_default_params()
    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        params.use_extra_bufts = False
    return params


@contextlib.contextmanager
def _our_model_params(llama_cpp):
    """``llama_cpp.Llama`` takes no model parameters object: lend it ours while it loads
    (``Llama`` reads the defaults from the ``llama_cpp.llama_cpp`` module; ``_model_params``
    from the package, whose binding stays the original)."""
    module = llama_cpp.llama_cpp
    default = module.llama_model_default_params
    module.llama_model_default_params = lambda: _model_params(llama_cpp)
    try:
        yield
    finally:
        module.llama_model_default_params = default


def ensure_gguf(name: str, gguf_type: str = "bf16") -> Path:
    """A GGUF of a bundled backbone in ``gguf_type``, converted once from the packaged file."""
    if name not in BUNDLED:
        raise ClpError(
            f"the llama.cpp runtime serves the bundled backbones ({', '.join(BUNDLED)}); "
            f"got '{name}'"
        )
    if gguf_type not in GGUF_TYPES:
        raise ClpError(f"unknown GGUF type '{gguf_type}'; choose from {', '.join(GGUF_TYPES)}")
    target = cached_dir(name) / f"model-{gguf_type}.gguf"
    if target.is_file():
        return target
    llama_cpp = _llama()
    _quiet(llama_cpp)
    ensure_converted(name)  # the tokenizer and the torch side come from here
    tmp = target.with_suffix(".gguf.tmp")
    with verified_gguf(BUNDLED[name]) as source:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = GGUF_TYPES[gguf_type]
        params.allow_requantize = True
        params.nthread = 2
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if code != 0:
        tmp.unlink(missing_ok=True)
        raise ClpError(f"llama.cpp could not convert {name} to {gguf_type} (code {code})")
    tmp.replace(target)
    return target


class _Context:
    """A llama.cpp model and context whose forward returns the final hidden states (after the
    norm, what the LM head reads) and the logits; freed with the object."""

    def __init__(
        self,
        backbone: Backbone,
        gguf: Path,
        n_ctx: int,
        n_seq: int = 1,
        f32_cache: bool = False,
        threads: int | None = None,
    ):
        self.llama = llama = _llama()
        _quiet(llama)
        llama.llama_backend_init()
        self._model = llama.llama_model_load_from_file(str(gguf).encode(), _model_params(llama))
        if not self._model:
            raise ClpError(f"llama.cpp could not load {gguf}")
        self.hidden_size = llama.llama_model_n_embd(self._model)
        self.vocab_size = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self._model))
        if (self.hidden_size, self.vocab_size) != (backbone.hidden_size, backbone.vocab_size):
            raise ClpError(
                f"{gguf} (d={self.hidden_size}, vocab {self.vocab_size}) is not the backbone "
                f"'{backbone.name}' (d={backbone.hidden_size}, vocab {backbone.vocab_size})"
            )
        cparams = llama.llama_context_default_params()
        cparams.n_ctx, cparams.n_seq_max = n_ctx, n_seq
        # one KV buffer for all sequences: 2.5x the throughput of per-sequence buffers here
        cparams.kv_unified = True
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_threads = cparams.n_threads_batch = threads or torch.get_num_threads()
        cparams.pooling_type = llama.LLAMA_POOLING_TYPE_NONE
        cparams.embeddings = True
        if f32_cache:  # fp32 all through: the KV cache too (default f16)
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
        self._ctx = llama.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise ClpError("llama.cpp could not create a context")
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(512, 0, 1)

    def _forward(self, items: list[tuple[int, int, int]], outputs: bool, take=None) -> list:
        """Feed (sequence, position, token) items, 512 at a time. With ``outputs``, every item
        returns its hidden state and logits: ``take(hidden, logits)`` of each chunk (numpy
        views, valid until the next decode) is collected."""
        llama, batch, taken = self.llama, self._batch, []
        llama.llama_set_embeddings(self._ctx, outputs)
        for start in range(0, len(items), 512):
            chunk = items[start : start + 512]
            batch.n_tokens = n = len(chunk)
            for i, (seq, pos, token) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.logits[i] = token, pos, outputs
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
            code = llama.llama_decode(self._ctx, batch)
            if code != 0:
                raise ClpError(f"llama.cpp decode failed (code {code}) at position {chunk[0][1]}")
            if outputs:
                shape = (n, self.hidden_size), (n, self.vocab_size)
                hidden = np.ctypeslib.as_array(
                    llama.llama_get_embeddings(self._ctx), shape=shape[0]
                )
                logits = np.ctypeslib.as_array(llama.llama_get_logits(self._ctx), shape=shape[1])
                taken.append(take(hidden, logits))
        return taken

    def __del__(self):
        llama = getattr(self, "llama", None)
        if llama is None:
            return
        if getattr(self, "_batch", None) is not None:
            llama.llama_batch_free(self._batch)
        if getattr(self, "_ctx", None):
            llama.llama_free(self._ctx)
        if getattr(self, "_model", None):
            llama.llama_model_free(self._model)


NO_TREES = (
    "the llama.cpp runtime cannot verify token trees (--tree-nodes > 0): use --runtime cpu "
    "or transformers"
)


class LlamaCppRuntime(_Context):
    """One sequence on a llama.cpp context; returns final hidden states and keeps the logits."""

    def __init__(self, backbone: Backbone, gguf: Path, threads: int | None = None):
        self.context = min(backbone.context_length or 4096, 32768)
        super().__init__(
            backbone, gguf, self.context, f32_cache=backbone.dtype == torch.float32, threads=threads
        )
        self.dtype = backbone.dtype
        self._length = 0
        self._logits: torch.Tensor | None = None

    def reset(self) -> None:
        self.llama.llama_memory_clear(self._memory, True)
        self._length = 0
        self._logits = None

    def _decode(self, tokens: list[int], outputs: bool) -> list:
        items = [(0, self._length + i, token) for i, token in enumerate(tokens)]
        taken = self._forward(items, outputs, lambda h, lg: (h.copy(), lg.copy()))
        self._length += len(tokens)
        return taken

    def feed(self, tokens: list[int], parents: list[int] | None = None) -> torch.Tensor:
        if parents is not None:
            raise ClpError(NO_TREES)
        if self._length + len(tokens) > self.context:
            raise ClpError(f"the sequence would exceed the runtime's context of {self.context}")
        # a first feed (the prompt) needs only its last row; later feeds need every row
        keep = 1 if self._length == 0 else min(len(tokens), 512)
        if len(tokens) > keep:
            self._decode(tokens[:-keep], outputs=False)
        [(hidden, logits)] = self._decode(tokens[-keep:], outputs=True)
        self._logits = torch.from_numpy(logits)
        return torch.from_numpy(hidden).to(self.dtype)

    def logits(self, last: int = 1) -> torch.Tensor:
        return self._logits[-last:]

    def drop_last(self, n: int) -> None:
        if n > 0:
            self._length -= n
            self.llama.llama_memory_seq_rm(self._memory, 0, self._length, -1)

    def keep(self, rows: list[int]) -> None:
        raise ClpError(NO_TREES)

    @property
    def length(self) -> int:
        return self._length


class LlamaDistiller(_Context):
    """Self-distillation on llama.cpp: many prompts answered greedily at once, one sequence
    each in a shared context, returning the hidden state every token was chosen from.

    Why: a batched decode step reads the weights once for all sequences, and no step is spent
    on padding or on a tail of a few long answers: 180 tokens/s on qwen2.5-coder-0.5b on a
    Zen 5 (transformers: 162 in bf16, 47 in fp32), and its answers match fp32 decoding more
    often than transformers' bf16 ones. Same contract as ``clp.features.distill_in_batches``.
    """

    def __init__(
        self, backbone: Backbone, batch_size: int, max_tokens: int, gguf_type: str = "bf16"
    ):
        if not 1 <= batch_size <= 512:
            raise ClpError(f"--batch-size {batch_size}: llama.cpp distillation takes 1 to 512")
        gguf = ensure_gguf(backbone.name, gguf_type)
        super().__init__(backbone, gguf, batch_size * max_tokens, batch_size, gguf_type == "f32")
        self.batch_size = batch_size
        self.eos = set(backbone.eos_token_ids)

    def __call__(self, prompts: list[list[int]], max_new_tokens: int):
        """Greedy answers to ``prompts``, each with its hidden states. Continuous batching:
        up to ``batch_size`` sequences decode together, and a finished one's slot takes the
        next waiting prompt in the next step (no tail of a few long answers decoded alone)."""
        self.llama.llama_memory_clear(self._memory, True)
        waiting = list(range(len(prompts)))[::-1]
        free = list(range(self.batch_size))[::-1]
        active: dict[int, tuple[int, int, int]] = {}  # slot -> (prompt, position, token to feed)
        hs: list[list[np.ndarray]] = [[] for _ in prompts]
        toks: list[list[int]] = [[] for _ in prompts]
        while waiting or active:
            prefill = []
            while waiting and free:  # all but the last prompt token: no outputs needed
                slot, j = free.pop(), waiting.pop()
                prefill += [(slot, p, t) for p, t in enumerate(prompts[j][:-1])]
                active[slot] = (j, len(prompts[j]) - 1, prompts[j][-1])
            self._forward(prefill, outputs=False)
            order = list(active)
            [(hidden, greedy)] = self._forward(
                [(s, *active[s][1:]) for s in order],
                outputs=True,
                take=lambda h, lg: (h.copy(), lg.argmax(-1).tolist()),
            )
            for slot, h, tok in zip(order, hidden, greedy, strict=True):
                j, pos, _ = active[slot]
                hs[j].append(h)
                toks[j].append(tok)
                if tok in self.eos or len(toks[j]) == max_new_tokens:
                    del active[slot]
                    self.llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
                    free.append(slot)
                else:
                    active[slot] = (j, pos + 1, tok)
        return [
            (torch.from_numpy(np.stack(h)), torch.tensor(t)) for h, t in zip(hs, toks, strict=True)
        ]


class LlamaCppGreedy:
    """The baseline a CPU user runs instead: llama.cpp's plain greedy decoding of the packaged
    GGUF as shipped, through llama-cpp-python's own ``Llama.generate`` (no hidden states, no
    heads), timed from the prompt on as the decode loop is."""

    def __init__(self, name: str, context: int, threads: int | None = None):
        if name not in BUNDLED:
            raise ClpError(f"the llama.cpp baseline runs the bundled backbones; got '{name}'")
        llama_cpp = _llama()
        _quiet(llama_cpp)
        threads = threads or torch.get_num_threads()
        with _our_model_params(llama_cpp):
            self.llm = llama_cpp.Llama(
                model_path=str(packaged_gguf(name)),
                n_ctx=context,
                n_batch=512,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )

    def __call__(
        self,
        ids: list[int],
        max_new_tokens: int,
        eos: set[int],
        done: Callable[[list[int]], bool] | None = None,
    ) -> dict:
        """Greedy tokens after ``ids`` until EOS, the budget or ``done(output)``."""
        self.llm.reset()  # no prompt reuse from an earlier run
        out: list[int] = []
        start = time.perf_counter()
        for token in self.llm.generate(ids, temp=0.0, reset=True):
            out.append(token)
            if token in eos or len(out) >= max_new_tokens or (done and done(out)):
                break
        seconds = time.perf_counter() - start
        return {"ids": out, "new_tokens": len(out), "seconds": seconds, "forward_passes": len(out)}
