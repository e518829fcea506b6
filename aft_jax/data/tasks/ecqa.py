"""ECQA: CommonsenseQA questions with free-flow explanations; five options, gold is `answer_key`."""

from __future__ import annotations

from aft_jax.data.tasks.base import Example, TaskDataError, require
from aft_jax.data.tasks.choice import ChoiceTask, options_text


class ECQA(ChoiceTask):
    name = "ecqa"
    splits = {"train": "ecqa/train.jsonl", "dev": "ecqa/dev.jsonl", "test": "ecqa/test.jsonl"}
    hub_name = "tasksource/ecqa"

    def parse_record(self, record, where, index):
        if "q_text" in record:  # the hub's column layout (ECQA authors' generate_data.py)
            record = from_hub_columns(record, where)
        choices = require(record, "choices", where)
        if len(choices) != 5:
            raise TaskDataError(f"{where}: expected 5 choices, got {len(choices)}")
        options = [(c["label"], c["text"]) for c in choices]
        gold = require(record, "answer_key", where)
        explanation = " ".join(require(record, "explanation", where).split())
        question = f"{require(record, 'question', where).strip()}\nOptions:\n{options_text(options)}"
        return Example(
            id=str(record.get("id", f"{self.name}-{index}")),
            question=question,
            target=f"{explanation}\nThe answer is {gold}.",
            answer=gold,
            meta={"also_in": record.get("also_in", [])},
        )


def from_hub_columns(record: dict, where: str) -> dict:
    """`q_no, q_text, q_op1..q_op5, q_ans, taskB` -> this module's layout; the gold letter is the first
    option whose text equals `q_ans`."""
    texts = [require(record, f"q_op{k}", where) for k in range(1, 6)]
    answer = require(record, "q_ans", where)
    if answer not in texts:
        raise TaskDataError(f"{where}: q_ans {answer!r} is not one of the options")
    return {
        "id": record.get("q_no"),
        "question": require(record, "q_text", where),
        "choices": [{"label": "ABCDE"[k], "text": t} for k, t in enumerate(texts)],
        "answer_key": "ABCDE"[texts.index(answer)],
        "explanation": require(record, "taskB", where),
    }
