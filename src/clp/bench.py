"""Benchmark runs: every mode on the same prompts in one process, interleaved prompt by prompt
after a warm-up, so speedups are ratios of numbers measured side by side (docs/design.md, Metrics).

A run writes one line per prompt to ``DIR/runs.jsonl`` as it goes: an interrupted run resumes
where it stopped (same settings), and creating ``DIR/PAUSE`` pauses it between prompts, so the
machine can be borrowed without spoiling any timing.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from clp.api import DEFAULT_TAU, MODES, Model
from clp.data import Document, interleave, mtbench, user_files
from clp.errors import ClpError
from clp.metrics import (
    backbone_nll,
    common_prefix_share,
    distinct_n,
    mean,
    repetition_ratio,
    standard_error,
)
from clp.prompts import encode_prompt
from clp.runtime import stock_kernels
from clp.tasks import Grader, is_suite, paired_accuracy, suite_documents, task_for
from clp.tasks.stats import choose_tau

# What users would run instead, on the same prompts in the same process: transformers' greedy
# model.generate, its prompt-lookup decoding (drafts copied from the prompt, verified), and
# llama.cpp's plain greedy decoding of the packaged GGUF (what a CPU user runs).
BASELINES = ("hf-generate", "prompt-lookup", "llama.cpp")
LLAMA_CPP = "llama.cpp"


@dataclass(frozen=True)
class Variant:
    """One timed configuration: a mode (or baseline) with its tau and horizon k."""

    name: str
    mode: str
    tau: float | None = None
    k: int | None = None  # heads truncated to their first k (None: all of them)
    lookup: int | None = None  # verify's lookup drafts (None: the default)
    tree_nodes: int | None = None  # verify's draft tree (None: a chain)
    tree: str | None = None  # its shape: dynamic or static
    min_prob: float | None = None  # verify's cut of unlikely head drafts (None: the default)

    def settings(self) -> dict:
        """As run.json records it (the later fields only when set: a run without them
        resumes from a folder written before they existed)."""
        d = asdict(self)
        later = ("tree_nodes", "tree", "min_prob")
        return {k: v for k, v in d.items() if v is not None or k not in later}


def variants(
    modes: list[str],
    tau: float | None = None,
    taus=(),
    ks=(),
    heads_k: int | None = None,
    lookups=(),
    trees=(),
    tree_shapes=("dynamic",),
    min_probs=(),
) -> list[Variant]:
    """``ar`` first, then each mode at the main tau; then the tau sweep of ``clp`` / ``clp+``
    (and of ``verify``, where the clp predictor decides how many drafts to send), the k
    sweep of ``mtp`` / ``verify`` (heads truncated), the sweeps of ``verify``'s lookup
    drafts, of its drafts' minimum chain probability and of its draft tree's node budget
    (0: the chain, plain ``verify``) per tree shape, each under its own name."""
    bad = [m for m in modes if m not in MODES and m not in BASELINES]
    if bad:
        raise ClpError(
            f"unknown mode(s) {', '.join(bad)}; available: {', '.join(MODES + BASELINES)}"
        )
    main_tau = DEFAULT_TAU if tau is None else tau
    out = [Variant("ar", "ar")]
    for m in modes:
        if m != "ar":
            out.append(Variant(m, m, main_tau if m in ("clp", "clp+") else None))
    for t in taus:
        out += [Variant(f"{m}@tau={t:g}", m, t) for m in ("clp", "clp+", "verify") if m in modes]
    for k in ks:
        if k != heads_k:
            out += [Variant(f"{m}@k={k}", m, k=k) for m in ("mtp", "verify") if m in modes]
    if "verify" in modes:
        out += [Variant(f"verify@lookup={n}", "verify", lookup=n) for n in lookups]
        out += [Variant(f"verify@min-prob={p:g}", "verify", min_prob=p) for p in min_probs]
        for shape in tree_shapes:
            label = "tree" if shape == "dynamic" else f"{shape}-tree"
            out += [
                Variant(f"verify@{label}={n}", "verify", tree_nodes=n, tree=shape)
                for n in trees
                if n
            ]
    seen: set = set()
    unique = []
    for v in out:
        key = (v.mode, v.tau, v.k, v.lookup, v.tree_nodes, v.tree, v.min_prob)
        if key not in seen:
            seen.add(key)
            unique.append(v)
    return unique


def load_prompts(source: str, n: int | None, every: int = 1, skip: int = 0) -> list[Document]:
    """The first ``n`` prompts of ``source``, or of every ``every``-th one (a subset spread
    over MT-Bench's categories, which come in blocks of ten), after the first ``skip`` (so
    a later run can take prompts disjoint from an earlier one's)."""
    if every < 1:
        raise ClpError(f"--every must be >= 1, got {every}")
    if skip < 0:
        raise ClpError(f"--skip must be >= 0, got {skip}")
    if source == "mtbench":
        docs = mtbench()
    elif source == "sharegpt":
        docs = interleave(["sharegpt"], "heldout", n and skip + n * every)
    elif is_suite(source):  # task suites: every output is scored (clp.tasks)
        docs = suite_documents(source)
    else:
        docs = list(user_files(source))
    docs = docs[skip:][::every]
    if not docs:
        raise ClpError(f"no prompts in {source}" + (f" after the first {skip}" if skip else ""))
    return docs[:n] if n else docs


@torch.inference_mode()
def hf_generate(
    model: Model, ids: list[int], max_new_tokens: int, lookup: int, stop: tuple[str, ...] = ()
) -> dict:
    """transformers' own generate (greedy, or prompt lookup when ``lookup`` > 0), timed, with
    its forward passes counted by a hook."""
    b = model.backbone
    calls = [0]
    hook = b.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    done = _stop_check(b.tokenizer, stop)
    if done:
        from transformers import StoppingCriteriaList

        def stopped(seqs: torch.Tensor, scores) -> torch.Tensor:
            return torch.tensor([done(seqs[0, len(ids) :].tolist())])

        extra["stopping_criteria"] = StoppingCriteriaList([stopped])
    try:
        with stock_kernels(b.model):
            start = time.perf_counter()
            out = b.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(b.eos_token_ids),
                pad_token_id=b.tokenizer.pad_token_id or 0,
                **extra,
            )
            seconds = time.perf_counter() - start
    finally:
        hook.remove()
    new = out[0, len(ids) :].tolist()
    return {"ids": new, "new_tokens": len(new), "seconds": seconds, "forward_passes": calls[0]}


def run_one(
    model: Model,
    v: Variant,
    ids: list[int],
    max_new_tokens: int,
    lookup: int,
    stop: tuple[str, ...] = (),
) -> dict:
    """Generate once with variant ``v`` (ending at any of ``stop``, as a task suite asks);
    the record the summary is computed from."""
    if v.mode == "hf-generate":
        return hf_generate(model, ids, max_new_tokens, 0, stop)
    if v.mode == "prompt-lookup":
        return hf_generate(model, ids, max_new_tokens, lookup, stop)
    if v.mode == LLAMA_CPP:
        done = _stop_check(model.tokenizer, stop)
        return _llama_cpp(model)(ids, max_new_tokens, model.backbone.eos_token_ids, done)
    k = lookup if v.mode == "lookup" else v.k
    res = model.generate(
        ids,
        mode=v.mode,
        tau=v.tau,
        k=k,
        lookup=v.lookup,
        tree_nodes=v.tree_nodes or 0,
        tree=v.tree or "dynamic",
        min_prob=v.min_prob,
        max_new_tokens=max_new_tokens,
        stop=list(stop),
    )
    s = res.stats
    return {
        "ids": res.token_ids,
        "new_tokens": s.new_tokens,
        "seconds": s.seconds,
        "policy_seconds": s.policy_seconds,
        "forward_passes": s.forward_passes,
        "accepted_lengths": {str(j): c for j, c in sorted(s.accepted_lengths.items())},
        "offset_proposed": {str(j): c for j, c in sorted(s.offset_proposed.items())},
        "offset_accepted": {str(j): c for j, c in sorted(s.offset_accepted.items())},
    }


def _stop_check(tokenizer, stop: tuple[str, ...]) -> Callable[[list[int]], bool] | None:
    """For the external baselines: whether an output's text holds one of ``stop``."""
    if not stop:
        return None
    return lambda out: any(s in tokenizer.decode(out, skip_special_tokens=True) for s in stop)


def _llama_cpp(model: Model):
    """The llama.cpp baseline of ``model``'s backbone, loaded once and kept beside it."""
    if not hasattr(model, "_llama_cpp_greedy"):
        from clp.llama_runtime import LlamaCppGreedy

        context = min(model.backbone.context_length, 8192)
        model._llama_cpp_greedy = LlamaCppGreedy(model.backbone.name, context)
    return model._llama_cpp_greedy


class _Scorer:
    """Backbone NLL of outputs, in fp32 (exact, and the same whatever dtype was timed); an
    output identical to one already scored is not scored again."""

    def __init__(self, model: Model):
        b = model.backbone
        if b.dtype == torch.float32:
            self.backbone = b
        else:
            from clp.backbones import load_backbone

            self.backbone = load_backbone(b.name, "fp32")
        self.memo: dict[tuple, float] = {}

    def __call__(self, prompt: list[int], output: list[int]) -> float:
        key = (tuple(prompt), tuple(output))
        if key not in self.memo:
            self.memo[key] = round(backbone_nll(self.backbone, prompt, output), 5)
        return self.memo[key]


def run(
    model: Model,
    chosen: list[Variant],
    prompts: list[Document],
    max_new_tokens: int,
    out: str | Path,
    rounds: int = 1,
    nll: bool = True,
    lookup_tokens: int = 3,
    progress: bool = True,
    log: Callable[[str], None] = print,
    report_only: bool = False,
    every: int = 1,
    skip: int = 0,
) -> dict:
    """Time every variant on every prompt (rotating their order), resuming from ``out``;
    ``report_only`` summarises what ``out`` holds without running anything."""
    if max_new_tokens <= 0:
        raise ClpError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if chosen[0].mode != "ar":
        raise ClpError("the first variant must be ar: every speedup is against it")
    for v in chosen:  # fail early on missing or mismatched artifacts, before any timing
        if v.mode not in BASELINES:
            model.policy(
                v.mode, v.tau, v.k, v.lookup, v.tree_nodes or 0, v.tree or "dynamic", v.min_prob
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    b = model.backbone
    settings = {
        "model": b.name,
        "dtype": str(b.dtype).replace("torch.", ""),
        "runtime": model.runtime_name,
        "weights": getattr(model, "weights", None),
        "heads": _heads_id(model),
        "prompts": sorted({d.id.split(":")[0] for d in prompts}),
        "n": len(prompts),
        "max_new_tokens": max_new_tokens,
        "rounds": rounds,
        "lookup_tokens": lookup_tokens,
        "nll": nll,
        "variants": [v.settings() for v in chosen],
    }
    graded = [task_for(d.id) for d in prompts]  # task suites: scored in the sandbox, untimed
    stops = [t.stop if t else () for t in graded]
    if any(stops):  # a suite ends generation where its scored part has ended
        settings["stop"] = sorted({s for st in stops for s in st})
    if every > 1:  # which prompts: every k-th of the source
        settings["every"] = every
    if skip:  # ... after the first `skip`
        settings["skip"] = skip
    records = _resume(out, settings, log, repair=not report_only)
    if report_only:
        if not records:
            raise ClpError(f"{out} holds no finished prompts to report")
        return summarise(settings, records, prompts, _recorded_machine(out) or _UNRECORDED)
    machine = _same_machine(out, resumed=bool(records))
    encoded = [encode_prompt(model.tokenizer, d.prompt) for d in prompts]
    for v in chosen:  # warm-up: first calls pay for allocation and lazy loading
        run_one(model, v, encoded[0], 16, lookup_tokens)
    scorer = _Scorer(model) if nll else None
    grader = Grader(model.tokenizer)
    todo = [(r, i) for r in range(rounds) for i in range(len(prompts)) if (r, i) not in records]
    bar = tqdm(total=len(todo), desc="bench", unit="prompt", disable=not progress)
    with open(out / "runs.jsonl", "a") as f:
        for r, i in todo:
            while (out / "PAUSE").exists():
                time.sleep(2)
            rot = (i + r) % len(chosen)  # rotate: no variant always runs first
            runs = {}
            for v in chosen[rot:] + chosen[:rot]:
                runs[v.name] = run_one(
                    model, v, encoded[i], max_new_tokens, lookup_tokens, stops[i]
                )
            if scorer and r == 0:
                for rec in runs.values():
                    rec["nll"] = scorer(encoded[i], rec["ids"])
            if graded[i] is not None and r == 0:
                for rec in runs.values():
                    rec.update(grader(graded[i], rec["ids"]))
            records[r, i] = {"round": r, "prompt": i, "runs": runs, "peak_rss_mb": _peak_rss_mb()}
            f.write(json.dumps(records[r, i]) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
    bar.close()
    return summarise(settings, records, prompts, machine)


def _heads_id(model: Model) -> str | None:
    """Folder name and weights hash of the heads: the same artifacts resume a run from any
    checkout path."""
    if model.heads_dir is None or not (model.heads_dir / "model.safetensors").is_file():
        return None
    import hashlib

    digest = hashlib.sha256((model.heads_dir / "model.safetensors").read_bytes()).hexdigest()
    return f"{model.heads_dir.name} (sha256 {digest[:12]})"


def _resume(out: Path, settings: dict, log, repair: bool = True) -> dict[tuple[int, int], dict]:
    """Records of an earlier run with the same settings (a cut-off last line is dropped from
    the file when ``repair``; a report leaves the file alone)."""
    header, path = out / "run.json", out / "runs.jsonl"
    if header.is_file():
        if json.loads(header.read_text()) != settings:
            raise ClpError(
                f"{out} holds a benchmark run with other settings; use another --out folder"
            )
    else:
        path.unlink(missing_ok=True)
        header.write_text(json.dumps(settings, indent=1))
    records = {}
    if path.is_file():
        good, lines = [], path.read_text().splitlines()
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            records[rec["round"], rec["prompt"]] = rec
            good.append(line)
        if repair and len(good) < len(lines):
            path.write_text("".join(x + "\n" for x in good))
        if records:
            log(f"resuming: {len(records)} prompt runs already in {path}")
    return records


def _machine() -> dict:
    """What this process runs on: the facts a run's speed depends on."""
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "family_model": f"{_cpuinfo('cpu family')}/{_cpuinfo('model')}",
        "flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


_SAME = ("cpu", "family_model", "flags", "threads", "torch")  # what a resumed run must share


def _describe(m: dict) -> str:
    return f"{m['cpu']} ({m['family_model']}, {m['threads']} threads, torch {m['torch']})"


def _same_machine(out: Path, resumed: bool) -> dict:
    """The machine of the run in ``out``, recorded when it starts; resuming it elsewhere is
    refused, since speeds are compared only within one machine."""
    here, then = _machine(), _recorded_machine(out)
    if then is None:
        if resumed:  # a run from before machines were recorded
            here["note"] = "recorded when the run resumed: earlier prompts may have run elsewhere"
        (out / "machine.json").write_text(json.dumps(here, indent=1))
        return here
    if any(then.get(k) != here[k] for k in _SAME):
        raise ClpError(
            f"{out} was started on {_describe(then)} and this is {_describe(here)}: "
            "a run's speeds are compared only on one machine; use another --out folder"
        )
    return then


def _recorded_machine(out: Path) -> dict | None:
    """The machine a run in ``out`` recorded when it started (None before machines were)."""
    path = out / "machine.json"
    return json.loads(path.read_text()) if path.is_file() else None


_UNRECORDED = {"cpu": "not recorded", "threads": "?", "note": "the run predates machine.json"}


_HEADER = ("model", "dtype", "runtime", "weights", "heads", "n", "max_new_tokens", "rounds")


def summarise(settings: dict, records: dict, prompts: list[Document], machine: dict) -> dict:
    """results.json: per variant (overall and per prompt category) every measure defined in
    docs/design.md (Metrics)."""
    names = [v["name"] for v in settings["variants"]]
    per: dict[str, list[dict]] = defaultdict(list)
    for (r, i), rec in sorted(records.items()):
        for name in names:
            per[name].append({**rec["runs"][name], "round": r, "prompt": i})

    def block(idx: set[int] | None) -> dict:
        pick = {n: [x for x in per[n] if idx is None or x["prompt"] in idx] for n in names}
        ar = {x["prompt"]: x["ids"] for x in pick["ar"] if x["round"] == 0}
        summary = {n: _summarise(pick[n], ar) for n in names}
        ar_solved = _solved(pick["ar"])
        for n in names:  # task suites: share solved, paired with ar task by task
            summary[n].update(paired_accuracy(_solved(pick[n]), ar_solved))
        base = summary["ar"]
        llama = summary.get(LLAMA_CPP)
        for s in summary.values():
            tps = s["tokens_per_second"]
            s["speedup"] = round(tps / base["tokens_per_second"], 4) if tps else 0.0
            if llama and llama["tokens_per_second"]:
                s["vs_llama_cpp"] = round(tps / llama["tokens_per_second"], 4)
            s["repetition_delta"] = round(s["repetition_ratio"] - base["repetition_ratio"], 4)
        return summary

    modes = block(None)
    for v in settings["variants"]:
        modes[v["name"]]["variant"] = {
            key: v.get(key) for key in ("mode", "tau", "k", "tree_nodes", "tree")
        }
    categories = sorted({d.category for d in prompts})
    by_category = {}
    if len(categories) > 1:
        for cat in categories:
            idx = {i for i, d in enumerate(prompts) if d.category == cat}
            keep = ("tokens_per_second", "speedup", "tokens_per_forward", "repetition_ratio")
            keep += TASK_KEYS  # a suite's categories are its tune / report halves
            by_category[cat] = {n: {key: s[key] for key in keep} for n, s in block(idx).items()}
    result = {
        **{k: settings.get(k) for k in _HEADER},
        "prompts": ",".join(settings["prompts"]),
        "tau": next((v["tau"] for v in settings["variants"] if v["name"] == "clp"), None),
        "every": settings.get("every", 1),
        "skip": settings.get("skip", 0),
        "lookup_tokens": settings["lookup_tokens"],
        "stop": settings.get("stop"),
        "completed_prompts": len({i for (_, i) in records}),
        "machine": {
            **machine,
            # the running process's peak; a --report of records without it has none
            "peak_rss_mb": max((x.get("peak_rss_mb") or 0 for x in records.values()), default=0)
            or None,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "modes": modes,
        "by_category": by_category,
    }
    # task suites: the tau the unverified modes may default to (chosen on the tune half)
    result["tau_choice"] = choose_tau(result)
    if any(v.get("tree_nodes") for v in settings["variants"]):
        result["tree_choice"] = choose_tree(settings["variants"], modes)
    return result


def choose_tree(variants: list[dict], modes: dict) -> dict:
    """The fastest of ``verify``'s draft trees, the chain (plain ``verify``, budget 0)
    among them: the budget a runtime on this machine should default to."""
    trees = [
        v
        for v in variants
        if v["mode"] == "verify"
        and all(v.get(key) is None for key in ("tau", "k", "lookup", "min_prob"))
    ]
    best = max(trees, key=lambda v: modes[v["name"]]["tokens_per_second"])
    chain = modes.get("verify")
    s = modes[best["name"]]
    return {
        "name": best["name"],
        "tree_nodes": best.get("tree_nodes") or 0,
        "tree": best.get("tree"),
        "tokens_per_second": s["tokens_per_second"],
        "tokens_per_forward": s["tokens_per_forward"],
        "vs_chain": round(s["tokens_per_second"] / chain["tokens_per_second"], 4)
        if chain and chain["tokens_per_second"]
        else None,
    }


TASK_KEYS = ("task_accuracy", "task_accuracy_delta", "task_accuracy_delta_se")


def _solved(rs: list[dict]) -> dict[int, bool]:
    """Per prompt, whether the variant's (first-round) output solved its task."""
    return {x["prompt"]: x["solved"] for x in rs if x["round"] == 0 and "solved" in x}


def _summarise(rs: list[dict], ar: dict[int, list[int]]) -> dict:
    tokens = sum(x["new_tokens"] for x in rs)
    seconds = sum(x["seconds"] for x in rs)
    forwards = sum(x["forward_passes"] for x in rs)
    timed_policy = [x for x in rs if "policy_seconds" in x]  # not the external baselines
    policy_share = (
        sum(x["policy_seconds"] for x in timed_policy) / sum(x["seconds"] for x in timed_policy)
        if timed_policy
        else None
    )
    hist, proposed, accepted = Counter(), Counter(), Counter()
    for x in rs:
        hist.update({int(j): c for j, c in x.get("accepted_lengths", {}).items()})
        proposed.update({int(j): c for j, c in x.get("offset_proposed", {}).items()})
        accepted.update({int(j): c for j, c in x.get("offset_accepted", {}).items()})
    steps = sum(hist.values())
    if proposed:  # verified: share of sent drafts at offset j that the backbone confirmed
        by_offset = {str(j): round(accepted[j] / proposed[j], 4) for j in sorted(proposed)}
    elif steps:  # unverified: share of steps that accepted a j-th extra token
        by_offset = {
            str(j): round(sum(c for e, c in hist.items() if e >= j) / steps, 4)
            for j in range(1, max(hist) + 1)
        }
    else:  # external baselines report no per-step detail
        by_offset = {}
    outputs = {x["prompt"]: x["ids"] for x in rs if x["round"] == 0}
    reps = {i: repetition_ratio(v) for i, v in outputs.items()}
    # paired over prompts: a few looping outputs dominate seq-rep-4's mean
    rep_diffs = [r - repetition_ratio(ar[i]) for i, r in reps.items() if i in ar]
    nlls = [x["nll"] for x in rs if x["round"] == 0 and "nll" in x]
    return {
        "tokens_per_second": round(tokens / seconds, 3) if seconds else 0.0,
        "tokens_per_forward": round(tokens / forwards, 4) if forwards else 0.0,
        "ms_per_forward": round(1000 * seconds / forwards, 2) if forwards else 0.0,
        "new_tokens": tokens,
        "forward_passes": forwards,
        "seconds": round(seconds, 3),
        "policy_share": round(policy_share, 4) if policy_share is not None else None,
        "acceptance_by_offset": by_offset,
        "accepted_length_histogram": {str(j): c for j, c in sorted(hist.items())},
        "repetition_ratio": round(mean(reps.values()), 4),
        "repetition_delta_se": round(standard_error(rep_diffs), 4),
        "distinct_2": round(mean(distinct_n(v) for v in outputs.values()), 4),
        "agreement_with_ar": {
            "identical": round(mean(v == ar.get(i) for i, v in outputs.items()), 4),
            "common_prefix": round(
                mean(common_prefix_share(v, ar.get(i, [])) for i, v in outputs.items()), 4
            ),
        },
        "backbone_nll": round(mean(nlls), 4) if nlls else None,
    }


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far (all variants share one process)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _cpuinfo(key: str) -> str:
    """The first value of ``key`` in /proc/cpuinfo ('' where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.split(":")[0].strip() == key), ""
    )


def _cpu_flags() -> list[str]:
    """The CPU flags a run's speed depends on (bf16 and vector widths)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return sorted(f for f in _cpuinfo("flags").split() if f in wanted)


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.machine()


def markdown(result: dict) -> str:
    head = (
        f"{result['model']}, {result['dtype']}, runtime {result.get('runtime', 'transformers')}"
        + (f" ({result['weights']} weights)" if result.get("weights") else "")
        + ", "
        f"{result['completed_prompts']} of {result['n']} "
        + (f"(every {result['every']}th) " if result.get("every", 1) > 1 else "")
        + (f"(after the first {result['skip']}) " if result.get("skip") else "")
        + f"{result['prompts']} prompts, {result['max_new_tokens']} new tokens, "
        f"tau={result['tau']}, CPU: {result['machine']['cpu']} "
        f"({result['machine']['threads']} threads), peak RSS "
        f"{result['machine'].get('peak_rss_mb', '?')} MB\n\n"
    )
    rows = [
        "| mode | tok/s | speedup | vs llama.cpp | tokens/forward | ms/forward "
        "| acceptance by offset "
        "| seq-rep-4 (delta ± s.e.) | distinct-2 | identical to ar | common prefix | NLL "
        "| policy time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, s in result["modes"].items():
        acc = ", ".join(f"{j}: {v:.2f}" for j, v in s["acceptance_by_offset"].items()) or "-"
        nll = f"{s['backbone_nll']:.3f}" if s["backbone_nll"] is not None else "-"
        share = s.get("policy_share")
        policy = f"{share:.1%}" if share is not None else "-"
        vs = f"{s['vs_llama_cpp']:.3f}x" if "vs_llama_cpp" in s else "-"
        rows.append(
            f"| {mode} | {s['tokens_per_second']:.2f} | {s['speedup']:.3f}x | {vs} | "
            f"{s['tokens_per_forward']:.3f} | {s.get('ms_per_forward', 0):.1f} | {acc} | "
            f"{s['repetition_ratio']:.4f} "
            f"({s['repetition_delta']:+.4f} ± {s['repetition_delta_se']:.4f}) | "
            f"{s['distinct_2']:.3f} | "
            f"{s['agreement_with_ar']['identical']:.2f} | "
            f"{s['agreement_with_ar']['common_prefix']:.2f} | {nll} | {policy} |"
        )
    tree = result.get("tree_choice")
    if tree:
        rows.append(
            f"\nFastest draft tree here: {tree['name']} ({tree['tree_nodes']} nodes; 0 is the "
            f"chain), {tree['tokens_per_forward']:.3f} tokens/forward, "
            + (f"{tree['vs_chain']:.3f}x the chain." if tree["vs_chain"] else "")
        )
    return head + "\n".join(rows) + "\n" + _task_table(result)


def _task_table(result: dict) -> str:
    """Task accuracy per variant (task suites only), overall and on each half: defaults are
    chosen on the tune half and reported on the other."""
    modes = result["modes"]
    if all(s.get("task_accuracy") is None for s in modes.values()):
        return ""
    halves = [h for h in ("tune", "report") if h in result.get("by_category", {})]
    rows = [
        "| mode | solved | task accuracy | delta vs ar ± s.e. (paired) | "
        + "".join(f"{h} half | " for h in halves),
        "|---|---|---|---|" + "---|" * len(halves),
    ]
    for name, s in modes.items():
        if s.get("task_accuracy") is None:
            continue
        cells = [f"{result['by_category'][h][name]['task_accuracy']:.3f}" for h in halves]
        rows.append(
            f"| {name} | {s['tasks_solved']}/{s['tasks_scored']} | {s['task_accuracy']:.3f} | "
            f"{s['task_accuracy_delta']:+.3f} ± {s['task_accuracy_delta_se']:.3f} | "
            + "".join(f"{c} | " for c in cells)
        )
    for mode, c in result.get("tau_choice", {}).items():
        if c["tau"] is None:
            rows.append(
                f"\n{mode}: no tau keeps task accuracy {c['rule']} on the tune half "
                "and pays; default: accept nothing (tau > 1, the output of ar)."
            )
        else:
            r = c["report"]
            rows.append(
                f"\n{mode}: tau {c['tau']:g} is the fastest {c['rule']} on the tune half; on "
                f"the report half: {r['task_accuracy_delta']:+.3f} ± "
                f"{r['task_accuracy_delta_se']:.3f}, {r['speedup']:.3f}x."
            )  # fmt: skip
    return "\n" + "\n".join(r.rstrip() for r in rows) + "\n"


def save(result: dict, out: str | Path, plots: bool = True) -> list[Path]:
    """results.json, results.md and (unless disabled) the PNG plots; returns the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    files = [out / "results.json", out / "results.md"]
    if plots:
        from clp.plots import plot_all

        files += plot_all(result, out)
    return files
