"""What a request served by `clp serve` costs against `Model.generate` for the same prompt,
and a concurrent streaming load on the server.

The server runs as a real `clp serve` subprocess on a free 127.0.0.1 port; this process
holds its own copy of the model for the direct calls, so neither side shares a GIL or an
allocator with the other. Per prompt, interleaved after a warm-up: the wall time of
`Model.generate` here, then of the same greedy request over HTTP (non-streamed and
streamed, through the official `openai` client), checked to give the same text. Then
--load concurrent streamed chats: failures, p50/p95 latency, tokens/s, the server's RSS
before and after (from its /metrics).

    nice -n 19 python benchmarks/serve_overhead.py --model smollm2-135m --dtype fp32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import openai

import clp

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain the difference between a list and a tuple in Python.",
    "What does the HTTP status code 404 mean?",
    "Write a SQL query that counts orders per customer.",
    "Give three tips for writing readable code.",
    "What is a closure in JavaScript?",
]
HOST = "127.0.0.1"


def start_server(args) -> tuple[subprocess.Popen, int]:
    """`clp serve` in a subprocess; returns once /health answers."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    code = "import sys; from clp.cli import main; sys.argv[0] = 'clp'; main()"
    options = f"-m {args.model} --dtype {args.dtype} --mode {args.mode} --port {port}"
    options += f" --max-queue {max(64, args.load)}"
    cmd = [sys.executable, "-c", code, "serve", *options.split()]
    quiet = {
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
    }  # an access log line a request
    proc = subprocess.Popen(cmd, **quiet)
    client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="none", max_retries=0)
    deadline = time.monotonic() + 600
    while True:
        try:
            client.models.list()
            return proc, port
        except openai.APIConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; try: clp serve {options}") from None
            time.sleep(0.5)


def metric(port: int, name: str) -> float:
    """One unlabelled sample of the server's /metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


def served(client: openai.OpenAI, model: str, prompt: str, n: int, stream: bool) -> dict:
    """One greedy chat request: wall seconds, the server's decode seconds, text, first text."""
    start = time.perf_counter()
    messages = [{"role": "user", "content": prompt}]
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=n, temperature=0, stream=stream
    )
    if not stream:
        wall = time.perf_counter() - start
        return {"wall": wall, "decode": r.clp["seconds"], "text": r.choices[0].message.content}
    text, first, decode = [], None, None
    for c in r:
        if c.choices and c.choices[0].delta.content:
            first = first or time.perf_counter() - start
            text.append(c.choices[0].delta.content)
        if getattr(c, "clp", None):
            decode = c.clp["seconds"]
    wall = time.perf_counter() - start
    return {"wall": wall, "decode": decode, "text": "".join(text), "first": first}


def direct(model: clp.Model, prompt: str, mode: str, n: int) -> dict:
    """The same request as a ``Model.generate`` call in this process."""
    start = time.perf_counter()
    r = model.generate(prompt, mode=mode, max_new_tokens=n)
    return {"wall": time.perf_counter() - start, "decode": r.stats.seconds, "text": r.text}


def overhead(args, model: clp.Model, client: openai.OpenAI) -> dict:
    """Direct and served requests, prompt by prompt, the order rotated each round. Besides
    wall times (which a busy machine blurs), the cost of serving proper: wall minus the decode
    seconds each side measured itself (HTTP, JSON, queueing, template, thread hand-offs)."""
    prompts = PROMPTS[: args.n]
    for p in prompts[:2]:  # warm-up both sides at full length
        direct(model, p, args.mode, args.max_tokens)
        served(client, args.model, p, args.max_tokens, False)
    runs: dict[str, list[dict]] = {"direct": [], "served": [], "served_stream": []}
    refs: dict[str, str] = {}
    for rnd in range(args.rounds):
        for i, p in enumerate(prompts):
            ways = ["direct", "served", "served_stream"]
            shift = (i + rnd) % 3
            for way in ways[shift:] + ways[:shift]:
                if way == "direct":
                    run = direct(model, p, args.mode, args.max_tokens)
                    refs[p] = run["text"]
                else:
                    run = served(client, args.model, p, args.max_tokens, way == "served_stream")
                runs[way].append(run | {"prompt": p})

    def median(way: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[way])

    def extra_ms(way: str) -> float:
        return round(1000 * statistics.median(r["wall"] - r["decode"] for r in runs[way]), 2)

    out = {f"{way}_wall_s": round(median(way, "wall"), 4) for way in runs}
    out |= {f"{way}_decode_s": round(median(way, "decode"), 4) for way in runs}
    out |= {f"{way}_outside_decode_ms": extra_ms(way) for way in runs}
    out |= {
        "serving_cost_ms": round(extra_ms("served") - extra_ms("direct"), 2),
        "serving_cost_stream_ms": round(extra_ms("served_stream") - extra_ms("direct"), 2),
        "time_to_first_text_s": round(median("served_stream", "first"), 4),
        "text_mismatches": sum(
            r["text"] != refs[r["prompt"]] for way in ("served", "served_stream") for r in runs[way]
        ),
        "requests_each": len(runs["direct"]),
    }
    return out


async def load(base_url: str, model: str, n: int, max_tokens: int) -> dict:
    """n concurrent streamed chats; what a load balancer would look at."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=900)

    async def one(i: int):
        start = time.perf_counter()
        stream = await client.chat.completions.create(
            model=model, temperature=0, max_tokens=max_tokens, stream=True,
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            stream_options={"include_usage": True},
        )  # fmt: skip
        tokens = 0
        async for c in stream:
            if c.usage:
                tokens = c.usage.completion_tokens
        return time.perf_counter() - start, tokens

    start = time.perf_counter()
    outcomes = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    wall = time.perf_counter() - start
    await client.close()
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    lat = sorted(s for s, _ in done)
    return {
        "requests": n,
        "failures": n - len(done),
        "max_tokens": max_tokens,
        "p50_latency_s": round(statistics.median(lat), 3) if lat else None,
        "p95_latency_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None,
        "tokens_per_second": round(sum(k for _, k in done) / wall, 2),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--mode", default="verify")
    ap.add_argument("--n", type=int, default=4, help=f"prompts (at most {len(PROMPTS)})")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--load", type=int, default=32, help="concurrent streams (0: none)")
    ap.add_argument("--load-max-tokens", type=int, default=16)
    args = ap.parse_args()

    model = clp.load(args.model, args.dtype)
    proc, port = start_server(args)
    base_url = f"http://{HOST}:{port}/v1"
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=900)
    try:
        result = {"model": args.model, "dtype": args.dtype, "mode": args.mode,
                  "max_tokens": args.max_tokens}  # fmt: skip
        result["overhead"] = overhead(args, model, client)
        if args.load:
            rss_before = metric(port, "process_resident_memory_bytes")
            result["load"] = asyncio.run(
                load(base_url, args.model, args.load, args.load_max_tokens)
            )
            rss_after = metric(port, "process_resident_memory_bytes")
            result["load"] |= {
                "server_rss_before_mb": round(rss_before / 2**20, 1),
                "server_rss_after_mb": round(rss_after / 2**20, 1),
            }
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=60)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
