"""clp serve: the real server (uvicorn, a free 127.0.0.1 port) driven by the official
``openai`` client, against ``Model.generate`` for the same prompt and mode."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
import uvicorn
from click.testing import CliRunner
from conftest import make_tiny_backbone

from clp.api import Model
from clp.cli import main
from clp.features import fingerprint
from clp.heads import HeadConfig, MTPHeads, frozen_weights, save_heads
from clp.serve import ServerConfig, create_app

HOST = "127.0.0.1"
KEY = "sekrit"


@dataclass
class Served:
    """A running server: its address, its app (for its engine), and a client for it."""

    port: int
    app: object
    client: openai.OpenAI
    name: str

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def raw(self, method: str, path: str, body: bytes | None = None, **headers: str):
        """A plain HTTP request (for what the openai client cannot send): status, JSON."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        ctype = r.getheader("content-type", "")
        return r.status, json.loads(data) if "json" in ctype else data.decode()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a /metrics sample over the series that carry ``labels``."""
        status, text = self.raw("GET", "/metrics")
        assert status == 200
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, value = line.rsplit(" ", 1)
            if series.split("{")[0] == name and all(
                f'{k}="{v}"' in series for k, v in labels.items()
            ):
                total += float(value)
        return total


@contextlib.contextmanager
def serving(model: Model, **config):
    """uvicorn in a thread on a socket bound to a free loopback port (no port race)."""
    app = create_app(model, ServerConfig(**config))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    port = sock.getsockname()[1]
    client = openai.OpenAI(
        base_url=f"http://{HOST}:{port}/v1", api_key=config.get("api_key") or "none",
        max_retries=0, timeout=300,
    )  # fmt: skip
    try:
        yield Served(port, app, client, config["model_name"])
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def random_heads(backbone, path: Path) -> Path:
    """Untrained chain heads for the tiny backbone: verify must still give greedy's output."""
    config = HeadConfig(
        k=2, hidden_size=backbone.hidden_size, vocab_size=backbone.vocab_size,
        fingerprint=fingerprint(backbone),
    )  # fmt: skip
    torch.manual_seed(0)
    save_heads(MTPHeads(config, *frozen_weights(backbone, backbone.dtype)), path)
    return path


class SlowRuntime:
    """A runtime whose forwards take ``delay`` seconds more: long enough generations to
    disconnect from or to fill the queue with, on a tiny model."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def feed(self, tokens):
        time.sleep(self.delay)
        return self.inner.feed(tokens)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Model:
    backbone = make_tiny_backbone(context=256)
    return Model(backbone, heads_dir=random_heads(backbone, tmp_path_factory.mktemp("heads")))


@pytest.fixture(scope="module")
def srv(tiny_model):
    with serving(tiny_model, model_name="tiny", max_body_bytes=64 << 10) as s:
        yield s


@pytest.fixture(scope="module")
def slow():
    """One waiting request at most, an API key, 10 ms a forward."""
    model = Model(make_tiny_backbone(seed=1, context=4096))
    model.runtime = SlowRuntime(model.runtime, 0.01)
    with serving(model, model_name="slow", mode="ar", api_key=KEY, max_queue=1) as s:
        yield s


def chat(s: Served, prompt: str, stream: bool = False, **kw):
    """The reply text and the final response (or the list of chunks, when streamed)."""
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    messages = [{"role": "user", "content": prompt}]
    model = kw.pop("model", s.name)
    r = s.client.chat.completions.create(model=model, messages=messages, stream=stream, **kw)
    if not stream:
        return r.choices[0].message.content, r
    chunks = list(r)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# ---- the endpoints against Model.generate -------------------------------------------


def test_models_lists_the_served_model(srv):
    assert [m.id for m in srv.client.models.list()] == ["tiny"]
    status, body = srv.raw("GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["mode"] == "verify"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", ["verify", "ar", "lookup", "mtp"])
def test_chat_greedy_equals_model_generate(srv, tiny_model, mode, stream):
    prompt = "The quick brown fox"
    ref = tiny_model.generate(prompt, mode=mode, max_new_tokens=30)
    text, r = chat(srv, prompt, stream, max_tokens=30, extra_body={"mode": mode})
    assert text == ref.text
    last = r[-1] if stream else r
    assert last.clp["mode"] == mode and last.clp["forward_passes"] == ref.stats.forward_passes
    assert (last.choices[0].finish_reason == "length") == (ref.stop_reason == "max_new_tokens")


def test_default_mode_is_verify_and_lossless(srv, tiny_model):
    prompt = "x = 1 + 2\n"
    text, r = chat(srv, prompt, max_tokens=40)
    assert r.clp["mode"] == "verify"
    assert text == tiny_model.generate(prompt, mode="ar", max_new_tokens=40).text


@pytest.mark.parametrize("stream", [False, True])
def test_completion_is_the_raw_prompt_continued(srv, tiny_model, stream):
    prompt = "def fib(n):"
    ref = tiny_model.generate(prompt, mode="verify", max_new_tokens=20, raw=True)
    r = srv.client.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=stream
    )
    if stream:
        chunks = list(r)
        assert all(c.object == "text_completion" for c in chunks)
        text, last = "".join(c.choices[0].text for c in chunks), chunks[-1]
    else:
        text, last = r.choices[0].text, r
        assert r.usage.prompt_tokens == ref.stats.prompt_tokens
        assert (
            r.usage.completion_tokens == 20 and r.usage.total_tokens == 20 + r.usage.prompt_tokens
        )
    assert text == ref.text and last.choices[0].finish_reason == "length"


def test_token_id_prompt_equals_text_prompt(srv, tiny_model):
    ids = tiny_model.tokenizer("Why?")["input_ids"]
    by_ids = srv.client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    by_text = srv.client.completions.create(
        model="tiny", prompt="Why?", max_tokens=12, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_sampling_is_seeded_like_model_generate(srv, tiny_model):
    opts = dict(temperature=0.9, top_p=0.9, seed=7)
    ref = tiny_model.generate("Hello", mode="verify", max_new_tokens=30, **opts)
    a, _ = chat(srv, "Hello", max_tokens=30, **opts)
    b, _ = chat(srv, "Hello", True, max_tokens=30, **opts)
    assert a == b == ref.text
    greedy, _ = chat(srv, "Hello", max_tokens=30)
    assert greedy != a


def test_stop_strings_end_the_reply(srv, tiny_model):
    ref = tiny_model.generate("Hello", max_new_tokens=40)
    stop = ref.text[10:12]
    expected = tiny_model.generate("Hello", max_new_tokens=40, stop=[stop])
    assert expected.stop_reason == "stop_string"
    for stream in (False, True):
        text, r = chat(srv, "Hello", stream, max_tokens=40, stop=[stop, "never"])
        assert text == expected.text and stop not in text
        assert (r[-1] if stream else r).choices[0].finish_reason == "stop"


def test_usage_chunk_when_asked(srv):
    _, chunks = chat(srv, "abc", True, max_tokens=9, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 9


def test_concurrent_requests_each_get_their_own_tokens(srv, tiny_model):
    prompts = ["Hello, world!", "abc", "The quick brown fox", "Why?", "x = 1", "zz"] * 2
    refs = {p: tiny_model.generate(p, mode="verify", max_new_tokens=25).text for p in prompts}
    results: dict[int, str] = {}

    def one(i: int) -> None:
        results[i] = chat(srv, prompts[i], stream=i % 2 == 0, max_tokens=25)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == [refs[p] for p in prompts]


# ---- bad input: an OpenAI error object, a 4xx, and nothing lost for others ------------

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, status, param, code",  # sent as they are, fields the openai client would refuse too
    [
        ({"model": "gpt-4o", "messages": MSG}, 404, "model", "model_not_found"),
        ({"messages": MSG}, 400, "model", None),
        ({"model": "tiny", "messages": []}, 400, "messages", None),
        ({"model": "tiny"}, 400, "messages", None),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400,
         "messages[0].role", None),
        ({"model": "tiny", "messages": [{"role": "tool", "content": "hi"}]}, 400,
         "messages[0].role", None),
        ({"model": "tiny", "messages": [{"role": "user", "content": "   "}]}, 400, "messages",
         None),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 300}]}, 400,
         "messages", "context_length_exceeded"),
        ({"model": "tiny", "messages": MSG, "max_tokens": 0}, 400, "max_tokens", None),
        ({"model": "tiny", "messages": MSG, "max_tokens": -5}, 400, "max_tokens", None),
        ({"model": "tiny", "messages": MSG, "max_tokens": 255}, 400, "max_tokens",
         "context_length_exceeded"),
        ({"model": "tiny", "messages": MSG, "max_tokens": "ten"}, 400, "max_tokens", None),
        ({"model": "tiny", "messages": MSG, "mode": "warp"}, 400, "mode", None),
        ({"model": "tiny", "messages": MSG, "n": 2}, 400, "n", None),
        ({"model": "tiny", "messages": MSG, "temperature": -1}, 400, "temperature", None),
        ({"model": "tiny", "messages": MSG, "temperature": float("nan")}, 400, "temperature",
         None),
        ({"model": "tiny", "messages": MSG, "top_p": 0}, 400, "top_p", None),
        ({"model": "tiny", "messages": MSG, "stop": [1]}, 400, "stop", None),
        ({"model": "tiny", "messages": MSG, "logprobs": True}, 400, "logprobs", None),
    ],
)  # fmt: skip
def test_bad_chat_requests_get_openai_errors(srv, body, status, param, code):
    got, err = srv.raw("POST", "/v1/chat/completions", json.dumps(body).encode())
    assert got == status
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    err = err["error"]
    assert err["param"] == param and err["code"] == code and err["message"]
    assert err["type"] == "invalid_request_error"


def test_the_openai_client_raises_its_typed_errors(srv):
    with pytest.raises(openai.NotFoundError) as info:
        chat(srv, "hi", model="gpt-4o")
    assert info.value.body["code"] == "model_not_found"
    for kw, param in [
        ({"max_tokens": 0}, "max_tokens"),
        ({"extra_body": {"mode": "warp"}}, "mode"),
        ({"extra_body": {"mode": "clp", "tau": -1}}, "tau"),
        ({"n": 3}, "n"),
    ]:
        for stream in (False, True):  # a streamed request is refused before it streams
            with pytest.raises(openai.BadRequestError) as info:
                chat(srv, "hi", stream, **kw)
            assert info.value.body["param"] == param


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b'{"model": "tiny", "messages": [', 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (b'{"model": "tiny", "prompt": "' + b"a" * (70 << 10) + b'"}', 413, "request_too_large"),
    ],
)
def test_malformed_and_oversize_bodies(srv, body, status, code):
    got, err = srv.raw("POST", "/v1/completions", body, **{"Content-Type": "application/json"})
    assert got == status and err["error"]["code"] == code


def test_bad_completion_prompts(srv):
    for prompt, param in [("", "prompt"), (["a", "b"], "prompt"), ([10**9], "prompt")]:
        with pytest.raises(openai.BadRequestError) as info:
            srv.client.completions.create(model="tiny", prompt=prompt, max_tokens=3)
        assert info.value.body["param"] == param


def test_unknown_route_and_method_are_openai_errors(srv):
    status, err = srv.raw("GET", "/v1/nothing")
    assert status == 404 and err["error"]["message"]
    status, err = srv.raw("GET", "/v1/chat/completions")
    assert status == 405 and "error" in err


def test_errors_cost_other_requests_nothing(srv, tiny_model):
    before = srv.metric("clp_requests_total", status="400")
    ref = tiny_model.generate("abc", mode="verify", max_new_tokens=20).text
    results, errors = [], []

    def good() -> None:
        results.append(chat(srv, "abc", True, max_tokens=20)[0])

    def bad() -> None:
        try:
            chat(srv, "abc", max_tokens=0)
        except openai.BadRequestError as exc:
            errors.append(exc.status_code)

    threads = [threading.Thread(target=good if i % 2 else bad) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [ref] * 6 and errors == [400] * 6
    assert srv.metric("clp_requests_total", status="400") == before + 6


# ---- the API key, the queue, disconnects -----------------------------------------------


def test_api_key_is_required_when_set(slow):
    with pytest.raises(openai.AuthenticationError) as info:
        slow.client.with_options(api_key="wrong").models.list()
    assert info.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEY}"}):
        status, err = slow.raw("POST", "/v1/completions", b"{}", **headers)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
    assert [m.id for m in slow.client.models.list()] == ["slow"]
    assert slow.raw("GET", "/health")[0] == 200  # health and metrics stay open


def wait_for(condition, timeout: float = 120.0) -> None:
    """Poll until ``condition()``; the bound is for a starved CI machine, not the usual case."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_disconnected_stream_stops_its_generation(slow):
    tokens0 = slow.metric("clp_completion_tokens_total")
    stream = slow.client.chat.completions.create(
        model="slow", messages=MSG, max_tokens=3000, temperature=0, stream=True
    )
    pieces = 0
    for c in stream:
        pieces += bool(c.choices and c.choices[0].delta.content)
        if pieces == 5:
            break
    stream.close()
    wait_for(lambda: slow.metric("clp_generations_total", stop_reason="cancelled") == 1)
    wait_for(lambda: slow.metric("clp_requests_running") == 0)
    spent = slow.metric("clp_completion_tokens_total") - tokens0
    assert 5 <= spent < 300, spent  # 3000 asked; the loop stopped within a few forwards
    assert chat(slow, "Hello", max_tokens=4, model="slow")[0]  # the server goes on


def test_a_client_gone_mid_request_stops_its_generation(slow):
    """A non-streamed request whose client hangs up (a client-side timeout, a killed script)."""
    cancelled = slow.metric("clp_generations_total", stop_reason="cancelled")
    answered_499 = slow.metric("clp_requests_total", status="499")
    conn = http.client.HTTPConnection(HOST, slow.port, timeout=60)
    body = {"model": "slow", "messages": MSG, "max_tokens": 3000, "temperature": 0}
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"}
    )
    wait_for(lambda: slow.metric("clp_requests_running") == 1)
    conn.close()
    wait_for(lambda: slow.metric("clp_generations_total", stop_reason="cancelled") > cancelled)
    wait_for(lambda: slow.metric("clp_requests_running") == 0)
    assert slow.metric("clp_requests_total", status="499") == answered_499 + 1


def test_a_full_queue_answers_429_and_loses_nothing(slow):
    dropped = slow.metric("clp_requests_dropped_total")

    def open_stream():
        s = slow.client.chat.completions.create(
            model="slow", messages=MSG, max_tokens=3000, temperature=0, stream=True
        )
        return s, iter(s)

    running, it = open_stream()
    while not next(it).choices[0].delta.content:  # wait until it generates
        pass
    waiting, it2 = open_stream()
    assert next(it2).choices[0].delta.role == "assistant"  # accepted, queued
    wait_for(lambda: slow.metric("clp_queue_length") == 1)
    with pytest.raises(openai.RateLimitError) as info:
        chat(slow, "Hello", max_tokens=4, model="slow")
    assert info.value.body["code"] == "queue_full"
    assert slow.metric("clp_requests_rejected_total") >= 1
    waiting.close()
    running.close()
    wait_for(lambda: slow.metric("clp_requests_dropped_total") == dropped + 1)
    wait_for(lambda: slow.metric("clp_queue_length") == 0)
    assert chat(slow, "Hello", max_tokens=4, model="slow")[0]


# ---- the command line ------------------------------------------------------------------


def test_serve_refuses_an_unknown_mode_before_loading():
    r = CliRunner().invoke(main, ["serve", "--model", "no-such-model", "--mode", "warp"])
    assert r.exit_code == 2 and "unknown mode 'warp'" in r.stderr


def test_clp_serve_starts_a_real_server(tmp_path):
    backbone = make_tiny_backbone(context=64)
    backbone.model.save_pretrained(tmp_path)
    backbone.tokenizer.save_pretrained(tmp_path)
    with socket.socket() as sock:  # a free port for the subprocess to take
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    args = ["serve", "-m", str(tmp_path), "--dtype", "fp32",  # no heads: mode ar by default
            "--port", str(port), "--api-key", KEY]  # fmt: skip
    code = "import sys; from clp.cli import main; sys.argv[0] = 'clp'; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key=KEY, max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.2)
        assert [m.id for m in models] == [str(tmp_path)]
        r = client.completions.create(model=str(tmp_path), prompt="abc", max_tokens=5)
        # a random model's text may end before max_tokens (seen once, on a loaded machine)
        n, reason = r.usage.completion_tokens, r.choices[0].finish_reason
        assert (n, reason) == (5, "length") or (n < 5 and reason == "stop")
        assert r.clp["mode"] == "ar"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert f"mode ar) on http://{HOST}:{port}/v1" in err


# ---- smollm2-135m: the real chat template, and load --------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_fp32):
    model = Model(smollm2_fp32)
    with serving(model, model_name="smollm2-135m") as s:
        yield s, model


@pytest.mark.integration
def test_smollm2_served_greedy_equals_model_generate(smol):
    s, model = smol
    prompt = "Write a Python function that adds two numbers."
    ref = model.generate(prompt, mode="verify", max_new_tokens=24)
    assert chat(s, prompt, max_tokens=24)[0] == ref.text
    text, chunks = chat(s, prompt, True, max_tokens=24)
    assert text == ref.text
    assert chunks[-1].clp["forward_passes"] == ref.stats.forward_passes
    turns = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
    ]
    ids = model.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ref = model.generate(ids, mode="verify", max_new_tokens=8)
    r = s.client.chat.completions.create(
        model="smollm2-135m", messages=turns, max_tokens=8, temperature=0
    )
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ids)


LOAD_PROMPTS = [
    "Name three planets.",
    "What is a hash table?",
    "Write a haiku about autumn.",
    "Give me a synonym for fast.",
]


async def _load(base_url: str, n: int, max_tokens: int) -> tuple[list, list, float]:
    """n concurrent streamed chats; per request (latency, text, completion tokens)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=900)

    async def one(i: int):
        start = time.perf_counter()
        stream = await client.chat.completions.create(
            model="smollm2-135m", temperature=0, max_tokens=max_tokens, stream=True,
            messages=[{"role": "user", "content": LOAD_PROMPTS[i % len(LOAD_PROMPTS)]}],
            stream_options={"include_usage": True},
        )  # fmt: skip
        text, tokens = [], 0
        async for c in stream:
            if c.choices and c.choices[0].delta.content:
                text.append(c.choices[0].delta.content)
            if c.usage:
                tokens = c.usage.completion_tokens
        return time.perf_counter() - start, "".join(text), tokens

    start = time.perf_counter()
    try:
        outcomes = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    finally:
        await client.close()
    wall = time.perf_counter() - start
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    return done, failed, wall


@pytest.mark.integration
def test_smollm2_load_32_concurrent_streams(smol):
    s, model = smol
    n, max_tokens = 32, 8
    refs = [model.generate(p, mode="verify", max_new_tokens=max_tokens).text for p in LOAD_PROMPTS]
    asyncio.run(_load(s.base_url, 4, max_tokens))  # warm-up: allocator, caches, threads
    rss_before = s.metric("process_resident_memory_bytes")
    done, failed, wall = asyncio.run(_load(s.base_url, n, max_tokens))
    rss_after = s.metric("process_resident_memory_bytes")
    assert not failed, failed
    assert [t for _, t, _ in done] == [refs[i % len(refs)] for i in range(n)]
    latencies = sorted(lat for lat, _, _ in done)
    tokens = sum(k for _, _, k in done)
    figures = {
        "requests": n, "failures": len(failed), "max_tokens": max_tokens,
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(latencies[int(0.95 * (n - 1))], 3),
        "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2),
        "rss_before_mb": round(rss_before / 2**20, 1), "rss_after_mb": round(rss_after / 2**20, 1),
    }  # fmt: skip
    print("\nload test:", json.dumps(figures))
    assert rss_after - rss_before < 64 * 2**20, figures
    assert s.metric("clp_queue_length") == 0
    assert s.metric("clp_generations_total", stop_reason="cancelled") == 0


def test_a_server_drafting_trees_still_answers_greedy_text(tiny_model):
    prompt = "The quick brown fox"
    ref = tiny_model.generate(prompt, max_new_tokens=30)
    with serving(tiny_model, model_name="tiny", tree_nodes=6) as s:
        text, _ = chat(s, prompt, max_tokens=30)
    assert text == ref.text


def test_a_static_tree_the_heads_cannot_shape_fails_at_start(tiny_model):
    from clp.errors import ClpError

    with pytest.raises(ClpError, match="rank accuracy"):
        create_app(tiny_model, ServerConfig(tree_nodes=4, tree="static"))
