"""The feature cache: one bf16 backbone pass, stored as shards that head training reads.

Each row is a position n of a reply: ``hidden`` h_n (the final hidden state the LM head reads),
``greedy`` the backbone's greedy token from h_n, ``next`` the token that follows n in the data,
``doc`` the document it belongs to (rows of a document are contiguous and in order).

Two ways to fill it:
- **self-distillation** (default): the backbone answers training prompts greedily, in batches;
  the hidden states are captured as it generates, so ``next == greedy`` and the heads learn what
  the backbone actually says;
- **teacher-forced text**: real replies are read in one forward pass each.

Shard i always holds the same documents, is written to a temporary file and renamed into
place, and is skipped when present: an interrupted run resumes without recomputing or losing
finished shards.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from clp.backbones import Backbone
from clp.data import Document, chat_ids
from clp.errors import ClpError

KEYS = ("hidden", "greedy", "next", "doc")
# answers prompt ids greedily: one (hidden [T, d], tokens [T]) pair per prompt, in order
Distill = Callable[[list[list[int]], int], list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class CacheSpec:
    mode: str  # "distill" or "text"
    docs_per_shard: int = 64
    max_new_tokens: int = 256  # distill: reply length cap
    max_prompt_tokens: int = 128  # longer prompts are skipped (padding / reading them is waste)
    max_tokens: int = 1024  # text: prompt + reply cap


class FeatureCache:
    """Shards of rows on disk. ``limit`` reads only the first shards: a cache extended for a
    larger run may hold more documents than this run asked for."""

    def __init__(self, root: str | Path, limit: int | None = None):
        self.root = Path(root)
        self.limit = limit

    def shard_path(self, i: int) -> Path:
        return self.root / f"shard-{i:05d}.safetensors"

    def shards(self) -> list[Path]:
        paths = sorted(self.root.glob("shard-*.safetensors"))
        if self.limit is None:
            return paths
        return [p for p in paths if int(p.stem.removeprefix("shard-")) < self.limit]

    @property
    def meta(self) -> dict:
        path = self.root / "meta.json"
        if not path.is_file():
            raise ClpError(f"{self.root} is not a feature cache (no meta.json)")
        return json.loads(path.read_text())

    def write_meta(self, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "meta.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if {k: old.get(k) for k in ("fingerprint", "mode", "docs_per_shard")} != {
                k: meta.get(k) for k in ("fingerprint", "mode", "docs_per_shard")
            }:
                raise ClpError(
                    f"{self.root} holds a cache built differently (backbone, mode or shard size);"
                    " use another folder"
                )
            meta = {**meta, "documents": max(meta["documents"], old.get("documents", 0))}
        _atomic_write_text(path, json.dumps(meta, indent=1))

    def write_shard(self, i: int, tensors: dict[str, torch.Tensor], documents: int) -> None:
        tmp = self.shard_path(i).with_suffix(".tmp")
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata={"documents": str(documents)})
        os.replace(tmp, self.shard_path(i))

    def shard_documents(self, i: int) -> int:
        """Documents shard i was built from (0 if missing): a last shard holding fewer than a
        larger run needs is rebuilt. A shard without a recorded document count counts as full."""
        if not self.shard_path(i).is_file():
            return 0
        with safe_open(str(self.shard_path(i)), "pt") as f:
            return int((f.metadata() or {}).get("documents", 1 << 30))

    def load(self, max_rows: int = 0) -> dict[str, torch.Tensor]:
        """The shards concatenated, ``doc`` made unique across shards; with ``max_rows`` only
        the leading whole documents holding at most that many rows (shards hold whole
        documents, so reading stops once the budget is covered)."""
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in KEYS}
        offset = rows = 0
        for path in self.shards():
            with safe_open(str(path), "pt") as f:
                for k in KEYS:
                    t = f.get_tensor(k)
                    parts[k].append(t + offset if k == "doc" else t)
            offset = int(parts["doc"][-1].max()) + 1 if parts["doc"][-1].numel() else offset
            rows += len(parts["doc"][-1])
            if 0 < max_rows <= rows:
                break
        if not parts["hidden"]:
            raise ClpError(f"feature cache {self.root} has no shards yet")
        return first_tokens({k: torch.cat(v) for k, v in parts.items()}, max_rows)


def first_tokens(data: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """The leading whole documents of a loaded cache holding at most ``budget`` rows, so that
    heads trained on different caches (self-distilled vs real text) can see equal tokens."""
    doc = data["doc"]
    if budget <= 0 or budget >= len(doc):
        return data
    cut = int((doc < doc[budget]).sum())
    if cut == 0:
        raise ClpError(f"a budget of {budget} tokens is smaller than the first document")
    return {k: v[:cut] for k, v in data.items()}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fingerprint(backbone: Backbone) -> dict:
    """Identifies a backbone by what heads depend on: width, vocabulary and LM-head weights."""
    import hashlib

    w = backbone.model.get_output_embeddings().weight
    sample = w[:: max(1, w.shape[0] // 512)].detach().to(torch.bfloat16).contiguous()
    digest = hashlib.sha256(sample.view(torch.int16).numpy().tobytes()).hexdigest()[:16]
    return {
        "name": backbone.name,
        "hidden_size": backbone.hidden_size,
        "vocab_size": backbone.vocab_size,
        "lm_head_sha": digest,
    }


def _pad_left(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s)
        mask[r, width - len(s) :] = 1
    return ids, mask


@torch.inference_mode()
def distill_batch(backbone: Backbone, prompts: list[list[int]], max_new_tokens: int):
    """Greedy answers to a batch of prompts, with the hidden state each token was chosen from.

    Returns one (hidden [T, d], tokens [T]) pair per prompt. Finished rows leave the batch.
    """
    from transformers import DynamicCache

    decoder = backbone.model.get_decoder()
    lm_head = backbone.model.get_output_embeddings()
    eos = torch.tensor(sorted(backbone.eos_token_ids) or [-1])
    ids, mask = _pad_left(prompts, backbone.tokenizer.pad_token_id or 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=backbone.config)
    h = decoder(
        input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache
    ).last_hidden_state[:, -1]
    alive = torch.arange(len(prompts))
    hs: list[list[torch.Tensor]] = [[] for _ in prompts]
    toks: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        tok = lm_head(h).argmax(-1)
        for r, row in enumerate(alive.tolist()):
            hs[row].append(h[r].clone())
            toks[row].append(int(tok[r]))
        keep = ~torch.isin(tok, eos)
        if not keep.all():
            if not keep.any():
                break
            cache.batch_select_indices(keep.nonzero()[:, 0])
            alive, tok, mask, pos = alive[keep], tok[keep], mask[keep], pos[keep]
        mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=torch.long)], dim=1)
        pos = pos[:, -1:] + 1
        out = decoder(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, cache=cache)
        h = out.last_hidden_state[:, 0]
    return [(torch.stack(h_), torch.tensor(t)) for h_, t in zip(hs, toks, strict=True)]


def distill_in_batches(backbone: Backbone, batch_size: int, prompts, max_new_tokens: int):
    """``distill_batch`` over consecutive batches of ``prompts``."""
    return [
        answer
        for b in range(0, len(prompts), batch_size)
        for answer in distill_batch(backbone, prompts[b : b + batch_size], max_new_tokens)
    ]


@torch.inference_mode()
def text_features(backbone: Backbone, prompt: list[int], reply: list[int]):
    """Hidden states and greedy tokens along a real reply, in one teacher-forced pass."""
    ids = torch.tensor([prompt + reply])
    hidden = backbone.model.get_decoder()(input_ids=ids).last_hidden_state[0]
    rows = hidden[len(prompt) - 1 : -1]  # positions whose next token is a reply token
    greedy = backbone.model.get_output_embeddings()(rows).argmax(-1)
    return rows, greedy, torch.tensor(reply)


def build_cache(
    backbone: Backbone,
    docs: list[Document],
    root: str | Path,
    spec: CacheSpec,
    batch_size: int = 16,
    distill: Distill | None = None,
) -> FeatureCache:
    """Fill (or resume) a feature cache over ``docs``; progress shows tokens/s and the ETA.
    ``distill`` answers a batch of prompts (default: ``distill_batch`` on the backbone)."""
    chunks = [docs[i : i + spec.docs_per_shard] for i in range(0, len(docs), spec.docs_per_shard)]
    n_shards = len(chunks)
    cache = FeatureCache(root, limit=n_shards)
    cache.write_meta(
        {
            "fingerprint": fingerprint(backbone),
            "mode": spec.mode,
            "docs_per_shard": spec.docs_per_shard,
            "documents": len(docs),
            "spec": spec.__dict__,
        }
    )
    todo = [i for i, chunk in enumerate(chunks) if cache.shard_documents(i) < len(chunk)]
    if not todo:
        return cache
    tokens, start = 0, time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"features ({spec.mode})", unit="shard", mininterval=5)
    if len(todo) < n_shards:
        bar.write(f"resuming: {n_shards - len(todo)} of {n_shards} shards already done")
    for i in todo:
        rows = _shard_rows(backbone, chunks[i], spec, batch_size, distill)
        cache.write_shard(i, rows, len(chunks[i]))
        tokens += len(rows["doc"])
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}", rows=tokens)
    bar.close()
    return cache


def distill_prompts(tokenizer, docs: list[Document], spec: CacheSpec) -> list[list[int]]:
    """The chat-formatted prompts of ``docs`` that self-distillation answers: longer ones than
    ``spec.max_prompt_tokens`` are skipped, the rest sorted by length (less padding)."""
    prompts = [chat_ids(tokenizer, d.prompt) for d in docs]
    return sorted((p for p in prompts if len(p) <= spec.max_prompt_tokens), key=len)


def _shard_rows(
    backbone: Backbone,
    docs: list[Document],
    spec: CacheSpec,
    batch_size: int,
    distill: Distill | None = None,
):
    tok = backbone.tokenizer
    distill = distill or partial(distill_in_batches, backbone, batch_size)
    pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if spec.mode == "distill":
        for hidden, toks in distill(distill_prompts(tok, docs, spec), spec.max_new_tokens):
            pieces.append((hidden, toks, toks))
    elif spec.mode == "text":
        for d in docs:
            prompt = chat_ids(tok, d.prompt)
            if len(prompt) > spec.max_prompt_tokens:
                continue
            full = chat_ids(tok, d.prompt, d.reply)[: spec.max_tokens]
            if full[: len(prompt)] != prompt or len(full) - len(prompt) < 2:
                continue
            pieces.append(text_features(backbone, prompt, full[len(prompt) :]))
    else:
        raise ClpError(f"unknown feature mode '{spec.mode}': use distill or text")
    if not pieces:
        d = backbone.hidden_size
        return {
            "hidden": torch.zeros((0, d), dtype=torch.bfloat16),
            "greedy": torch.zeros(0, dtype=torch.int32),
            "next": torch.zeros(0, dtype=torch.int32),
            "doc": torch.zeros(0, dtype=torch.int32),
        }
    return {
        "hidden": torch.cat([p[0] for p in pieces]).to(torch.bfloat16),
        "greedy": torch.cat([p[1] for p in pieces]).to(torch.int32),
        "next": torch.cat([p[2] for p in pieces]).to(torch.int32),
        "doc": torch.cat(
            [torch.full((len(p[1]),), j, dtype=torch.int32) for j, p in enumerate(pieces)]
        ),
    }
