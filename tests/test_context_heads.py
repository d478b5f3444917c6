"""Context heads (head 1 attends over the reply so far): training, save / load, and that the
decode loop hands them exactly the reply's positions, in verified and unverified modes."""

from __future__ import annotations

import pytest
import torch

from clp.api import Model
from clp.data import Document
from clp.errors import ClpError
from clp.features import CacheSpec, build_cache
from clp.heads import HeadConfig, ReplyContext, load_heads, save_heads
from clp.policies import AcceptAll, Verified
from clp.training import Documents, all_context, evaluate_heads, new_heads, train_heads

SPEC = CacheSpec("distill", docs_per_shard=8, max_new_tokens=32)
PROMPTS = [f"prompt {i}: " + "abcxyz"[i % 6] * (i % 5 + 1) for i in range(8)]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    tiny.tokenizer.chat_template = None
    root = tmp_path_factory.mktemp("context")
    docs = [Document(f"t{i}", f"train {i} " + "pq"[i % 2] * (i % 9)) for i in range(32)]
    data = build_cache(tiny, docs, root / "cache", SPEC, batch_size=8).load()
    torch.manual_seed(0)
    heads = new_heads(HeadConfig(arch="chain", k=2, context=True), tiny, data, draft_vocab=0)
    info = train_heads(heads, data, root / "ckpt", epochs=20, batch_size=64, log=lambda m: None)
    save_heads(heads, root / "heads")
    return heads, data, info, root / "heads"


def test_context_heads_learn_and_round_trip(tiny, trained):
    heads, data, info, path = trained
    assert info["documents_per_step"] >= 1 and info["last_loss"] < info["first_loss"]
    report = evaluate_heads(heads, data)
    assert report["top1"]["n+2"] > 0.5  # far above chance on a 97-token vocabulary
    loaded = load_heads(path, tiny, torch.float32)
    assert loaded.config.context
    assert evaluate_heads(loaded, data)["chained"] == pytest.approx(report["chained"], abs=0.02)


def test_context_advanced_piece_by_piece_equals_the_whole_reply_at_once(trained):
    heads, data, _, _ = trained
    offline = all_context(heads, data)
    docs = Documents(data["doc"])
    start, length = int(docs.starts[5]), int(docs.lengths[5])
    reply = ReplyContext(heads)
    done = 0
    for size in (1, 3, 2, 4, 1000):  # committed spans of several lengths, as decoding has
        end = min(done + size, length)
        got = reply.advance(
            data["hidden"][start + done : start + end],
            data["next"][start + done : start + end].tolist(),
        )
        torch.testing.assert_close(got, offline[start + end - 1], atol=1e-5, rtol=1e-5)
        done = end
        if done == length:
            break


def test_past_the_trained_window_only_the_latest_positions_are_attended(trained):
    heads, data, _, _ = trained
    assert heads.config.context_window == int(Documents(data["doc"]).lengths.max())
    docs = Documents(data["doc"])
    longest = int(docs.lengths.argmax())
    start, length = int(docs.starts[longest]), int(docs.lengths[longest])
    hidden, nxt = data["hidden"][start : start + length], data["next"][start : start + length]
    reply = ReplyContext(heads)
    reply.window = 4
    for t in range(length):
        got = reply.advance(hidden[t : t + 1], [int(nxt[t])])
        lo = max(0, t - 3)  # the window: this position and the three before it
        want, _ = heads.context(hidden[None, lo : t + 1].float(), nxt[None, lo : t + 1], start=lo)
        torch.testing.assert_close(got, want[0, -1], atol=1e-5, rtol=1e-5)
    assert reply.past[0].shape[2] == 4 and reply.length == length


class Recording:
    """Wraps a head policy: keeps the context it had at each step, and the step's length."""

    def __init__(self, policy):
        self.policy, self.contexts = policy, []
        real = policy.draft

        def draft(hidden, tokens, logits):
            self.contexts.append((len(tokens), policy.context.clone()))
            return real(hidden, tokens, logits)

        policy.draft = draft


@pytest.mark.parametrize(
    "make", [AcceptAll, lambda h: Verified(h, lookup=0)], ids=["mtp", "verify"]
)
def test_decoding_gives_context_heads_exactly_the_replys_positions(tiny, trained, make):
    """At every step the context equals head 1's attention computed offline over the final
    reply (one teacher-forced forward of prompt + reply): the loop passed every committed
    position once, in order, whether drafts were accepted blindly or verified."""
    from clp.decoding import generate
    from clp.runtime import TransformersRuntime

    heads = trained[0]
    steps = 0
    for prompt in PROMPTS:
        ids = tiny.tokenizer(prompt)["input_ids"]
        rec = Recording(make(heads))
        out = generate(
            TransformersRuntime(tiny), tiny.tokenizer, ids, rec.policy, max_new_tokens=24
        )
        full = torch.tensor([ids + out.token_ids])
        with torch.no_grad():
            hidden = tiny.model.get_decoder()(input_ids=full).last_hidden_state[0]
        rows = hidden[len(ids) - 1 : -1]  # positions whose next token is a reply token
        offline, _ = heads.context(rows[None], torch.tensor([out.token_ids]))
        for length, context in rec.contexts:
            position = length - len(ids) - 1  # the current position's index in the reply
            torch.testing.assert_close(context, offline[0, position], atol=1e-4, rtol=1e-4)
            steps += 1
    assert steps > len(PROMPTS) * 3


def test_verify_with_context_heads_equals_ar(tiny, trained):
    model = Model(tiny, trained[3])
    for prompt in PROMPTS:
        ar = model.generate(prompt, mode="ar", raw=True, max_new_tokens=24)
        ver = model.generate(prompt, mode="verify", raw=True, max_new_tokens=24)
        assert ver.token_ids == ar.token_ids


def test_context_needs_chain_heads_and_a_reply_context(trained):
    with pytest.raises(ClpError, match="needs --arch chain"):
        HeadConfig(arch="medusa", context=True).validate()
    with pytest.raises(ClpError, match="ReplyContext"):
        trained[0].run(torch.zeros(trained[0].config.hidden_size), 5)


def test_chain_heads_warm_start_as_context_heads_unchanged(tiny, trained, tmp_path):
    """--init plain chain heads --context: the attention starts at zero, so before any
    training the context heads propose exactly what the saved heads did."""
    from clp.training import warm_heads

    _, data, _, _ = trained
    torch.manual_seed(1)
    plain = new_heads(HeadConfig(arch="chain", k=2), tiny, data, draft_vocab=0)
    train_heads(plain, data, tmp_path / "ckpt", epochs=3, batch_size=64, log=lambda m: None)
    save_heads(plain, tmp_path / "plain")
    grown = warm_heads(tmp_path / "plain", HeadConfig(arch="chain", k=2, context=True), tiny, 0)
    assert grown.config.context and grown.steps[0].attention is not None
    saved = load_heads(tmp_path / "plain", tiny, torch.float32)  # bf16-rounded as saved
    assert evaluate_heads(grown, data) == evaluate_heads(saved, data)
    with pytest.raises(ClpError, match="--arch chain"):
        warm_heads(tmp_path / "plain", HeadConfig(arch="medusa", k=2), tiny, 0)
