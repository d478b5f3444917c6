"""Task accuracy of one variant, paired with ``ar`` on the same tasks (SPEC section 3)."""

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
