"""Every decoding mode through the one loop, on a tiny random backbone with tiny trained heads."""

from __future__ import annotations

import shutil

import pytest
import torch

from clp.api import DEFAULT_MIN_PROB, Model
from clp.calibration import train_and_save
from clp.data import Document
from clp.errors import ClpError
from clp.features import CacheSpec, build_cache
from clp.heads import HeadConfig, save_heads
from clp.metrics import repetition_ratio, standard_error
from clp.training import new_heads, train_heads

SPEC = CacheSpec("distill", docs_per_shard=8, max_new_tokens=32)
PROMPTS = [f"prompt {i}: " + "abcxyz"[i % 6] * (i % 5 + 1) for i in range(24)]


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    """Heads (chain k=2, competing k=3), clp / clp+ predictors and a gate, all trained here."""
    tiny.tokenizer.chat_template = None
    root = tmp_path_factory.mktemp("artifacts")
    docs = [Document(f"t{i}", f"train {i} " + "pq"[i % 2] * (i % 9)) for i in range(32)]
    calib = [Document(f"c{i}", f"calib {i} " + "rs"[i % 2] * (i % 9)) for i in range(16)]
    train = build_cache(tiny, docs, root / "train", SPEC, batch_size=8)
    calib_cache = build_cache(tiny, calib, root / "calib", SPEC, batch_size=8)
    data = train.load()
    heads = new_heads(HeadConfig(arch="chain", k=2), tiny, data, draft_vocab=0)
    train_heads(heads, data, root / "ckpt", epochs=20, batch_size=64, log=lambda m: None)
    save_heads(heads, root / "heads")
    competing = new_heads(HeadConfig(arch="competing", k=3), tiny, data, draft_vocab=0)
    train_heads(competing, data, root / "ckpt2", epochs=5, batch_size=64, log=lambda m: None)
    save_heads(competing, root / "heads" / "competing")
    for kind in ("clp", "clp+", "gate"):
        train_and_save(
            kind, heads, tiny, root / "heads", calib_cache, calib_cache, log=lambda m: None
        )
    return root / "heads"


@pytest.fixture(scope="module")
def model(tiny, artifacts):
    return Model(tiny, artifacts)


def gen(model, prompt, mode, **kw):
    kw.setdefault("max_new_tokens", 40)
    return model.generate(prompt, mode=mode, raw=True, **kw)


@pytest.mark.parametrize("min_prob", [None, 0.0])  # the default cut of unlikely drafts, none
def test_verify_is_token_identical_to_ar_greedy(model, min_prob):
    spans = 0
    for prompt in PROMPTS:
        for n in (40, 7):  # a small budget ends inside an accepted span on some prompts
            ar = gen(model, prompt, "ar", max_new_tokens=n)
            ver = gen(model, prompt, "verify", max_new_tokens=n, min_prob=min_prob)
            assert ver.token_ids == ar.token_ids, prompt
            assert ver.stats.forward_passes <= ar.stats.forward_passes
            spans += sum(c for extra, c in ver.stats.accepted_lengths.items() if extra > 0)
    assert spans > 20  # the heads did get drafts accepted


def test_verify_leaves_out_the_drafts_the_heads_find_unlikely(model):
    heads = model.heads()
    torch.manual_seed(0)
    lengths = set()
    for _ in range(16):
        hidden = torch.randn(model.backbone.hidden_size) * 4
        full = heads.propose(hidden, 7)
        _, logits, _ = heads.run(hidden, 7)
        chain = torch.stack([torch.log_softmax(lg.float(), -1).max() for lg in logits])
        chain = chain.cumsum(0).exp().tolist()  # never rises along the chain
        for p in [0.0] + [min(c * f, 0.999) for c in chain for f in (0.99, 1.01)]:
            got = model.policy("verify", lookup=0, min_prob=p).propose(hidden, [5, 6, 7], None)
            assert got == full[: sum(c >= p for c in chain)]
            lengths.add(len(got))
    assert lengths == {0, 1, 2}
    with pytest.raises(ClpError, match=r"minimum probability must be in \[0, 1\), got 1.0"):
        model.policy("verify", min_prob=1.0)
    with pytest.raises(ClpError, match="min_prob is a setting of mode verify, not of mode mtp"):
        model.policy("mtp", min_prob=0.1)


def test_the_default_mode_is_verify_with_heads_and_ar_without(model, tiny):
    assert model.default_mode == "verify" and Model(tiny).default_mode == "ar"
    default = model.generate(PROMPTS[0], max_new_tokens=20, raw=True)
    verify = gen(model, PROMPTS[0], "verify", max_new_tokens=20)
    assert default.token_ids == verify.token_ids
    assert default.stats.forward_passes == verify.stats.forward_passes


def test_the_heads_after_a_cut_do_not_run(model):
    heads, calls = model.heads(), []
    hidden = torch.randn(model.backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    handle = heads.steps[1].register_forward_hook(lambda *_: calls.append(1))
    try:
        assert heads.propose(hidden, 7, min_prob=0.999) == [] and calls == []
        assert len(heads.propose(hidden, 7)) == 2 and calls == [1]
    finally:
        handle.remove()


def test_prompt_lookup_is_lossless_and_drafts_from_the_context(model):
    from clp.policies import PromptLookup

    lookup = PromptLookup(num_tokens=3, max_ngram=2)
    assert lookup.propose(None, [5, 6, 7, 8, 9, 1, 6, 7], None) == [8, 9, 1]  # bigram 6 7
    assert lookup.propose(None, [5, 6, 7, 8, 9, 1, 2, 7], None) == [8, 9, 1]  # unigram 7
    assert lookup.propose(None, [1, 2, 3], None) == []
    drafted = 0
    for prompt in PROMPTS:
        ar = gen(model, prompt, "ar", max_new_tokens=24)
        r = gen(model, prompt, "lookup", max_new_tokens=24)
        assert r.token_ids == ar.token_ids, prompt
        drafted += sum(r.stats.offset_proposed.values())
    assert drafted > 0


def test_verify_copies_after_a_repeated_bigram_and_asks_the_heads_otherwise(model):
    policy = model.policy("verify")  # lookup 4 by default, capped by the runtime's max_drafts
    hidden = torch.randn(model.backbone.hidden_size)
    heads = model.heads().propose(hidden, 7, min_prob=DEFAULT_MIN_PROB)
    cap = min(4, getattr(model.runtime, "max_drafts", 4))  # the cpu runtime: 3
    assert policy.propose(hidden, [5, 6, 7, 8, 9, 1, 6, 7], None) == [8, 9, 1, 6][:cap]
    assert policy.propose(hidden, [5, 6, 7, 8, 9, 1, 2, 7], None) == heads  # unigram only
    assert model.policy("verify", lookup=0).propose(hidden, [5, 6, 7, 8, 1, 6, 7], None) == heads
    assert model.policy("verify", k=1, lookup=0).propose(hidden, [5, 6, 7], None) == heads[:1]
    for mode, n in (("clp", 2), ("verify", -1)):
        with pytest.raises(ClpError, match="lookup is a number >= 0 of drafts for mode verify"):
            model.policy(mode, lookup=n)


def test_verify_stops_at_eos_wherever_it_falls(model, tiny):
    """Each token of a verified output in turn made the EOS: the output ends right there,
    whether that token came as a confirmed draft or as the backbone's own next token."""
    prompt = PROMPTS[4]
    ar_ids = gen(model, prompt, "ar").token_ids
    old = tiny.model.generation_config.eos_token_id
    try:
        for stop_at, eos in enumerate(ar_ids):
            if eos in ar_ids[:stop_at]:
                continue
            tiny.model.generation_config.eos_token_id = eos
            ver = gen(model, prompt, "verify")
            assert ver.token_ids == ar_ids[: stop_at + 1] and ver.stop_reason == "eos"
    finally:
        tiny.model.generation_config.eos_token_id = old


@pytest.mark.parametrize("tau", [1.01, None])  # None: the default, chosen by task accuracy
@pytest.mark.parametrize("mode", ["clp", "clp+"])
def test_tau_above_one_is_plain_ar(model, mode, tau):
    for prompt in PROMPTS[:10]:
        r = gen(model, prompt, mode, tau=tau)
        assert r.token_ids == gen(model, prompt, "ar").token_ids
        assert r.stats.tokens_per_forward == 1.0


def test_mtp_emits_one_plus_k_tokens_per_forward(model):
    r = gen(model, PROMPTS[0], "mtp", max_new_tokens=30)
    assert len(r.token_ids) == 30 and r.stats.forward_passes == 10
    assert dict(r.stats.accepted_lengths) == {2: 10}


@pytest.mark.parametrize("mode", ["mtp", "gate", "clp", "clp+", "verify", "competing", "lookup"])
@pytest.mark.parametrize("n", [1, 5, 33])
def test_every_mode_stops_exactly_and_its_stats_add_up(model, mode, n):
    r = gen(model, PROMPTS[3], mode, max_new_tokens=n, tau=0.3)
    assert len(r.token_ids) == r.stats.new_tokens == n
    hist = r.stats.accepted_lengths
    assert sum((extra + 1) * c for extra, c in hist.items()) == n
    assert sum(hist.values()) == r.stats.forward_passes
    assert 0 < r.stats.policy_seconds < r.stats.seconds  # heads + predictor, timed apart


def test_unverified_modes_stop_at_a_stop_string_inside_a_span(model):
    full = gen(model, PROMPTS[2], "mtp", max_new_tokens=30)
    stop = full.text[7:9]
    r = gen(model, PROMPTS[2], "mtp", max_new_tokens=30, stop=[stop])
    assert r.text == full.text[: full.text.index(stop)] and r.stop_reason == "stop_string"


def test_competing_mode_lets_a_head_choose_token_n_plus_1(model):
    ar = gen(model, PROMPTS[5], "ar")
    comp = gen(model, PROMPTS[5], "competing")
    assert comp.stats.tokens_per_forward > 2.5  # head 0 + two more heads each forward
    assert len(comp.token_ids) == len(ar.token_ids)


def test_predictors_are_single_linear_layers(model):
    d, k = 64, 2
    assert model.predictor("clp").parameter_count() == d * (k + 1) + (k + 1)
    assert model.predictor("clp+").parameter_count() == (d + 2 * (1 + k)) * (k + 1) + (k + 1)


def test_mismatched_artifacts_fail_clearly(tiny, artifacts, tmp_path):
    from conftest import make_tiny_backbone

    other = Model(make_tiny_backbone(seed=3), artifacts)
    with pytest.raises(ClpError, match="trained for backbone"):
        other.generate("hi", mode="verify", raw=True)
    # a predictor trained for k=2 next to heads with k=3
    mixed = tmp_path / "mixed"
    shutil.copytree(artifacts / "competing", mixed)
    for name in ("clp.json", "clp.safetensors"):
        shutil.copy(artifacts / name, mixed / name)
    with pytest.raises(ClpError, match="trained for k=2, but the heads have k=3"):
        Model(tiny, mixed).generate("hi", mode="clp", raw=True)
    with pytest.raises(ClpError, match="no trained heads"):
        Model(tiny, None).generate("hi", mode="mtp", raw=True)
    with pytest.raises(ClpError, match="tau must be >= 0"):
        Model(tiny, artifacts).generate("hi", mode="clp", tau=-1, raw=True)


def test_sampling_with_verify_runs_and_is_seeded(model):
    a = gen(model, PROMPTS[1], "verify", temperature=1.0, seed=3)
    b = gen(model, PROMPTS[1], "verify", temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 40


def test_bench_reports_every_mode_consistently(model, tmp_path):
    import json
    import math

    from clp import bench

    docs = [Document(f"b{i}", p, category="abc"[i % 3]) for i, p in enumerate(PROMPTS[:6])]
    chosen = bench.variants(
        ["mtp", "clp", "verify"], tau=0.5, taus=[0.9], ks=[1, 2], heads_k=2, lookups=[0],
        min_probs=[0],
    )  # fmt: skip
    assert [v.name for v in chosen] == [
        "ar", "mtp", "clp", "verify", "clp@tau=0.9", "verify@tau=0.9", "mtp@k=1", "verify@k=1",
        "verify@lookup=0", "verify@min-prob=0",
    ]  # fmt: skip
    result = bench.run(model, chosen, docs, max_new_tokens=12, out=tmp_path, progress=False)
    files = bench.save(result, tmp_path)
    assert all(f.stat().st_size > 0 for f in files) and len(files) == 6  # json, md, 4 PNGs
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["modes"]) == [v.name for v in chosen]
    ar = saved["modes"]["ar"]
    for mode, s in saved["modes"].items():
        for key in (
            "tokens_per_second",
            "speedup",
            "tokens_per_forward",
            "repetition_ratio",
            "repetition_delta",
            "backbone_nll",
        ):
            assert math.isfinite(s[key]), (mode, key)
        assert s["speedup"] == pytest.approx(
            s["tokens_per_second"] / ar["tokens_per_second"], rel=1e-3
        )
        assert s["tokens_per_forward"] == pytest.approx(
            s["new_tokens"] / s["forward_passes"], rel=1e-3
        )
    modes = saved["modes"]
    assert modes["verify"]["agreement_with_ar"]["identical"] == 1.0
    assert modes["verify@k=1"]["agreement_with_ar"]["identical"] == 1.0
    assert modes["verify@lookup=0"]["agreement_with_ar"]["identical"] == 1.0
    assert set(modes["verify@lookup=0"]["acceptance_by_offset"]) <= {"1", "2"}  # heads only
    assert modes["verify@min-prob=0"]["agreement_with_ar"]["identical"] == 1.0
    assert modes["mtp"]["tokens_per_forward"] == 3.0
    assert modes["mtp@k=1"]["accepted_length_histogram"].keys() <= {"0", "1"}
    assert set(saved["by_category"]) == {"a", "b", "c"}
    assert "| verify |" in (tmp_path / "results.md").read_text()
    # the spread of the repetition delta: paired over prompts, from the outputs themselves
    lines = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    diffs = [
        repetition_ratio(x["runs"]["mtp"]["ids"]) - repetition_ratio(x["runs"]["ar"]["ids"])
        for x in lines
    ]
    assert modes["mtp"]["repetition_delta_se"] == pytest.approx(standard_error(diffs), abs=1e-4)
    assert modes["mtp"]["repetition_delta_se"] > 0 and ar["repetition_delta_se"] == 0


def test_bench_names_the_machine_that_ran_it_and_resumes_on_no_other(model, tmp_path):
    import json

    from clp import bench

    docs = [Document(f"b{i}", p) for i, p in enumerate(PROMPTS[:1])]
    chosen = bench.variants(["clp"])
    bench.run(model, chosen, docs, max_new_tokens=8, out=tmp_path, progress=False)
    then = json.loads((tmp_path / "machine.json").read_text())
    then.update(cpu="Another CPU", family_model="1/2")
    (tmp_path / "machine.json").write_text(json.dumps(then))
    report = bench.run(
        model, chosen, docs, max_new_tokens=8, out=tmp_path, progress=False, report_only=True
    )
    assert report["machine"]["cpu"] == "Another CPU"  # the run's machine, not the report's
    assert "CPU: Another CPU" in bench.markdown(report)
    with pytest.raises(ClpError, match="was started on Another CPU .* use another --out"):
        bench.run(model, chosen, docs, max_new_tokens=8, out=tmp_path, progress=False)
    (tmp_path / "machine.json").unlink()  # a run from before machines were recorded
    report = bench.run(
        model, chosen, docs, max_new_tokens=8, out=tmp_path, progress=False, report_only=True
    )
    assert report["machine"]["cpu"] == "not recorded"


def test_bench_resumes_and_refuses_other_settings(model, tmp_path):
    from clp import bench

    docs = [Document(f"b{i}", p) for i, p in enumerate(PROMPTS[:4])]
    chosen = bench.variants(["clp"])
    bench.run(model, chosen, docs[:2], max_new_tokens=8, out=tmp_path, progress=False)
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    (tmp_path / "runs.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # cut off mid-line
    logs = []
    result = bench.run(
        model, chosen, docs[:2], max_new_tokens=8, out=tmp_path, progress=False, log=logs.append
    )
    assert logs == [f"resuming: 1 prompt runs already in {tmp_path / 'runs.jsonl'}"]
    assert result["completed_prompts"] == 2
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2
    again = bench.run(
        model, chosen, docs[:2], max_new_tokens=8, out=tmp_path, progress=False, report_only=True
    )
    assert again["modes"]["clp"]["new_tokens"] == result["modes"]["clp"]["new_tokens"]
    assert again["machine"]["cpu"] == result["machine"]["cpu"] == bench._machine()["cpu"]
    with pytest.raises(ClpError, match="other settings"):
        bench.run(model, chosen, docs, max_new_tokens=8, out=tmp_path, progress=False)
    with pytest.raises(ClpError, match="unknown mode"):
        bench.variants(["fast"])
    with pytest.raises(ClpError, match="predictors trained for k=1"):
        model.policy("clp", 0.5, k=1)
    with pytest.raises(ClpError, match="cannot run the first 3"):
        model.policy("mtp", k=3)


def test_bench_prompt_subsets_spread_over_categories():
    from clp import bench

    docs = bench.load_prompts("mtbench", 16, every=5)
    assert len(docs) == 16 and docs[1].id == bench.load_prompts("mtbench", None)[5].id
    assert len({d.category for d in docs}) == 8
    with pytest.raises(ClpError, match="--every must be >= 1"):
        bench.load_prompts("mtbench", 4, every=0)


def test_repetition_and_its_standard_error_follow_their_definitions():
    assert repetition_ratio([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 5)
    assert repetition_ratio([1, 2, 3]) == 0.0  # no 4-gram at all
    assert standard_error([1.0, 2.0, 3.0]) == pytest.approx(1 / 3**0.5)
    assert standard_error([0.5]) == 0.0


def test_bench_skip_takes_prompts_disjoint_from_an_earlier_run():
    from clp import bench

    every = [d.id for d in bench.load_prompts("mtbench", None)]
    assert [d.id for d in bench.load_prompts("mtbench", 4, skip=10)] == every[10:14]
    assert [d.id for d in bench.load_prompts("mtbench", 3, every=2, skip=1)] == every[1:7:2]
    with pytest.raises(ClpError, match="--skip must be >= 0"):
        bench.load_prompts("mtbench", 4, skip=-1)
    with pytest.raises(ClpError, match="no prompts in mtbench after the first 80"):
        bench.load_prompts("mtbench", 4, skip=80)


@pytest.fixture(scope="module")
def on_transformers(tiny, artifacts):
    return Model(tiny, artifacts, runtime="transformers")


@pytest.mark.parametrize("runtime", ["model", "on_transformers"])
@pytest.mark.parametrize("nodes", [1, 6, 15])
def test_verify_with_a_tree_is_token_identical_to_ar(runtime, nodes, request):
    """Greedy, and seeded sampling: along the tree one draw per output token, as plain
    sampling draws them (``clp.decoding._walk``), so even the sampled tokens are ar's."""
    m = request.getfixturevalue(runtime)
    spans = 0
    for prompt in PROMPTS[::3]:
        for kw in ({}, {"temperature": 0.9, "top_k": 20, "seed": 5}):
            ar = gen(m, prompt, "ar", **kw)
            tree = gen(m, prompt, "verify", tree_nodes=nodes, **kw)
            assert tree.token_ids == ar.token_ids, (prompt, kw)
            spans += sum(c for extra, c in tree.stats.accepted_lengths.items() if extra > 0)
    assert spans > 0


def test_the_heads_tree_holds_their_chain_and_the_likeliest_alternatives(model):
    heads = model.heads()
    for seed in range(5):
        hidden = torch.randn(
            model.backbone.hidden_size, generator=torch.Generator().manual_seed(seed)
        )
        chain = heads.propose(hidden, 7)
        tokens, parents = heads.tree(hidden, 7, nodes=20)  # every candidate of 4 x 4 branches
        assert len(tokens) == 20 and parents[:4] == [-1] * 4
        assert all(-1 <= p < i for i, p in enumerate(parents))
        siblings = [(p, t) for p, t in zip(parents, tokens, strict=True)]
        assert len(set(siblings)) == len(siblings)
        first = tokens.index(chain[0])
        assert parents[first] == -1 and (first, chain[1]) in siblings  # the chain is a path
        assert heads.tree(hidden, 7, nodes=1) == ([chain[0]], [-1])
        small = heads.tree(hidden, 7, nodes=5)
        assert len(small[0]) == 5 and small[0][0] == chain[0]


def test_a_tree_takes_the_lookup_span_as_one_more_branch(model):
    from clp.decoding import Tree

    hidden = torch.randn(model.backbone.hidden_size)
    cap = min(4, getattr(model.runtime, "max_drafts", 4))
    tree = model.policy("verify", tree_nodes=8).propose(hidden, [5, 6, 7, 8, 9, 1, 6, 7], None)
    assert isinstance(tree, Tree) and len(tree.tokens) <= 8
    node, path = -1, []
    pairs = list(zip(tree.parents, tree.tokens, strict=True))
    for token in [8, 9, 1, 6][:cap]:  # the copied span, from the root
        node = pairs.index((node, token))
        path.append(node)
    assert len(path) == cap
    assert Tree([3, 8], [-1, -1]).with_chain([8, 9]) == Tree([3, 8, 9], [-1, -1, 1])


def test_bad_tree_budgets_fail_clearly(model):
    for mode, nodes in (("clp", 4), ("verify", 16), ("verify", -1)):
        with pytest.raises(ClpError, match="tree_nodes is a number of draft nodes, 0 to 15"):
            model.policy(mode, tree_nodes=nodes)


def test_bench_sweeps_draft_trees_and_names_the_fastest(model, artifacts, tmp_path):
    import json

    from clp import bench
    from clp.features import FeatureCache
    from clp.training import evaluate_heads

    heads = model.heads()  # a static tree is shaped by the heads' held-out rank accuracy
    heldout = FeatureCache(artifacts.parent / "calib").load()
    heads.config.training["heldout"] = evaluate_heads(heads, heldout)
    chosen = bench.variants(["verify"], trees=[0, 3, 6], tree_shapes=["dynamic", "static"])
    assert [v.name for v in chosen] == [
        "ar", "verify", "verify@tree=3", "verify@tree=6", "verify@static-tree=3",
        "verify@static-tree=6",
    ]  # fmt: skip
    docs = [Document(f"t{i}", p) for i, p in enumerate(PROMPTS[:3])]
    result = bench.run(model, chosen, docs, max_new_tokens=16, out=tmp_path, progress=False)
    modes = result["modes"]
    for v in chosen:
        s = modes[v.name]
        assert s["agreement_with_ar"]["identical"] == 1.0, v.name
        rounding = 0.5 / s["forward_passes"] + 0.005  # seconds to 1 ms, ms/forward to 0.01
        assert s["ms_per_forward"] == pytest.approx(
            1000 * s["seconds"] / s["forward_passes"], rel=1e-2, abs=rounding
        )
    choice = result["tree_choice"]
    fastest = max(chosen[1:], key=lambda v: modes[v.name]["tokens_per_second"])
    assert choice["name"] == fastest.name
    assert choice["tree_nodes"] == (fastest.tree_nodes or 0)
    assert "Fastest draft tree here" in bench.markdown(result)
    # run.json records the tree fields only where set: runs without trees resume as before
    saved = json.loads((tmp_path / "run.json").read_text())["variants"]
    assert "tree_nodes" not in saved[1] and saved[2]["tree_nodes"] == 3
