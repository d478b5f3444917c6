"""Task suites with automatic scoring: does an answer still work, not only read well.

``load_suite("humaneval")`` (alias ``code``: unit tests run in a sandbox) and
``load_suite("gsm8k")`` (alias ``math``: exact final numbers). Each task formats its own chat
prompt and scores a completion; even positions form the 'tune' half and odd ones the 'report'
half, so a default chosen on one is reported on the other.
"""

from __future__ import annotations

import functools

from clp.data import Document
from clp.errors import ClpError
from clp.tasks import gsm8k, humaneval
from clp.tasks.base import HALVES, Score, Task, half
from clp.tasks.grading import Grader
from clp.tasks.stats import paired_accuracy

SUITES = {"humaneval": humaneval.load, "gsm8k": gsm8k.load}
ALIASES = {"code": "humaneval", "math": "gsm8k"}

__all__ = [
    "ALIASES",
    "Grader",
    "HALVES",
    "SUITES",
    "Score",
    "Task",
    "half",
    "is_suite",
    "load_suite",
    "paired_accuracy",
    "score",
    "suite_documents",
    "task_for",
]


def is_suite(name: str) -> bool:
    return name in SUITES or name in ALIASES


@functools.cache
def _suite(name: str) -> tuple[Task, ...]:
    return tuple(SUITES[name]())


def load_suite(name: str) -> list[Task]:
    """Every task of a suite, in its fixed order."""
    canonical = ALIASES.get(name, name)
    if canonical not in SUITES:
        names = ", ".join([*SUITES, *ALIASES])
        raise ClpError(f"unknown task suite '{name}'; available: {names}")
    return list(_suite(canonical))


@functools.cache
def _by_key(name: str) -> dict[str, Task]:
    return {f"{t.suite}:{t.id}": t for t in _suite(name)}


def task_for(key: str) -> Task | None:
    """The task behind a benchmark prompt id ('humaneval:HumanEval/0'), None for other prompts."""
    name = key.split(":", 1)[0]
    return _by_key(name).get(key) if name in SUITES else None


def suite_documents(name: str) -> list[Document]:
    """A suite as benchmark prompts: id 'suite:task id', the chat prompt, and the task's half
    as its category (so the benchmark reports each half on its own)."""
    return [Document(f"{t.suite}:{t.id}", t.prompt(), category=t.half) for t in load_suite(name)]


def score(task: Task, completion: str) -> Score:
    """Score a completion: solved or not, and the reason."""
    return task.score(completion)
