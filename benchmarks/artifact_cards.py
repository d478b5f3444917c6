"""Print the held-out metrics recorded in committed artifacts as Markdown (for artifacts/README.md).

python benchmarks/artifact_cards.py artifacts/smollm2-135m artifacts/qwen2.5-coder-0.5b
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def heads_card(folder: Path) -> list[str]:
    cfg = json.loads((folder / "config.json").read_text())
    t = cfg["training"]
    h, d, o = t["heldout"], t["data"], t.get("overhead", {})
    offsets = list(h["top1"])
    init = d.get("init")
    warm = (
        f", continuing heads trained on {init['train_tokens']:,} {init['mode']} tokens "
        f"({init['path']})"
        if init
        else ""
    )
    engine = d.get("distill_runtime", "transformers")
    engine = f" (answers generated on {engine})" if d["mode"] == "distill" else ""
    lines = [
        f"**{folder}** — `{cfg['arch']}` heads, k={cfg['k']}, {t['parameters']:,} trained "
        f"parameters, draft vocabulary {cfg['draft_vocab_size'] or 'full'}; data: "
        f"{d['mode']}{engine} on {', '.join(d['sources'])}, {d['train_docs']} documents = "
        f"{d['train_tokens']:,} training tokens{warm}; {t['steps']} steps, {t['epochs']} epochs, "
        f"{t['minutes']} min; held-out: {h['rows']:,} rows",
        "",
        "| offset | " + " | ".join(offsets) + " |",
        "|---|" + "---|" * len(offsets),
    ]
    for m in ("top1", "top3", "chained", "prefix"):
        lines.append(f"| {m} | " + " | ".join(f"{h[m][x]:.3f}" for x in offsets) + " |")
    if "ranks" in h:  # what static draft trees are shaped from
        lines.append(
            "| ranks 1-8 | "
            + " | ".join(" ".join(f"{v:.3f}" for v in h["ranks"][x]) for x in offsets)
            + " |"
        )
    lines.append("")
    lines.append(
        f"Tokens per forward if verified: {h['tokens_per_forward_if_verified']}; "
        f"draft-vocabulary coverage of held-out targets: {h['draft_vocab_coverage']}."
    )
    first = t.get("heldout_when_trained")
    if first:  # re-evaluated by `clp train evaluate` on a rebuilt held-out split
        lines.append(
            f"Re-evaluated with `clp train evaluate` ({h.get('features_dtype')} features); "
            f"when trained ({first['rows']:,} rows): top1 "
            + ", ".join(f"{x} {first['top1'][x]:.3f}" for x in offsets)
            + ", chained "
            + ", ".join(f"{x} {first['chained'][x]:.3f}" for x in offsets)
            + f", {first['tokens_per_forward_if_verified']} tokens per forward if verified."
        )
    if o:
        lines.append(
            f"Heads cost per step ({o.get('dtype', 'bf16 heads, fp32 backbone')}): "
            f"{o['heads_ms']} ms = "
            f"{o['heads_share']:.1%} of one backbone forward ({o['backbone_forward_ms']} "
            f"ms); with the full vocabulary {o['heads_full_vocab_ms']} ms = "
            f"{o['heads_full_vocab_share']:.1%}."
        )
    return lines


def predictor_card(folder: Path, name: str) -> list[str]:
    cfg = json.loads((folder / f"{name}.json").read_text())
    r = cfg["training"]["heldout"]
    lines = [
        f"**{cfg['kind']}** ({r['parameters']:,} parameters, trained on "
        f"{r.get('train_rows', 0):,} calib rows): label distribution L*=0..k "
        f"{r['label_distribution']}"
    ]
    if "accuracy" in r:
        lines[-1] += f"; accuracy {r['accuracy']} vs always-majority {r['majority_accuracy']}"
    lines += ["", "| tau | mean accepted | wrong share |", "|---|---|---|"]
    for tau, v in r["by_tau"].items():
        lines.append(f"| {tau} | {v['mean_accepted']} | {v['wrong_share']} |")
    return lines


def main() -> None:
    for arg in sys.argv[1:]:
        folder = Path(arg)
        print("\n".join(heads_card(folder)), "\n")
        for name in ("clp", "clpplus", "gate"):
            if (folder / f"{name}.json").is_file():
                print("\n".join(predictor_card(folder, name)), "\n")
        for sub in sorted(p for p in folder.iterdir() if (p / "config.json").is_file()):
            print("\n".join(heads_card(sub)), "\n")


if __name__ == "__main__":
    main()
