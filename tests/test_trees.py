"""Token-tree drafts: one forward runs every branch with a tree mask, the accepted path's cache
entries are compacted into place, and the output is exactly plain decoding's."""

from __future__ import annotations

import random

import pytest
import torch
from test_decoding import PROMPTS, NoisyOracle

from clp.cpu.runtime import CpuRuntime
from clp.decoding import Policy, SamplingConfig, Tree, generate
from clp.errors import ClpError
from clp.runtime import TransformersRuntime, tree_rows

TOKENS = [5, 17, 33, 8, 41, 9, 12, 17, 60, 23, 5]
PARENTS = [-1, 0, 0, 1, 2, 2, 4, -1, 7, 3, 9]  # two roots, branches of depth 1 to 4


def wide_bf16(seed: int = 0):
    from conftest import make_tiny_backbone

    return make_tiny_backbone(
        seed, dtype=torch.bfloat16, hidden_size=256, intermediate_size=512, num_attention_heads=8
    )


@pytest.fixture(scope="module")
def runtimes(tiny):
    """Runtimes whose rows get the same bits whatever the forward's width (bf16), and the
    fp32 tiny model on transformers (exact tokens, not bits)."""
    wide = wide_bf16()
    return {
        "transformers-bf16": (wide, TransformersRuntime(wide)),
        "cpu-q4": (wide, CpuRuntime(wide, "q4", context=256)),
        "cpu-bf16": (wide, CpuRuntime(wide, "bf16", context=256)),
        "transformers-fp32": (tiny, TransformersRuntime(tiny)),
    }


BITWISE = ["transformers-bf16", "cpu-q4", "cpu-bf16"]


def fed_after(runtime, prompt: list[int], tokens: list[int], parents=None):
    runtime.reset()
    runtime.feed(prompt)
    hidden = runtime.feed(tokens, parents).clone()
    return hidden, runtime.logits(len(tokens))


@pytest.mark.parametrize("name", BITWISE)
def test_every_tree_row_equals_its_path_fed_alone(runtimes, name):
    """The tree mask and positions: node i at cache length + depth, attending to the cache
    and its own ancestors, gets the bits of its root-to-node path fed as a plain sequence."""
    runtime = runtimes[name][1]
    prompt = list(range(3, 50))
    hidden, logits = fed_after(runtime, prompt, TOKENS, PARENTS)
    _, lines = tree_rows(PARENTS)
    for i, line in enumerate(lines):
        alone_hidden, alone_logits = fed_after(runtime, prompt, [TOKENS[j] for j in line])
        assert torch.equal(hidden[i], alone_hidden[-1]), i
        assert torch.equal(logits[i], alone_logits[-1]), i


@pytest.mark.parametrize("name", BITWISE)
@pytest.mark.parametrize("path", [[0, 1, 3, 6], [0, 8, 9], [0], [0, 1, 2, 4, 10, 11], [0, 1]])
def test_cache_after_a_partly_rejected_tree_is_the_accepted_paths(runtimes, name, path):
    """``keep`` moves the accepted path's keys and values into place and drops the rest: the
    cache then gives every later token the bits it gets after the path fed alone."""
    runtime = runtimes[name][1]
    prompt, root, nxt = list(range(3, 50)), 44, [20, 21, 22]
    runtime.reset()
    runtime.feed(prompt)
    runtime.feed([root, *TOKENS], [-1] + [p + 1 for p in PARENTS])
    runtime.keep(path)
    assert runtime.length == len(prompt) + len(path)
    after = runtime.feed(nxt).clone(), runtime.logits(len(nxt))
    alone = fed_after(runtime, prompt, [([root] + TOKENS)[i] for i in path] + nxt)
    assert torch.equal(after[0], alone[0][-len(nxt) :])
    assert torch.equal(after[1], alone[1][-len(nxt) :])
    if isinstance(runtime, TransformersRuntime):  # the cache tensors themselves
        runtime.reset()
        runtime.feed(prompt)
        runtime.feed([root, *TOKENS], [-1] + [p + 1 for p in PARENTS])
        runtime.keep(path)
        kept = [(layer.keys.clone(), layer.values.clone()) for layer in runtime.cache.layers]
        fed_after(runtime, prompt, [([root] + TOKENS)[i] for i in path])
        for (k, v), layer in zip(kept, runtime.cache.layers, strict=True):
            assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)


class TreeOracle(Policy):
    """Random trees around the true continuation: the right token at each depth (unless
    corrupted) among random siblings, wrong branches grown too; nodes in breadth-first order,
    so the accepted path's rows are rarely the first ones and the cache must be compacted."""

    verifies = True

    def __init__(self, reference, depth=4, width=3, error_rate=0.3, max_nodes=12, seed=0):
        self.reference, self.depth, self.width = reference, depth, width
        self.error_rate, self.max_nodes, self.seed = error_rate, max_nodes, seed

    def reset(self):
        self.rng = random.Random(self.seed)

    def propose(self, hidden, tokens, logits):
        rng, n = self.rng, len(tokens)
        tree_tokens, parents = [], []
        frontier = [(-1, True)]  # (node, on the true path)
        for d in range(rng.randint(0, self.depth)):
            grown = []
            for node, true in frontier:
                for b in range(rng.randint(1, self.width)):
                    if len(tree_tokens) == self.max_nodes:
                        break
                    right = true and b == 0 and rng.random() > self.error_rate
                    token = self.reference[n + d] if right else rng.randrange(99)
                    tree_tokens.append(token)
                    parents.append(node)
                    grown.append((len(tree_tokens) - 1, true and token == self.reference[n + d]))
            rng.shuffle(grown)  # the true branch is not always the first child
            frontier = grown
        return Tree(tree_tokens, parents)


def run(backbone, runtime, prompt, policy=None, n=30, sampling=None):
    ids = backbone.tokenizer(prompt)["input_ids"]
    return generate(
        runtime, backbone.tokenizer, ids, policy, max_new_tokens=n, eos_ids=set(), sampling=sampling
    )


@pytest.mark.parametrize("name", [*BITWISE, "transformers-fp32"])
@pytest.mark.parametrize("error_rate", [0.0, 0.3, 1.0])
def test_verify_with_trees_equals_greedy(runtimes, name, error_rate):
    backbone, runtime = runtimes[name]
    for prompt in PROMPTS:
        ref = run(backbone, runtime, prompt, n=30)
        ids = backbone.tokenizer(prompt)["input_ids"]
        oracle = TreeOracle(ids + ref.token_ids + [0] * 8, error_rate=error_rate)
        for n in (30, 7):  # the budget falls inside accepted paths too
            out = run(backbone, runtime, prompt, oracle, n=n)
            assert out.token_ids == ref.token_ids[:n], prompt
            assert sum((k + 1) * c for k, c in out.stats.accepted_lengths.items()) == n
        if error_rate == 0.0:
            assert out.stats.forward_passes < ref.stats.forward_passes


@pytest.mark.parametrize("name", ["transformers-fp32", "cpu-q4"])
def test_sampling_along_the_tree_draws_what_plain_sampling_draws(runtimes, name):
    """Each node's backbone token is sampled from the backbone's distribution given its path,
    and is the next output token whether or not a child holds it: one draw per output token,
    in order, as plain sampling makes. So with a seed the tokens equal plain sampling's (and
    the output distribution is plain sampling's), however many drafts are accepted."""
    backbone, runtime = runtimes[name]
    for seed, prompt in enumerate(PROMPTS):
        cfg = SamplingConfig(temperature=0.8, top_k=10, seed=seed)
        ref = run(backbone, runtime, prompt, n=30, sampling=cfg)
        ids = backbone.tokenizer(prompt)["input_ids"]
        for error_rate in (0.0, 0.5, 1.0):
            oracle = TreeOracle(ids + ref.token_ids + [0] * 8, error_rate=error_rate)
            out = run(backbone, runtime, prompt, oracle, n=30, sampling=cfg)
            assert out.token_ids == ref.token_ids, (prompt, error_rate)
            if error_rate == 0.0:
                assert out.stats.forward_passes < ref.stats.forward_passes


class AsTree(Policy):
    """A chain policy's drafts sent as a tree whose parents are i - 1."""

    verifies = True

    def __init__(self, policy: Policy):
        self.policy = policy

    def reset(self):
        self.policy.reset()

    def propose(self, hidden, tokens, logits):
        return Tree.chain(self.policy.propose(hidden, tokens, logits))


@pytest.mark.parametrize("name", ["transformers-fp32", "cpu-q4"])
def test_a_chain_sent_as_a_tree_decodes_as_the_chain(runtimes, name):
    backbone, runtime = runtimes[name]
    cfg = SamplingConfig(temperature=1.0, seed=3)
    for prompt in PROMPTS:
        ids = backbone.tokenizer(prompt)["input_ids"]
        ref = run(backbone, runtime, prompt, n=30)
        chain = NoisyOracle(ids + ref.token_ids + [0] * 8, k=4, error_rate=0.3)
        for sampling in (None, cfg):
            a = run(backbone, runtime, prompt, chain, sampling=sampling)
            b = run(backbone, runtime, prompt, AsTree(chain), sampling=sampling)
            assert a.token_ids == b.token_ids
            assert a.stats.accepted_lengths == b.stats.accepted_lengths
            assert a.stats.offset_accepted == b.stats.offset_accepted


def test_the_compiled_cpu_decoder_keeps_trees_exact():
    backbone = wide_bf16(1)
    runtime = CpuRuntime(backbone, "q4", context=256, compile=True)
    prompt = list(range(3, 50))
    hidden, _ = fed_after(runtime, prompt, TOKENS, PARENTS)
    for i, line in enumerate(tree_rows(PARENTS)[1]):
        assert torch.equal(hidden[i], fed_after(runtime, prompt, [TOKENS[j] for j in line])[0][-1])
    ref = run(backbone, runtime, PROMPTS[0])
    ids = backbone.tokenizer(PROMPTS[0])["input_ids"]
    oracle = TreeOracle(ids + ref.token_ids + [0] * 8)
    assert run(backbone, runtime, PROMPTS[0], oracle).token_ids == ref.token_ids


def test_bad_trees_fail_clearly():
    with pytest.raises(ValueError, match="parent must come before"):
        Tree([1, 2], [-1, 1])
    with pytest.raises(ValueError, match="one parent per token"):
        Tree([1, 2], [-1])


def test_the_llama_cpp_runtime_says_it_takes_no_trees():
    from clp.llama_runtime import LlamaCppRuntime

    with pytest.raises(ClpError, match="cannot verify token trees"):
        LlamaCppRuntime.feed(None, [1, 2], [-1, 0])


def test_a_static_tree_takes_the_paths_of_highest_heldout_acceptance():
    from clp.heads import static_shape

    # paths (0) .6, (0,0) .3, (1) .25, (0,1) .18, (1,0) .125, ...: breadth-first
    ranks, parents = static_shape([[0.6, 0.25, 0.1], [0.5, 0.3]], 4)
    assert (ranks, parents) == ([0, 1, 0, 1], [-1, -1, 0, 0])
    assert static_shape([[0.6, 0.25, 0.1], [0.5, 0.3]], 1) == ([0], [-1])


def test_static_tree_nodes_are_the_heads_ranked_proposals(tiny):
    """Node (r1, r2) holds head 1's r1-th likeliest token and head 2's r2-th likeliest after
    it (the chain head fed that token), as teacher-forced heads give them."""
    from clp.heads import HeadConfig, MTPHeads, frozen_weights

    torch.manual_seed(0)
    cfg = HeadConfig(arch="chain", k=2, hidden_size=tiny.hidden_size, vocab_size=tiny.vocab_size)
    heads = MTPHeads(cfg, *frozen_weights(tiny, torch.float32)).eval()
    for step in heads.steps:  # random, not zero-initialised: every rank differs
        for p in step.parameters():
            torch.nn.init.normal_(p, std=0.2)
    hidden, token = torch.randn(tiny.hidden_size), 7
    shape = ([0, 2, 1, 0, 3], [-1, -1, 0, 1, 1])
    tokens, parents = heads.static_tree(hidden, token, shape)
    assert parents == shape[1]
    first = heads(hidden[None], torch.tensor([[token, 0]]))[0][0].topk(4).indices
    assert tokens[:2] == [int(first[0]), int(first[2])]
    for node in (2, 3, 4):
        above = tokens[parents[node]]
        second = heads(hidden[None], torch.tensor([[token, above]]))[1][0].topk(4).indices
        assert tokens[node] == int(second[shape[0][node]])
    # the predictor's length: nodes deeper than n are left out
    assert heads.static_tree(hidden, token, shape, n=1) == (tokens[:2], [-1, -1])


def test_static_trees_need_the_heads_rank_accuracy(tiny):
    from clp.heads import HeadConfig, MTPHeads, frozen_weights

    cfg = HeadConfig(arch="chain", k=2, hidden_size=tiny.hidden_size, vocab_size=tiny.vocab_size)
    heads = MTPHeads(cfg, *frozen_weights(tiny, torch.float32))
    with pytest.raises(ClpError, match="clp train evaluate"):
        heads.static_shape(4)
    heads.config.training = {"heldout": {"ranks": {"n+2": [0.5, 0.2], "n+3": [0.4, 0.1]}}}
    assert heads.static_shape(3) == ([0, 1, 0], [-1, -1, 0])
