"""mix: the paper's multi-task setting, GSM8K + AQuA-RAT + ECQA trained (and evaluated) together.

Examples keep their own task's question, target and gold answer, with `meta["task"]` naming it; answers
are checked by that task's rules (a gold option letter means a multiple-choice question).
"""

from __future__ import annotations

from aft_jax.data.tasks.aqua_rat import AquaRat
from aft_jax.data.tasks.base import Example, Task, no_split
from aft_jax.data.tasks.choice import LETTERS
from aft_jax.data.tasks.ecqa import ECQA
from aft_jax.data.tasks.gsm8k import GSM8K
from aft_jax.errors import SettingError


class Mix(Task):
    name = "mix"
    parts = (GSM8K(), AquaRat(), ECQA())
    splits = {"train": "", "test": ""}

    def load(self, split, *, data_dir=None, path=None, limit=None):
        if path:
            raise SettingError(
                f"task mix: path={str(path)!r}: mix reads the shared data folder (task.data_dir), not a single file"
            )
        if split not in self.splits:
            raise no_split(self.name, split, self.splits)
        examples = []
        for part in self.parts:
            for e in part.load(split, data_dir=data_dir, limit=limit):
                examples.append(
                    Example(f"{part.name}/{e.id}", e.question, e.target, e.answer, {**e.meta, "task": part.name})
                )
        return examples

    def _part(self, gold: str) -> Task:
        return self.parts[1] if gold.strip().upper() in LETTERS and len(gold.strip()) == 1 else self.parts[0]

    def extract_for(self, text, example):
        return next(p for p in self.parts if p.name == example.meta["task"]).extract_answer(text)

    def extract_answer(self, text):
        raise ValueError("task mix extracts per example: use extract_for(text, example)")

    def answers_match(self, predicted, gold):
        return self._part(gold).answers_match(predicted, gold)

    def is_correct(self, text, gold):
        return self._part(gold).is_correct(text, gold)
