"""Heads and the training pipeline on a tiny random backbone: caches, training, save/load."""

from __future__ import annotations

import pytest
import torch

from clp.data import Document
from clp.errors import ClpError
from clp.features import CacheSpec, FeatureCache, build_cache, first_tokens
from clp.heads import HeadConfig, load_heads, save_heads
from clp.training import evaluate_heads, new_heads, train_heads, warm_heads

SPEC = CacheSpec("distill", docs_per_shard=4, max_new_tokens=24)


def docs(n: int) -> list[Document]:
    return [Document(f"d{i}", f"prompt {i}: " + "xyz"[i % 3] * (i % 7 + 1)) for i in range(n)]


@pytest.fixture(scope="module")
def plain(tiny):
    tiny.tokenizer.chat_template = None
    return tiny


@pytest.fixture(scope="module")
def cache(plain, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cache")
    return build_cache(plain, docs(16), root, SPEC, batch_size=4).load()


def test_distilled_cache_rows_are_the_backbones_greedy_tokens(plain, cache):
    """Self-distilled rows: next == greedy, and greedy is the argmax of the LM head on h."""
    assert torch.equal(cache["next"], cache["greedy"])
    logits = plain.model.get_output_embeddings()(cache["hidden"][:50].float())
    assert torch.equal(logits.argmax(-1).int(), cache["greedy"][:50])
    assert len(set(cache["doc"].tolist())) == 16


def test_interrupted_cache_resumes_without_recomputing_or_losing_shards(
    plain, tmp_path, monkeypatch
):
    import clp.features as features

    calls = []
    real = features._shard_rows

    def flaky(backbone, chunk, spec, batch_size, distill):
        calls.append(chunk[0].id)
        if calls == ["d0", "d4", "d8"]:
            raise KeyboardInterrupt  # killed while computing the third shard
        return real(backbone, chunk, spec, batch_size, distill)

    monkeypatch.setattr(features, "_shard_rows", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_cache(plain, docs(16), tmp_path, SPEC, batch_size=4)
    assert [p.name for p in FeatureCache(tmp_path).shards()] == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert not list(tmp_path.glob("*.tmp"))
    calls.clear()
    full = build_cache(plain, docs(16), tmp_path, SPEC, batch_size=4).load()
    assert calls == ["d8", "d12"]  # only the unfinished shards were computed
    monkeypatch.undo()
    fresh = build_cache(plain, docs(16), tmp_path / "fresh", SPEC, batch_size=4).load()
    for key in ("greedy", "next", "doc"):
        assert torch.equal(full[key], fresh[key])


def test_token_budget_keeps_leading_whole_documents(cache):
    doc = cache["doc"]
    first_two = int((doc <= doc.unique()[1]).sum())
    cut = first_tokens(cache, first_two + 1)
    assert len(cut["doc"]) == first_two
    assert set(cut["doc"].tolist()) == set(doc.unique()[:2].tolist())
    assert all(len(v) == first_two for v in cut.values())
    assert first_tokens(cache, 0) is cache and first_tokens(cache, len(doc)) is cache
    with pytest.raises(ClpError, match="smaller than the first document"):
        first_tokens(cache, 1)


def test_a_smaller_run_reads_only_its_documents_from_a_larger_cache(plain, tmp_path):
    build_cache(plain, docs(12), tmp_path, SPEC, batch_size=4)
    small = build_cache(plain, docs(8), tmp_path, SPEC, batch_size=4)
    assert len(small.shards()) == 2 and FeatureCache(tmp_path).meta["documents"] == 12
    assert len(small.load()["doc"].unique()) == 8


def test_a_cache_built_differently_is_refused(plain, tmp_path):
    build_cache(plain, docs(4), tmp_path, SPEC)
    other = CacheSpec("distill", docs_per_shard=8, max_new_tokens=24)
    with pytest.raises(ClpError, match="built differently"):
        build_cache(plain, docs(4), tmp_path, other)


@pytest.mark.parametrize("arch", ["chain", "medusa", "competing"])
def test_training_lowers_the_loss_and_raises_heldout_accuracy(plain, cache, arch, tmp_path):
    torch.manual_seed(0)  # the heads' initial biases: not whatever tests ran before left
    heads = new_heads(HeadConfig(arch=arch, k=2), plain, cache, draft_vocab=40)
    before = evaluate_heads(heads, cache)
    info = train_heads(heads, cache, tmp_path, epochs=40, batch_size=32, log=lambda m: None)
    after = evaluate_heads(heads, cache)
    assert info["last_loss"] < info["first_loss"] * 0.9
    last = list(after["top1"])[-1]  # the farthest offset: head 0 of competing starts as the LM head
    assert after["top1"][last] > before["top1"][last] + 0.05, (before, after)


def test_feature_loss_pulls_head_states_towards_the_backbones_hidden_states(plain, cache, tmp_path):
    from clp.training import Rows

    def state_error(heads) -> float:
        rows = Rows(cache, heads.config)
        hidden, tokens, _ = rows.batch(rows.index)
        with torch.no_grad():
            states = heads.states(hidden.float(), tokens)
        truth = rows.target_states(rows.index)
        return sum(float((s - t.float()).pow(2).mean()) for s, t in zip(states, truth, strict=True))

    errors = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        heads = new_heads(HeadConfig(arch="chain", k=2), plain, cache, draft_vocab=40)
        info = train_heads(
            heads,
            cache,
            tmp_path / str(weight),
            epochs=20,
            batch_size=32,
            feature_loss=weight,
            log=lambda m: None,
        )
        assert info["feature_loss"] == weight
        errors[weight] = state_error(heads)
    assert errors[1.0] < errors[0.0] * 0.5, errors


def test_save_load_round_trip_and_proposals(plain, cache, tmp_path):
    heads = new_heads(HeadConfig(arch="chain", k=3), plain, cache, draft_vocab=30)
    train_heads(heads, cache, tmp_path / "ckpt", epochs=2, batch_size=32, log=lambda m: None)
    save_heads(heads, tmp_path / "h")
    loaded = load_heads(tmp_path / "h", plain, torch.float32)
    assert loaded.config.k == 3 and torch.equal(loaded.draft_ids, heads.draft_ids)
    h = cache["hidden"][5].float()
    ids = heads.propose(h, int(cache["next"][5]))
    # saved in bf16: the reloaded heads agree with the bf16-rounded originals
    heads.to(torch.bfloat16).to(torch.float32)
    assert loaded.propose(h, int(cache["next"][5])) == heads.propose(h, int(cache["next"][5]))
    assert len(ids) == 3 and all(i in heads.draft_ids.tolist() for i in ids)


def test_training_continues_from_saved_heads(plain, cache, tmp_path):
    torch.manual_seed(0)
    heads = new_heads(HeadConfig(arch="chain", k=2), plain, cache, draft_vocab=40)
    first = train_heads(heads, cache, tmp_path / "a", epochs=20, batch_size=32, log=lambda m: None)
    save_heads(heads, tmp_path / "h")
    saved = load_heads(tmp_path / "h", plain, torch.float32)  # bf16 on disk
    warm = warm_heads(tmp_path / "h", HeadConfig(arch="chain", k=2), plain, cache, draft_vocab=40)
    assert warm.training and all(p.requires_grad for p in warm.parameters())
    assert torch.equal(warm.draft_ids, heads.draft_ids) and warm.config.training == {}
    assert all(
        torch.equal(a, b) for a, b in zip(warm.parameters(), saved.parameters(), strict=True)
    )
    # on other data the draft vocabulary is that data's most frequent tokens, blocks unchanged
    other = dict(cache, greedy=(cache["greedy"] + 7) % plain.vocab_size)
    moved = warm_heads(tmp_path / "h", HeadConfig(arch="chain", k=2), plain, other, 40)
    assert torch.equal(moved.draft_ids, new_heads(HeadConfig(), plain, other, 40).draft_ids)
    assert not torch.equal(moved.draft_ids, heads.draft_ids)
    assert all(
        torch.equal(a, b) for a, b in zip(moved.parameters(), saved.parameters(), strict=True)
    )
    again = train_heads(warm, cache, tmp_path / "b", epochs=2, batch_size=32, log=lambda m: None)
    # picks up where the first run ended (its loss), not where random heads start
    assert again["first_loss"] < first["last_loss"] * 1.05 < first["first_loss"] * 0.8, (
        first,
        again,
    )
    with pytest.raises(ClpError, match=r"--k 2 \(asked 3\)"):
        warm_heads(tmp_path / "h", HeadConfig(arch="chain", k=3), plain, cache, draft_vocab=40)
    with pytest.raises(ClpError, match=r"--arch chain \(asked medusa\)"):
        warm_heads(tmp_path / "h", HeadConfig(arch="medusa", k=2), plain, cache, draft_vocab=40)
    with pytest.raises(ClpError, match=r"--mlp-ratio 2.0 \(asked 1.0\)"):
        warm_heads(tmp_path / "h", HeadConfig(k=2, mlp_ratio=1.0), plain, cache, draft_vocab=40)


def test_narrow_chain_heads_round_trip(plain, cache, tmp_path):
    """--mlp-ratio sets a chain head's MLP width; saved heads come back at that width."""
    narrow = new_heads(HeadConfig(k=2, mlp_ratio=0.5), plain, cache, draft_vocab=40)
    wide = new_heads(HeadConfig(k=2), plain, cache, draft_vocab=40)
    d = plain.hidden_size
    # each head's MLP holds 2 x ratio x d^2 weights: ratio 2 -> 0.5 saves 3 d^2 per head
    assert wide.trainable_parameters() - narrow.trainable_parameters() == 2 * 3 * d * d
    save_heads(narrow, tmp_path / "h")
    loaded = load_heads(tmp_path / "h", plain, torch.float32)
    assert loaded.config.mlp_ratio == 0.5
    assert loaded.trainable_parameters() == narrow.trainable_parameters()


def test_loading_heads_onto_another_backbone_fails_clearly(plain, cache, tmp_path):
    from conftest import make_tiny_backbone

    heads = new_heads(HeadConfig(arch="chain", k=2), plain, cache, draft_vocab=0)
    save_heads(heads, tmp_path)
    other = make_tiny_backbone(seed=1)
    with pytest.raises(ClpError, match="mismatch in lm_head_sha"):
        load_heads(tmp_path, other)


def test_corrupted_heads_files_fail_clearly(plain, cache, tmp_path):
    heads = new_heads(HeadConfig(arch="chain", k=2), plain, cache, draft_vocab=0)
    save_heads(heads, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ClpError, match="corrupted heads weights"):
        load_heads(tmp_path, plain)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ClpError, match="corrupted heads config"):
        load_heads(tmp_path, plain)
    with pytest.raises(ClpError, match="no heads at"):
        load_heads(tmp_path / "missing", plain)


def test_bad_head_configs(plain, cache):
    with pytest.raises(ClpError, match="k must be 1..4"):
        new_heads(HeadConfig(arch="chain", k=5), plain, cache, draft_vocab=0)
    with pytest.raises(ClpError, match="unknown head architecture"):
        new_heads(HeadConfig(arch="eagle9", k=2), plain, cache, draft_vocab=0)


def test_heldout_rank_accuracy_adds_up_to_top1_and_top3(plain, cache):
    torch.manual_seed(0)
    heads = new_heads(HeadConfig(arch="chain", k=2), plain, cache, draft_vocab=40)
    report = evaluate_heads(heads, cache)
    for offset, ranks in report["ranks"].items():
        assert len(ranks) == 8 and sum(ranks) <= 1.0 + 1e-6
        assert ranks[0] == report["top1"][offset]
        assert abs(sum(ranks[:3]) - report["top3"][offset]) < 2e-4  # each share rounded
