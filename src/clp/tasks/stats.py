"""Task accuracy of one variant, paired with ``ar`` on the same tasks (docs/design.md, Metrics)."""

from __future__ import annotations

from clp.metrics import mean, standard_error


def paired_accuracy(solved: dict[int, bool], reference: dict[int, bool]) -> dict:
    """Share of tasks solved, and its difference to ``reference`` (``ar``) paired task by task:
    the standard error of the per-task differences is far smaller than that of two separate
    shares when the variants mostly agree, which is what tells a real drop from noise. Keys
    are None when nothing was scored (prompts that are not a task suite)."""
    if not solved:
        return {"task_accuracy": None, "task_accuracy_delta": None, "task_accuracy_delta_se": None}
    diffs = [float(ok) - float(reference[i]) for i, ok in solved.items() if i in reference]
    return {
        "task_accuracy": round(mean(float(ok) for ok in solved.values()), 4),
        "task_accuracy_delta": round(mean(diffs), 4) if diffs else None,
        "task_accuracy_delta_se": round(standard_error(diffs), 4) if diffs else None,
        "tasks_solved": sum(solved.values()),
        "tasks_scored": len(solved),
    }


UNVERIFIED_WITH_TAU = ("clp", "clp+")


def choose_tau(result: dict, points: float = 0.02) -> dict:
    """Per unverified mode with a tau, the default its task accuracy allows: on the tune half,
    the fastest of its taus whose accuracy stays within ``points`` of ``ar`` (paired), else
    'never accept' (tau > 1, the output of ``ar``); then that choice's figures on the report
    half, which played no part in choosing it. Empty when the run has no tune/report halves."""
    halves = result.get("by_category", {})
    if "tune" not in halves or "report" not in halves:
        return {}
    choices = {}
    rule = f"within {points * 100:g} points of ar"
    for mode in UNVERIFIED_WITH_TAU:
        names = [n for n, s in result["modes"].items() if s["variant"]["mode"] == mode]
        if not names:
            continue
        tune = halves["tune"]
        ok = [n for n in names if (tune[n]["task_accuracy_delta"] or 0.0) >= -points - 1e-9]
        best = max(ok, key=lambda n: tune[n]["tokens_per_second"], default=None)
        if best is None or tune[best]["speedup"] < 1.0:  # no tau pays: accept nothing
            choices[mode] = {"tau": None, "variant": None, "rule": rule}
            continue
        report = halves["report"][best]
        choices[mode] = {
            "tau": result["modes"][best]["variant"]["tau"],
            "variant": best,
            "rule": rule,
            "tune": {k: tune[best][k] for k in ("task_accuracy_delta", "speedup")},
            "report": {k: report[k] for k in ("task_accuracy_delta", "task_accuracy_delta_se",
                                              "speedup")},
        }  # fmt: skip
    return choices
