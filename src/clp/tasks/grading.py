"""Scoring benchmark outputs after they were timed: token ids decoded as the user would see
them, and an output identical to one already scored (``verify`` next to ``ar``) not run again."""

from __future__ import annotations

from clp.tasks.base import Task


class Grader:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.memo: dict[tuple[str, str], dict] = {}

    def __call__(self, task: Task, ids: list[int]) -> dict:
        """{'solved': bool, 'reason': str} for the output ``ids`` of ``task``'s prompt."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        key = (f"{task.suite}:{task.id}", text)
        if key not in self.memo:
            s = task.score(text)
            self.memo[key] = {"solved": s.solved, "reason": s.reason}
        return self.memo[key]
