"""ECQA: CommonsenseQA questions with free-flow explanations; five options, gold is `answer_key`."""

from __future__ import annotations

from aft_jax.tasks.base import Example, TaskDataError, require
from aft_jax.tasks.choice import ChoiceTask, options_text


class ECQA(ChoiceTask):
    name = "ecqa"
    splits = {"train": "ecqa/train.jsonl", "dev": "ecqa/dev.jsonl", "test": "ecqa/test.jsonl"}
    hub_name = "tasksource/ecqa"

    def parse_record(self, record, where, index):
        choices = require(record, "choices", where)
        if len(choices) != 5:
            raise TaskDataError(f"{where}: expected 5 choices, got {len(choices)}")
        options = [(c["label"], c["text"]) for c in choices]
        gold = require(record, "answer_key", where)
        explanation = " ".join(require(record, "explanation", where).split())
        question = f"{require(record, 'question', where).strip()}\nOptions:\n{options_text(options)}"
        return Example(id=str(record.get("id", f"{self.name}-{index}")), question=question,
                       target=f"{explanation}\nThe answer is {gold}.", answer=gold,
                       meta={"also_in": record.get("also_in", [])})
