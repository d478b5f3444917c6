"""Benchmark runs: every mode on the same prompts in one process, interleaved prompt by prompt
after a warm-up, so speedups are ratios of numbers measured side by side."""

from __future__ import annotations

import json
import platform
import time
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from clp.api import Model
from clp.data import Document, interleave, mtbench, user_files
from clp.errors import ClpError
from clp.metrics import backbone_nll, common_prefix_share, distinct_n, mean, repetition_ratio
from clp.prompts import encode_prompt


def load_prompts(source: str, n: int | None) -> list[Document]:
    if source == "mtbench":
        docs = mtbench()
    elif source == "sharegpt":
        docs = interleave(["sharegpt"], "heldout", n)
    else:
        docs = list(user_files(source))
    if not docs:
        raise ClpError(f"no prompts in {source}")
    return docs[:n] if n else docs


def run(
    model: Model,
    modes: list[str],
    prompts: list[Document],
    max_new_tokens: int,
    tau: float | None = None,
    rounds: int = 1,
    nll: bool = True,
) -> dict:
    if "ar" not in modes:
        modes = ["ar", *modes]
    for mode in modes:  # fail early on missing artifacts, before any timing
        model.policy(mode, tau)
    encoded = [encode_prompt(model.tokenizer, d.prompt) for d in prompts]
    for mode in modes:  # warm-up: first calls pay for allocation and lazy loading
        model.generate(encoded[0], mode=mode, tau=tau, max_new_tokens=16)
    runs: dict[str, list[dict]] = defaultdict(list)
    bar = tqdm(total=rounds * len(prompts) * len(modes), desc="bench", unit="run")
    for r in range(rounds):
        for i, (doc, ids) in enumerate(zip(prompts, encoded, strict=True)):
            order = (
                modes[i % len(modes) :] + modes[: i % len(modes)]
            )  # rotate: no mode always first
            for mode in order:
                res = model.generate(ids, mode=mode, tau=tau, max_new_tokens=max_new_tokens)
                runs[mode].append(
                    {
                        "prompt": i,
                        "round": r,
                        "category": doc.category,
                        "ids": res.token_ids,
                        "stats": res.stats,
                    }
                )
                bar.update(1)
    bar.close()
    outputs = {m: {x["prompt"]: x["ids"] for x in rs if x["round"] == 0} for m, rs in runs.items()}
    nlls = {}
    if nll:
        for mode in modes:
            nlls[mode] = {
                i: backbone_nll(model.backbone, encoded[i], ids) for i, ids in outputs[mode].items()
            }
    summary = {
        mode: _summarise(rs, outputs[mode], outputs["ar"], nlls.get(mode))
        for mode, rs in runs.items()
    }
    tps_ar = summary["ar"]["tokens_per_second"]
    for s in summary.values():
        s["speedup"] = round(s["tokens_per_second"] / tps_ar, 4) if tps_ar else None
        s["repetition_delta"] = round(s["repetition_ratio"] - summary["ar"]["repetition_ratio"], 4)
    categories = sorted({d.category for d in prompts})
    by_category = {}
    if len(categories) > 1:
        for cat in categories:
            idx = {i for i, d in enumerate(prompts) if d.category == cat}
            cat_sum = {
                m: _summarise(
                    [x for x in rs if x["prompt"] in idx],
                    {i: v for i, v in outputs[m].items() if i in idx},
                    {i: v for i, v in outputs["ar"].items() if i in idx},
                    None,
                )
                for m, rs in runs.items()
            }
            base = cat_sum["ar"]["tokens_per_second"]
            by_category[cat] = {
                m: {
                    "tokens_per_second": s["tokens_per_second"],
                    "speedup": round(s["tokens_per_second"] / base, 4),
                    "tokens_per_forward": s["tokens_per_forward"],
                    "repetition_ratio": s["repetition_ratio"],
                }
                for m, s in cat_sum.items()
            }
    b = model.backbone
    return {
        "model": b.name,
        "dtype": str(b.dtype).replace("torch.", ""),
        "heads": str(model.heads_dir) if model.heads_dir else None,
        "prompts": prompts[0].id.split(":")[0] if prompts else None,
        "n": len(prompts),
        "max_new_tokens": max_new_tokens,
        "tau": tau,
        "rounds": rounds,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu": _cpu_name(),
            "python": platform.python_version(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "modes": summary,
        "by_category": by_category,
    }


def _summarise(
    rs: list[dict],
    outputs: dict[int, list[int]],
    ar: dict[int, list[int]],
    nll: dict[int, float] | None,
) -> dict:
    tokens = sum(x["stats"].new_tokens for x in rs)
    seconds = sum(x["stats"].seconds for x in rs)
    forwards = sum(x["stats"].forward_passes for x in rs)
    hist: Counter = Counter()
    proposed: Counter = Counter()
    accepted: Counter = Counter()
    for x in rs:
        hist.update(x["stats"].accepted_lengths)
        proposed.update(x["stats"].offset_proposed)
        accepted.update(x["stats"].offset_accepted)
    steps = sum(hist.values())
    if proposed:  # verified: share of sent drafts at offset j that the backbone confirmed
        by_offset = {str(j): round(accepted[j] / proposed[j], 4) for j in sorted(proposed)}
    else:  # unverified: share of steps that accepted a j-th extra token
        top = max(hist, default=0)
        by_offset = (
            {
                str(j): round(sum(c for e, c in hist.items() if e >= j) / steps, 4)
                for j in range(1, top + 1)
            }
            if steps
            else {}
        )
    same = [outputs[i] == ar.get(i) for i in outputs]
    return {
        "tokens_per_second": round(tokens / seconds, 3) if seconds else 0.0,
        "tokens_per_forward": round(tokens / forwards, 4) if forwards else 0.0,
        "new_tokens": tokens,
        "forward_passes": forwards,
        "seconds": round(seconds, 3),
        "acceptance_by_offset": by_offset,
        "accepted_length_histogram": {str(k): v for k, v in sorted(hist.items())},
        "repetition_ratio": round(mean(repetition_ratio(v) for v in outputs.values()), 4),
        "distinct_2": round(mean(distinct_n(v) for v in outputs.values()), 4),
        "agreement_with_ar": {
            "identical": round(mean(same), 4),
            "common_prefix": round(
                mean(common_prefix_share(v, ar.get(i, [])) for i, v in outputs.items()), 4
            ),
        },
        "backbone_nll": round(mean(nll.values()), 4) if nll else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def markdown(result: dict) -> str:
    head = (
        f"{result['model']}, {result['dtype']}, {result['n']} {result['prompts']} prompts, "
        f"{result['max_new_tokens']} new tokens, tau={result['tau']}, "
        f"CPU: {result['machine']['cpu']}\n\n"
    )
    rows = [
        "| mode | tok/s | speedup | tokens/forward | acceptance by offset | seq-rep-4 (delta) "
        "| distinct-2 | identical to ar | common prefix | NLL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, s in result["modes"].items():
        acc = ", ".join(f"{j}: {v:.2f}" for j, v in s["acceptance_by_offset"].items()) or "-"
        nll = f"{s['backbone_nll']:.3f}" if s["backbone_nll"] is not None else "-"
        rows.append(
            f"| {mode} | {s['tokens_per_second']:.2f} | {s['speedup']:.3f}x | "
            f"{s['tokens_per_forward']:.3f} | {acc} | {s['repetition_ratio']:.4f} "
            f"({s['repetition_delta']:+.4f}) | {s['distinct_2']:.3f} | "
            f"{s['agreement_with_ar']['identical']:.2f} | "
            f"{s['agreement_with_ar']['common_prefix']:.2f} | {nll} |"
        )
    return head + "\n".join(rows) + "\n"


def save(result: dict, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
