"""End-to-end recipes: data -> feature caches -> trained heads with a held-out report."""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path

import torch

from clp.backbones import clp_home, cpu_has_fast_bf16, load_backbone
from clp.data import interleave
from clp.errors import ClpError
from clp.features import CacheSpec, FeatureCache, build_cache
from clp.heads import HeadConfig, MTPHeads
from clp.training import evaluate_heads, finish, new_heads, train_heads, warm_heads


def feature_caches(
    backbone,
    sources: list[str],
    data_mode: str,
    budgets: dict[str, int],
    max_new_tokens: int,
    batch_size: int,
    cache: str | None,
    log,
    distill_runtime: str = "transformers",
) -> dict[str, FeatureCache]:
    """One cache per split ('heldout', 'calib', 'train'), built in that order.

    Only the train split follows ``data_mode``: held-out and calib are always self-distilled,
    because the backbone's own continuations are what decoding sees (the truth for head
    accuracy and for predictor labels). The document order is stable, so a larger budget
    extends a cache instead of rebuilding it. ``distill_runtime`` 'llama.cpp' generates the
    self-distilled answers there (bf16, batched; a cache folder of its own).
    """
    base = Path(cache) if cache else clp_home() / "features" / backbone.name.replace("/", "--")
    distill = _distiller(backbone, distill_runtime, batch_size, max_new_tokens)
    caches = {}
    for split, n in budgets.items():
        mode = data_mode if split == "train" else "distill"
        spec = CacheSpec(mode, max_new_tokens=max_new_tokens)
        key = hashlib.sha1(f"{sources}|{spec}".encode()).hexdigest()[:8]
        tag = "distill-llamacpp" if distill and mode == "distill" else mode
        root = base / f"{tag}-{key}" / split
        docs = interleave(sources, split, n)
        if not docs:
            raise ClpError(f"no {split} documents in {', '.join(sources)}")
        log(f"{split}: {len(docs)} documents ({spec.mode}) -> {root}")
        t = time.perf_counter()
        c = build_cache(
            backbone, docs, root, spec, batch_size, distill if mode == "distill" else None
        )
        log(f"{split}: cache ready ({len(c.shards())} shards) in {time.perf_counter() - t:.0f}s")
        caches[split] = c
    return caches


def _distiller(backbone, runtime: str, batch_size: int, max_new_tokens: int):
    """None for transformers (build_cache's default); llama.cpp loaded only once a shard is
    still to be generated."""
    if runtime == "transformers":
        return None
    if runtime != "llama.cpp":
        raise ClpError(f"unknown distill runtime '{runtime}': transformers or llama.cpp")
    from clp.llama_runtime import LlamaDistiller

    context = CacheSpec.max_prompt_tokens + max_new_tokens
    load = functools.cache(lambda: LlamaDistiller(backbone, batch_size, context))
    return lambda prompts, max_new: load()(prompts, max_new)


def feature_dtype() -> torch.dtype:
    """Batched feature passes are compute-bound: bf16 only where the CPU computes it natively
    (elsewhere torch emulates it at a fraction of fp32 matmul speed)."""
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def train_heads_pipeline(
    model: str,
    sources: list[str],
    data_mode: str,
    arch: str,
    k: int,
    layers: int,
    draft_vocab: int,
    train_docs: int,
    train_tokens: int,
    heldout_docs: int,
    calib_docs: int,
    max_new_tokens: int,
    batch_size: int,
    epochs: float,
    lr: float,
    feature_loss: float,
    cache: str | None,
    out: str,
    init: str | None = None,
    features_only: bool = False,
    mlp_ratio: float = 2.0,
    distill_runtime: str = "transformers",
    log=print,
) -> dict:
    backbone = load_backbone(model, feature_dtype())
    log(f"feature passes in {backbone.dtype}")
    caches = feature_caches(
        backbone,
        sources,
        data_mode,
        {"heldout": heldout_docs, "calib": calib_docs, "train": train_docs},
        max_new_tokens,
        batch_size,
        cache,
        log,
        distill_runtime,
    )
    if features_only:
        return {split: str(c.root) for split, c in caches.items()}
    train_data = caches["train"].load(max_rows=train_tokens)
    heldout = caches["heldout"].load()
    config = HeadConfig(arch=arch, k=k, layers=layers, mlp_ratio=mlp_ratio)
    if init:
        heads = warm_heads(init, config, backbone, train_data, draft_vocab)
        log(f"starting from the heads at {init}")
    else:
        heads = new_heads(config, backbone, train_data, draft_vocab)
    log(
        f"{arch} heads, k={k}: {heads.trainable_parameters():,} trainable parameters, "
        f"draft vocabulary {len(heads.draft_ids):,}, {len(train_data['doc']):,} training rows"
    )
    info = train_heads(
        heads, train_data, out, epochs=epochs, lr=lr, feature_loss=feature_loss, log=log
    )
    report = evaluate_heads(heads, heldout)
    info.update(
        data={
            "sources": sources,
            "mode": data_mode,
            "distill_runtime": distill_runtime,
            "train_docs": train_docs,
            "train_tokens": int(len(train_data["doc"])),
            "train_token_budget": train_tokens,
            "heldout_docs": heldout_docs,
            "calib_docs": calib_docs,
            "max_new_tokens": max_new_tokens,
            "heldout_tokens": int(len(heldout["doc"])),
            "caches": {split: str(c.root) for split, c in caches.items()},
            "init": _init_summary(init),
        },
        parameters=heads.trainable_parameters(),
        heldout=report,
        overhead=head_overhead(heads, backbone),
    )
    finish(heads, out, info)
    return info


def evaluate_heads_pipeline(heads_dir: str, max_new_tokens: int | None = None, log=print) -> dict:
    """Evaluate saved heads again on their held-out split (rebuilt as recorded if its cache
    is gone) and record the report in their config.json: for heads trained before a
    measure existed (e.g. the rank accuracy static trees are chosen from)."""
    from clp.heads import load_heads, read_config, save_config

    config = read_config(heads_dir)
    data = config.training.get("data", {})
    if "sources" not in data or "heldout_docs" not in data:
        raise ClpError(f"heads at {heads_dir} do not record the data their held-out split is from")
    max_new_tokens = max_new_tokens or data.get("max_new_tokens") or CacheSpec.max_new_tokens
    backbone = load_backbone(config.fingerprint["name"], feature_dtype())
    caches = feature_caches(
        backbone,
        data["sources"],
        "distill",
        {"heldout": data["heldout_docs"]},
        max_new_tokens,
        32,
        None,
        log,
        data.get("distill_runtime", "transformers"),
    )
    recorded = data.get("caches", {}).get("heldout")
    if recorded and Path(recorded).name != caches["heldout"].root.name:
        log(f"note: the heads recorded held-out cache {recorded}; evaluated on another")
    heads = load_heads(heads_dir, backbone, torch.float32)
    report = evaluate_heads(heads, caches["heldout"].load())
    report["features_dtype"] = str(backbone.dtype).replace("torch.", "")
    # the first report stays beside the new one (a rebuilt split may differ by a few rows)
    config.training.setdefault("heldout_when_trained", config.training.get("heldout"))
    config.training["heldout"] = report
    save_config(config, heads_dir)
    return report


def _init_summary(init: str | None) -> dict | None:
    """What warm-started heads had already been trained on, so the data is fully recorded."""
    if not init:
        return None
    from clp.heads import read_config

    data = read_config(init).training.get("data", {})
    return {"path": str(init), **{k: data.get(k) for k in ("mode", "train_docs", "train_tokens")}}


@torch.inference_mode()
def head_overhead(heads: MTPHeads, backbone, repeats: int = 30) -> dict:
    """Per-step cost of proposing with all heads, as a share of one backbone forward of one
    token with a ~100-token cache (the decode step it rides on), both in the backbone's dtype;
    with the reduced draft vocabulary and with the full one."""
    from clp.heads import frozen_weights
    from clp.runtime import TransformersRuntime, decode_step_forward, timed

    base, h, _, _ = decode_step_forward(TransformersRuntime(backbone), repeats)
    result = {
        "dtype": str(backbone.dtype).replace("torch.", ""),
        "backbone_forward_ms": round(base * 1e3, 2),
    }
    for label, draft_ids in (("heads", heads.draft_ids), ("heads_full_vocab", None)):
        copy = MTPHeads(
            heads.config, *frozen_weights(backbone, backbone.dtype), draft_ids=draft_ids
        ).to(backbone.dtype)
        copy.load_state_dict(heads.state_dict())
        ms = timed(lambda c=copy: c.propose(h, 42), repeats)
        result[f"{label}_ms"] = round(ms * 1e3, 2)
        result[f"{label}_share"] = round(ms / base, 4)
    return result


def train_predictors_pipeline(
    heads_dir: str,
    kinds: list[str],
    balanced: bool = False,
    calib_docs: int | None = None,
    log=print,
) -> dict:
    """Label the calib split with the heads, train each predictor, report on held-out rows.

    ``calib_docs`` first extends the heads' calib cache to that many documents (self-distilled
    as theirs were) and trains on those; by default, on whatever the cache holds.
    Predictors are cheap and gain from rows: on qwen2.5-coder-0.5b, 128 -> 544 documents
    (9k -> 38k rows) cut clp+'s wrong share at tau 0.8 from 19% to 11% (artifacts/README.md).
    """
    from clp.calibration import train_and_save
    from clp.heads import load_heads, read_config

    config = read_config(heads_dir)
    data = config.training.get("data", {})
    caches = data.get("caches", {})
    if not {"calib", "heldout"} <= caches.keys():
        raise ClpError(f"heads at {heads_dir} do not record their calib / heldout feature caches")
    backbone = load_backbone(config.fingerprint["name"], feature_dtype())
    heads = load_heads(heads_dir, backbone, torch.float32)
    calib = FeatureCache(caches["calib"])
    if calib_docs:
        calib = extend_calib(backbone, data, calib_docs, log)
    results = {}
    for kind in kinds:
        log(f"training the {kind} predictor on {caches['calib']}")
        results[kind] = train_and_save(
            kind,
            heads,
            backbone,
            heads_dir,
            calib,
            FeatureCache(caches["heldout"]),
            log=log,
            balanced=balanced,
        )
    return results


def extend_calib(backbone, data: dict, n: int, log) -> FeatureCache:
    """The heads' calib cache holding its first ``n`` documents, generating the missing ones
    with the spec and runtime that made it."""
    root = Path(data["caches"]["calib"])
    try:
        spec = CacheSpec(**FeatureCache(root).meta["spec"])
    except ClpError:
        if "max_new_tokens" not in data:
            raise ClpError(
                f"calib cache {root} is missing and the heads do not record how it was made"
            ) from None
        spec = CacheSpec("distill", max_new_tokens=data["max_new_tokens"])
    docs = interleave(data["sources"], "calib", n)
    if len(docs) < n:
        log(f"calib: only {len(docs)} documents in {', '.join(data['sources'])}")
    log(f"calib: {len(docs)} documents (distill) -> {root}")
    runtime = data.get("distill_runtime", "transformers")
    batch = 32  # sequences generated together, as the heads' recipe does by default
    distill = _distiller(backbone, runtime, batch, spec.max_new_tokens)
    return build_cache(backbone, docs, root, spec, batch, distill)
