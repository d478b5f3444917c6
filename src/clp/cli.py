"""The ``clp`` command. Every user error ends as one line on stderr and exit code 2."""

from __future__ import annotations

import json
import sys

import click

from clp.backbones import BUNDLED, DEFAULT_MODEL, cached_dir, is_cached, is_installed
from clp.errors import ClpError


class _Group(click.Group):
    """Turns ClpError (and Ctrl-C) into a one-line message instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ClpError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


MODEL = click.option(
    "--model",
    "-m",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Bundled backbone name, local directory or Hugging Face id.",
)
DTYPE = click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="bf16 or fp32; auto picks bf16 where the CPU computes it natively.",
)
RUNTIME = click.option(
    "--runtime",
    type=click.Choice(["auto", "cpu", "transformers", "llama.cpp"]),
    default="auto",
    show_default=True,
    help="What runs the backbone under the decode loop. auto: cpu (a static-cache decoder on "
    "torch's int4 kernels, the fastest here) for llama and qwen2 models, else transformers; "
    "llama.cpp (bundled backbones, a bf16 GGUF) needs pip install 'clp-mtp[llama]'.",
)
WEIGHTS = click.option(
    "--weights",
    type=click.Choice(["q4", "q8", "bf16"]),
    default="q4",
    show_default=True,
    help="cpu runtime weight format. q4: int4 groups of 32 (the GGUF's 4-bit blocks as they "
    "are, others quantized to 4 bits); q8: 4-bit blocks as they are, the rest int8; bf16.",
)
HEADS = click.option(
    "--heads", default=None, help="Trained heads folder (default: committed artifacts)."
)

TREE_NODES = click.option(
    "--tree-nodes",
    default=0,
    show_default=True,
    type=int,
    help="verify: draft a tree of N nodes (up to 15) checked in one forward, the heads' "
    "likeliest branches plus the lookup span; 0: one chain.",
)
TREE = click.option(
    "--tree",
    type=click.Choice(["dynamic", "static"]),
    default="dynamic",
    show_default=True,
    help="verify with --tree-nodes: grow the tree each step from the heads' probabilities, "
    "or use one static shape chosen from their held-out rank accuracy.",
)


@click.group(cls=_Group)
@click.version_option(package_name="clp-mtp")
def main() -> None:
    """Faster decoding with multi-token prediction heads and the CLP length predictor."""


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# Modes that keep draft tokens no backbone forward confirmed (task accuracy drops: docs/tasks.md).
UNVERIFIED = ("mtp", "gate", "clp", "clp+", "competing")


@main.command()
@click.argument("prompt")
@MODEL
@DTYPE
@RUNTIME
@WEIGHTS
@click.option(
    "--mode",
    default=None,
    help="Default: verify, the fastest lossless mode (output identical to ar greedy), where the "
    "backbone has trained heads, else ar. Lossless too: ar (plain decoding) and lookup (prompt "
    "lookup, verified). Unverified, may change answers: mtp, gate, clp, clp+, competing.",
)
@click.option(
    "--tau",
    default=None,
    type=float,
    help="clp/clp+: accept while P(L* >= l) >= tau; the default, > 1, accepts none (every "
    "tau that accepts drafts changed answers on HumanEval; the paper uses 0.8). verify: send "
    "only what the clp predictor accepts at this tau.",
)
@click.option(
    "--lookup",
    default=None,
    type=int,
    help="verify: when the last two tokens occurred before, draft the N tokens that followed "
    "them instead of the heads' proposals (default 4; 0: always the heads').",
)
@click.option(
    "--min-prob",
    default=None,
    type=float,
    help="verify: send a head's draft only while the heads give the chain of drafts up to it "
    "at least this probability (default 0.1; 0: always all of them).",
)
@TREE_NODES
@TREE
@HEADS
@click.option("--max-new-tokens", "-n", default=128, show_default=True, type=int)
@click.option(
    "--temperature", "-t", default=0.0, show_default=True, type=float, help="0 means greedy."
)
@click.option("--top-k", default=0, type=int, help="Sample among the k likeliest tokens.")
@click.option("--top-p", default=1.0, type=float, help="Nucleus sampling threshold.")
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
def generate(
    prompt,
    model,
    dtype,
    runtime,
    weights,
    mode,
    tau,
    lookup,
    min_prob,
    tree_nodes,
    tree,
    heads,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    stop,
    raw,
    as_json,
) -> None:
    """Generate a reply to PROMPT, streaming it as it becomes final."""
    from clp.api import MODES, load

    if not prompt.strip():
        raise ClpError("the prompt is empty")
    if max_new_tokens <= 0:
        raise ClpError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if mode is not None and mode not in MODES:
        raise ClpError(f"unknown mode '{mode}'; available: {', '.join(MODES)}")
    if mode in UNVERIFIED:
        click.echo(
            f"warning: mode {mode} is unverified: it keeps draft tokens the backbone never "
            "checked, so its output may differ from ar's and change answers "
            "(--mode verify is lossless)",
            err=True,
        )
    if mode in ("clp", "clp+") and tau is None:
        click.echo(
            f"note: {mode} accepts no drafts at its default tau (> 1): every tau that accepts "
            "drafts cost task accuracy on HumanEval (docs/tasks.md); pass --tau, e.g. 0.8",
            err=True,
        )
    _quiet_transformers()
    m = load(model, dtype, heads, runtime, weights)
    mode = mode or m.default_mode

    def stream(text: str) -> None:
        click.echo(text, nl=False)

    result = m.generate(
        prompt,
        mode=mode,
        tau=tau,
        lookup=lookup,
        min_prob=min_prob,
        tree_nodes=tree_nodes,
        tree=tree,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=list(stop),
        raw=raw,
        on_text=None if as_json else stream,
    )
    s = result.stats
    if as_json:
        click.echo(
            json.dumps(
                {
                    "text": result.text,
                    "token_ids": result.token_ids,
                    "model": model,
                    "mode": mode,
                    "stop_reason": result.stop_reason,
                    **s.as_dict(),
                }
            )
        )
    else:
        click.echo()
        click.echo(
            f"[{s.new_tokens} tokens, {s.forward_passes} forwards, "
            f"{s.tokens_per_forward:.2f} tokens/forward, {s.tokens_per_second:.1f} tok/s, "
            f"stop: {result.stop_reason}]",
            err=True,
        )


@main.command()
def models() -> None:
    """List the bundled backbones: installed or not, converted or not."""
    click.echo(f"{'name':<20} {'installed':<10} {'cached':<7} {'size':>8}  architecture")
    for spec in BUNDLED.values():
        click.echo(
            f"{spec.name:<20} {'yes' if is_installed(spec) else 'no':<10} "
            f"{'yes' if is_cached(spec.name) else 'no':<7} {spec.size_mb:>5} MB  "
            f"{spec.architecture}"
        )
    click.echo(f"\nconverted copies live in {cached_dir('x').parent}")
    missing = [s for s in BUNDLED.values() if not is_installed(s)]
    for spec in missing:
        click.echo(f"to install {spec.name}: {spec.pip_install_line()}")


SMOKE = {  # the whole benchmark, small: smollm2-135m, every mode, baselines and both sweeps
    "model": "smollm2-135m",
    "modes": "ar,mtp,gate,clp,clp+,verify,competing,lookup,hf-generate,prompt-lookup,llama.cpp",
    "prompts": "mtbench",
    "n": 3,
    "max_new_tokens": 24,
    "taus": "0.5,0.9",
    "ks": "1,2",
    "lookups": "0",
}


def _numbers(text: str, kind: type) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ClpError(f"expected comma-separated numbers, got '{text}'") from exc


@main.command()
@MODEL
@DTYPE
@RUNTIME
@WEIGHTS
@HEADS
@click.option(
    "--modes",
    default="ar,mtp,gate,clp,clp+,verify,competing,lookup,hf-generate,prompt-lookup",
    show_default=True,
    help="Decoding modes (lookup: prompt-lookup decoding on our loop and runtime), and the "
    "baselines hf-generate (transformers greedy) and prompt-lookup (transformers' own).",
)
@click.option(
    "--prompts",
    default="mtbench",
    show_default=True,
    help="mtbench (first turns), sharegpt (held-out first turns), a .txt/.jsonl file, or a "
    "task suite whose outputs are scored: humaneval (alias code: unit tests in a sandbox) or "
    "gsm8k (alias math: exact final number); see docs/tasks.md.",
)
@click.option("--n", default=None, type=int, help="Use the first N prompts (default: all).")
@click.option(
    "--every",
    default=1,
    show_default=True,
    type=int,
    help="Take every K-th prompt first (e.g. --every 5 --n 16: two per MT-Bench category).",
)
@click.option(
    "--skip",
    default=0,
    show_default=True,
    type=int,
    help="Leave out the first N prompts (a run disjoint from an earlier one's).",
)
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option(
    "--tau",
    default=None,
    type=float,
    help="tau of clp / clp+ (default > 1: no drafts accepted; the paper's is 0.8).",
)
@click.option(
    "--taus",
    default="",
    help="tau sweep of clp and clp+ (and of verify: the clp predictor picks how many drafts "
    "to send), e.g. 0.5,0.7,0.9,0.95.",
)
@click.option(
    "--ks",
    default="",
    help="k sweep of mtp and verify, e.g. 1,2,3,4: the heads truncated to their first k "
    "(needs heads trained with k >= the largest).",
)
@click.option(
    "--lookups",
    default="",
    help="Sweep of verify's lookup drafts, e.g. 0,2: when the last two tokens occurred before, "
    "that many tokens that followed them are the drafts instead of the heads' (0: always the "
    "heads'; default 4).",
)
@click.option(
    "--min-probs",
    default="",
    help="Sweep of verify's minimum chain probability of a head's draft, e.g. 0,0.1 (0: all "
    "k drafts every step; default 0.1).",
)
@click.option(
    "--trees",
    default="",
    help="Sweep of verify's draft tree, in nodes, e.g. 0,4,8,15 (0: the chain, plain verify): "
    "tokens per forward, ms per forward and speed per budget, and the fastest here.",
)
@click.option(
    "--tree-shapes",
    default="dynamic",
    show_default=True,
    help="Tree shapes the --trees sweep runs: dynamic, static or both (dynamic,static).",
)
@click.option(
    "--lookup-tokens",
    default=3,
    show_default=True,
    type=int,
    help="Draft tokens of prompt lookup: the lookup mode and the prompt-lookup baseline "
    "(transformers' prompt_lookup_num_tokens).",
)
@click.option("--rounds", default=1, show_default=True, type=int)
@click.option("--no-nll", is_flag=True, help="Skip the backbone NLL of each output.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option(
    "--report",
    is_flag=True,
    help="Only rebuild results and plots from what OUT holds (same settings; e.g. a cut-off run).",
)
@click.option(
    "--smoke",
    is_flag=True,
    help="Small run of everything on smollm2-135m (3 prompts, 24 tokens, both sweeps).",
)
@click.option(
    "--out",
    required=True,
    help="Folder for results.json, results.md, plots and runs.jsonl (resumes a cut-off run; "
    "create OUT/PAUSE to pause between prompts).",
)
def bench(**o) -> None:
    """Speed and quality of each mode side by side, in one process, interleaved."""
    from clp import bench as bench_mod
    from clp.api import load

    if o.pop("smoke"):
        o.update(SMOKE)
    _quiet_transformers()
    model = load(o["model"], o["dtype"], o["heads"], o["runtime"], o["weights"])
    modes = [m for m in o["modes"].split(",") if m]
    ks = _numbers(o["ks"], int)
    heads_k = model.heads().config.k if ks else None
    chosen = bench_mod.variants(
        modes,
        o["tau"],
        _numbers(o["taus"], float),
        ks,
        heads_k,
        _numbers(o["lookups"], int),
        _numbers(o["trees"], int),
        [x for x in o["tree_shapes"].split(",") if x],
        _numbers(o["min_probs"], float),
    )
    docs = bench_mod.load_prompts(o["prompts"], o["n"], o["every"], o["skip"])
    result = bench_mod.run(
        model,
        chosen,
        docs,
        o["max_new_tokens"],
        o["out"],
        rounds=o["rounds"],
        nll=not o["no_nll"],
        lookup_tokens=o["lookup_tokens"],
        log=lambda m: click.echo(m, err=True),
        report_only=o["report"],
        every=o["every"],
        skip=o["skip"],
    )
    files = bench_mod.save(result, o["out"], plots=not o["no_plots"])
    click.echo(bench_mod.markdown(result))
    click.echo("written: " + ", ".join(str(f) for f in files), err=True)


DEMO_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain what a hash table is in two sentences.",
    "List three uses of the Linux command grep.",
]


@main.command()
@MODEL
@DTYPE
@RUNTIME
@WEIGHTS
@click.option("--max-new-tokens", "-n", default=64, show_default=True, type=int)
def demo(model, dtype, runtime, weights, max_new_tokens) -> None:
    """A few prompts through ar and verify, and through llama.cpp's plain greedy decoding of
    the same packaged GGUF (what a CPU user runs instead): the text, then each one's speed."""
    import importlib.util

    from clp.api import load
    from clp.backbones import BUNDLED
    from clp.prompts import encode_prompt

    _quiet_transformers()
    m = load(model, dtype, runtime=runtime, weights=weights)
    runs = {"ar": None}
    if m.heads_dir:
        runs["verify"] = None
    else:
        click.echo(f"(no trained heads for {model}: showing ar only)", err=True)
    if model in BUNDLED and importlib.util.find_spec("llama_cpp"):
        from clp.llama_runtime import LlamaCppGreedy

        llama = LlamaCppGreedy(model, min(m.backbone.context_length, 4096))
        eos = m.backbone.eos_token_ids
        runs["llama.cpp"] = lambda ids, n: llama(ids, n, eos)

    def once(name: str, prompt: str, n: int) -> tuple[list[int], str, float, int]:
        if runs[name] is None:
            r = m.generate(prompt, mode=name, max_new_tokens=n)
            return r.token_ids, r.text, r.stats.seconds, r.stats.forward_passes
        out = runs[name](encode_prompt(m.tokenizer, prompt), n)
        text = m.tokenizer.decode(out["ids"], skip_special_tokens=True)
        return out["ids"], text, out["seconds"], out["forward_passes"]

    for name in runs:  # warm-up: compilation, allocation
        once(name, DEMO_PROMPTS[0], 8)
    shown = "verify" if "verify" in runs else "ar"
    totals = {name: [0, 0.0, 0, 0] for name in runs}  # tokens, seconds, forwards, same as ar
    for prompt in DEMO_PROMPTS:
        click.echo(f"\n>>> {prompt}")
        reference = None
        for name in runs:
            ids, text, seconds, forwards = once(name, prompt, max_new_tokens)
            reference = reference or ids
            for i, value in enumerate((len(ids), seconds, forwards, ids == reference)):
                totals[name][i] += value
            if name == shown:
                click.echo(f"[{name}] {text.strip()}")
    rate = {name: tokens / seconds for name, (tokens, seconds, _, _) in totals.items()}
    click.echo(
        f"\n{model} ({m.backbone.dtype}, runtime {m.runtime_name}), {len(DEMO_PROMPTS)} prompts, "
        f"{max_new_tokens} new tokens, measured in this run:"
    )
    for name, (tokens, _, forwards, same) in totals.items():
        vs = f"  {rate[name] / rate['llama.cpp']:.2f}x llama.cpp" if "llama.cpp" in rate else ""
        click.echo(
            f"  {name:<9} {rate[name]:6.1f} tok/s  {rate[name] / rate['ar']:.2f}x ar{vs}  "
            f"{tokens / forwards:.2f} tokens/forward  identical to ar {same}/{len(DEMO_PROMPTS)}"
        )
    if "llama.cpp" in rate:
        click.echo(llama_cpp_verdict(rate, model))


def llama_cpp_verdict(rate: dict[str, float], model: str) -> str:
    """One plain line: is the fastest of our modes faster than llama.cpp alone, here?"""
    ours = max((n for n in rate if n != "llama.cpp"), key=rate.get)
    ratio = rate[ours] / rate["llama.cpp"]
    if ratio >= 1:
        return f"On this machine {ours} ran {ratio:.2f}x llama.cpp's plain greedy decoding."
    return (
        f"On this machine llama.cpp's plain greedy decoding ran faster than {ours} "
        f"({1 / ratio:.2f}x): for {model} here, llama.cpp alone is the faster choice."
    )


@main.command()
@MODEL
@DTYPE
@RUNTIME
@WEIGHTS
@HEADS
@click.option(
    "--mode",
    default=None,
    help="Decoding mode of requests that set none (a request may set its own `mode` and `tau` "
    "as extra body fields). Default: verify (lossless) where the backbone has trained heads, "
    "else ar.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--api-key",
    default=None,
    envvar="CLP_API_KEY",
    help="Require 'Authorization: Bearer KEY' on /v1/* (or set CLP_API_KEY).",
)
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=int,
    help="Requests that may wait for the backbone; more are refused with 429.",
)
@TREE_NODES
@TREE
@click.option(
    "--default-max-tokens",
    default=512,
    show_default=True,
    type=int,
    help="New tokens of a request that sets no max_tokens (capped by the context).",
)
def serve(
    model,
    dtype,
    runtime,
    weights,
    heads,
    mode,
    host,
    port,
    api_key,
    max_queue,
    tree_nodes,
    tree,
    default_max_tokens,
) -> None:
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics) decoding with MODE; see docs/server.md."""
    from clp.api import load
    from clp.serve import ServerConfig, run
    from clp.serve.engine import on_torch_thread

    config = ServerConfig(
        model_name=model,
        mode=mode,
        api_key=api_key,
        max_queue=max_queue,
        default_max_tokens=default_max_tokens,
        tree_nodes=tree_nodes,
        tree=tree,
    )
    config.validate()  # before the minutes a load may take
    _quiet_transformers()
    m = on_torch_thread(load, model, dtype, heads, runtime, weights)  # why: serve.engine
    config.mode = mode or m.default_mode
    click.echo(
        f"serving {model} ({m.backbone.dtype}, {m.runtime_name}, mode {config.mode}) on "
        f"http://{host}:{port}/v1",
        err=True,
    )
    run(m, config, host=host, port=port)


@main.group()
def train() -> None:
    """Train MTP heads and the predictors that decide how many of their proposals to accept."""


@train.command("heads")
@MODEL
@click.option(
    "--data",
    default="sharegpt,stdlib",
    show_default=True,
    help="Comma-separated sources: sharegpt, stdlib, or .txt/.jsonl files.",
)
@click.option(
    "--data-mode",
    type=click.Choice(["distill", "text"]),
    default="distill",
    show_default=True,
    help="Training split only. distill: the backbone's own greedy answers; text: the real "
    "replies (held-out and calib are always self-distilled).",
)
@click.option("--arch", default="chain", show_default=True, help="chain, medusa or competing.")
@click.option("--k", default=2, show_default=True, type=int, help="Horizon: heads 1..k.")
@click.option("--layers", default=1, show_default=True, type=int, help="Blocks per head.")
@click.option(
    "--mlp-ratio",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.125),
    help="Width of a chain head's MLP over the hidden size: a chain head holds (2 + 2 x this) "
    "d^2 parameters, so wide backbones may want a smaller one to keep the saved heads small.",
)
@click.option(
    "--draft-vocab",
    default=16384,
    show_default=True,
    type=int,
    help="Most frequent tokens the heads may propose; 0 = the full vocabulary.",
)
@click.option("--train-docs", default=2000, show_default=True, type=int)
@click.option(
    "--train-tokens",
    default=0,
    show_default=True,
    type=int,
    help="Train on the leading whole documents holding at most this many tokens (0: all); "
    "compares data modes at equal tokens without rebuilding caches.",
)
@click.option(
    "--heldout-docs", default=96, show_default=True, type=int, help="Documents for evaluation only."
)
@click.option(
    "--calib-docs",
    default=320,
    show_default=True,
    type=int,
    help="Documents for predictor labels (never seen by the heads).",
)
@click.option(
    "--max-new-tokens",
    default=256,
    show_default=True,
    type=int,
    help="Length cap of self-distilled answers.",
)
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=int,
    help="Prompts generated together during self-distillation.",
)
@click.option("--epochs", default=4.0, show_default=True, type=float)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option(
    "--feature-loss",
    default=10.0,
    show_default=True,
    type=float,
    help="Weight of EAGLE-style regression of each head's state onto the backbone's hidden "
    "state (0: token cross-entropy only). On qwen 0.5b it raised chained n+3 accuracy by "
    "1.6 points at equal data (artifacts/README.md).",
)
@click.option("--cache", default=None, help="Feature cache folder (default under $CLP_HOME).")
@click.option("--out", required=True, help="Where to save the heads.")
@click.option(
    "--init",
    default=None,
    help="Start from these saved heads (same --arch/--k/--layers/--mlp-ratio/--draft-vocab) "
    "instead of random ones, e.g. to fine-tune text-trained heads on self-distilled data or "
    "to go on with more of it; the draft vocabulary is taken anew from the training data.",
)
@click.option(
    "--distill-runtime",
    type=click.Choice(["transformers", "llama.cpp"]),
    default="transformers",
    show_default=True,
    help="Where the backbone generates its self-distilled answers: llama.cpp (bf16 GGUF, "
    "continuous batching) is the fastest on CPUs, most of all without native bf16; its "
    "caches are kept apart.",
)
@click.option(
    "--features-only",
    is_flag=True,
    help="Build (or extend) the feature caches and stop; training later reuses them.",
)
def train_heads_cmd(data, **options) -> None:
    """Self-distil (or read) data, cache features, train heads, report held-out accuracy."""
    from clp.pipeline import train_heads_pipeline

    _quiet_transformers()
    report = train_heads_pipeline(
        sources=[s for s in data.split(",") if s], **options, log=lambda m: click.echo(m, err=True)
    )
    click.echo(json.dumps(report, indent=1))


@train.command("evaluate")
@click.argument("heads_dir")
@click.option(
    "--max-new-tokens",
    default=None,
    type=int,
    help="Length cap of the held-out split's self-distilled answers, if the heads do not "
    "record it (rebuilding a lost cache).",
)
def train_evaluate_cmd(heads_dir, max_new_tokens) -> None:
    """Evaluate saved heads on their held-out split again and record the report (rank
    accuracy included) in their config.json."""
    from clp.pipeline import evaluate_heads_pipeline

    _quiet_transformers()
    report = evaluate_heads_pipeline(
        heads_dir, max_new_tokens, log=lambda m: click.echo(m, err=True)
    )
    click.echo(json.dumps(report, indent=1))


CALIB_DOCS = click.option(
    "--calib-docs",
    type=click.IntRange(min=1),
    default=None,
    help="Train on this many calib documents, self-distilling those the heads' calib cache "
    "lacks (default: the documents it holds).",
)


@train.command("predictor")
@click.option("--heads", "heads_dir", required=True, help="Folder of trained heads.")
@click.option(
    "--kind",
    type=click.Choice(["clp", "clp+", "all"]),
    default="all",
    show_default=True,
    help="clp: the paper's linear layer on h_n; clp+: with confidences.",
)
@click.option("--balanced", is_flag=True, help="Weight classes by inverse frequency (sqrt).")
@CALIB_DOCS
def train_predictor_cmd(heads_dir, kind, balanced, calib_docs) -> None:
    """Train the CLP length predictor(s) on data the heads never saw; saved beside the heads."""
    kinds = ["clp", "clp+"] if kind == "all" else [kind]
    _train_predictors(heads_dir, kinds, balanced, calib_docs)


@train.command("gate")
@click.option("--heads", "heads_dir", required=True, help="Folder of trained heads.")
@CALIB_DOCS
def train_gate_cmd(heads_dir, calib_docs) -> None:
    """Train the prior-work baseline: a ~1M-parameter per-position accept gate."""
    _train_predictors(heads_dir, ["gate"], False, calib_docs)


def _train_predictors(
    heads_dir: str, kinds: list[str], balanced: bool, calib_docs: int | None
) -> None:
    from clp.pipeline import train_predictors_pipeline

    _quiet_transformers()
    results = train_predictors_pipeline(
        heads_dir, kinds, balanced, calib_docs, log=lambda m: click.echo(m, err=True)
    )
    for kind, r in results.items():
        click.echo(
            f"\n== {kind}: {r['parameters']:,} parameters, trained on {r['train_rows']:,} "
            f"rows, evaluated on {r['rows']:,} held-out rows"
        )
        click.echo(f"label distribution L*=0..k: {r['label_distribution']}")
        if "accuracy" in r:
            click.echo(
                f"accuracy {r['accuracy']:.3f} vs always-majority {r['majority_accuracy']:.3f}"
            )
            click.echo("confusion (rows: true L*, columns: predicted):")
            for row in r["confusion (rows: true L*, cols: predicted)"]:
                click.echo("  " + " ".join(f"{v:7d}" for v in row))
        click.echo(f"{'tau':>6} {'mean accepted':>14} {'wrong share':>12}")
        for tau, v in r["by_tau"].items():
            click.echo(f"{tau:>6} {v['mean_accepted']:>14.3f} {v['wrong_share']:>12.3f}")


if __name__ == "__main__":
    main()
