"""PNG plots of a benchmark result: speed against repetition, against the backbone's NLL and
(task suites) against task accuracy, acceptance by offset, and the accepted-length histogram."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def _title(result: dict) -> str:
    return (
        f"{result['model']} {result['dtype']} on {result.get('runtime', 'transformers')}, "
        f"{result['completed_prompts']} {result['prompts']} prompts x "
        f"{result['max_new_tokens']} tokens (CPU)"
    )


def speed_vs_quality(result: dict, path: Path, measure: str, xlabel: str) -> Path:
    """Speedup against one quality measure's difference from ``ar`` (seq-rep-4; the backbone's
    NLL of the outputs: repetition alone misses text that is fluent but not what the backbone
    would write; task accuracy: neither sees a broken function). Each variant is a point; the
    tau sweeps (clp, clp+, verify) are joined into curves whose points are labelled by tau
    alone, so a sweep stays readable."""
    fig, ax = plt.subplots(figsize=(7, 5))
    modes = result["modes"]
    base = modes["ar"][measure]
    on_curve = set()
    for family in ("clp", "clp+", "verify"):
        pts = sorted(
            (s["variant"]["tau"], s[measure] - base, s["speedup"], name)
            for name, s in modes.items()
            if s["variant"]["mode"] == family and s["variant"]["tau"] is not None
        )
        if len(pts) > 1:
            line = ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", ms=4, label=family)
            for tau, x, y, name in pts:
                ax.annotate(f"{tau:g}", (x, y), fontsize=7, color=line[0].get_color())
                on_curve.add(name)
    for name, s in modes.items():
        if name not in on_curve:
            x = s[measure] - base
            ax.scatter(x, s["speedup"], s=30, color="black")
            ax.annotate(name, (x, s["speedup"]), fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("speedup over ar (same run)")
    ax.set_title(_title(result), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="tau sweep", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def acceptance_by_offset(result: dict, path: Path) -> Path:
    """Realised acceptance at each draft offset: one line per verified variant (the k sweep,
    prompt lookup), else per variant that accepts drafts."""
    modes = result["modes"]
    chosen = {n: s for n, s in modes.items() if s["variant"]["mode"] in ("verify", "lookup")}
    chosen = chosen or {n: s for n, s in modes.items() if s["acceptance_by_offset"]}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in chosen.items():
        acc = s["acceptance_by_offset"]
        if acc:
            xs = [int(j) for j in acc]
            ax.plot(xs, list(acc.values()), "o-", label=name)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("draft offset j (token n+1+j)")
    ax.set_ylabel("share accepted")
    ax.set_ylim(0, 1)
    ax.set_title(_title(result), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accepted_length_histogram(result: dict, path: Path) -> Path:
    """Share of decode steps that kept L extra tokens, per mode (sweep variants left out)."""
    modes = {n: s for n, s in result["modes"].items() if "@" not in n}
    modes = {n: s for n, s in modes.items() if s["accepted_length_histogram"]}
    top = max((int(j) for s in modes.values() for j in s["accepted_length_histogram"]), default=0)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(modes))
    for m, (name, s) in enumerate(modes.items()):
        hist = s["accepted_length_histogram"]
        steps = sum(hist.values()) or 1
        xs = [length + m * width for length in range(top + 1)]
        ax.bar(
            xs, [hist.get(str(length), 0) / steps for length in range(top + 1)], width, label=name
        )
    ax.set_xticks([length + 0.4 - width / 2 for length in range(top + 1)], range(top + 1))
    ax.set_xlabel("extra tokens kept per step (after the backbone's own)")
    ax.set_ylabel("share of steps")
    ax.set_title(_title(result), fontsize=9)
    if modes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(result: dict, out: Path) -> list[Path]:
    rep = "repetition ratio (seq-rep-4) minus ar's"
    files = [speed_vs_quality(result, out / "speed_vs_repetition.png", "repetition_ratio", rep)]
    if all(s["backbone_nll"] is not None for s in result["modes"].values()):
        nll = "backbone NLL of the outputs (nats/token) minus ar's"
        files.append(speed_vs_quality(result, out / "speed_vs_nll.png", "backbone_nll", nll))
    if all(s.get("task_accuracy") is not None for s in result["modes"].values()):
        acc = "task accuracy minus ar's (share of tasks solved; left: accuracy lost)"
        path = out / "speed_vs_task_accuracy.png"
        files.append(speed_vs_quality(result, path, "task_accuracy", acc))
    return files + [
        acceptance_by_offset(result, out / "acceptance_by_offset.png"),
        accepted_length_histogram(result, out / "accepted_length_histogram.png"),
    ]
