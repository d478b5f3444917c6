"""What every task suite shares: a task that formats its own prompt and scores a completion,
and the fixed half/half split that keeps choosing defaults apart from reporting them."""

from __future__ import annotations

from dataclasses import dataclass

# Even suite positions tune (defaults are chosen there), odd ones report: a split by position
# is fixed by the suite itself, the same on every machine and in every run.
HALVES = ("tune", "report")


@dataclass(frozen=True)
class Score:
    """Whether a completion solves its task, and why not (or 'passed' / 'correct')."""

    solved: bool
    reason: str


@dataclass(frozen=True)
class Task:
    """One item of a suite; subclasses know their prompt and their scorer."""

    suite: str
    id: str
    index: int  # position in the suite: fixes its half

    @property
    def half(self) -> str:
        return HALVES[self.index % 2]

    def prompt(self) -> str:
        """The user turn for a chat instruct model."""
        raise NotImplementedError

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings: where the part of a reply that is scored has certainly ended."""
        return ()

    def score(self, completion: str) -> Score:
        """Score the model's reply (the decoded text after the prompt)."""
        raise NotImplementedError


def half(tasks: list[Task], which: str) -> list[Task]:
    """The tasks of one half: 'tune' (even positions) or 'report' (odd positions)."""
    if which not in HALVES:
        raise ValueError(f"unknown half '{which}'; choose from {', '.join(HALVES)}")
    return [t for t in tasks if t.half == which]
