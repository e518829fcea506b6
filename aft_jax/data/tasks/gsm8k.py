"""GSM8K: grade-school math word problems; the answer is the number after the last `####`."""

from __future__ import annotations

import re

from aft_jax.data.tasks.base import Example, Task, TaskDataError, all_numbers, numbers_equal, parse_number, require

CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
ANSWER_IS = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)


def canonical_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def extract_number_answer(text: str) -> str | None:
    """Number after the last `####`; else after the last "The answer is"; else the last number."""
    for marker in ("####", ANSWER_IS):
        positions = (
            [m.end() for m in re.finditer(re.escape(marker), text)]
            if isinstance(marker, str)
            else [m.end() for m in marker.finditer(text)]
        )
        for pos in reversed(positions):
            value = parse_number(text[pos : pos + 64])
            if value is not None:
                return canonical_number(value)
    numbers = all_numbers(text)
    return canonical_number(numbers[-1]) if numbers else None


class GSM8K(Task):
    name = "gsm8k"
    splits = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
    hub_name = "openai/gsm8k:main"

    def parse_record(self, record, where, index):
        question, solution = require(record, "question", where), require(record, "answer", where)
        if "####" not in solution:
            raise TaskDataError(f"{where}: field 'answer' has no '#### <answer>' line")
        gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
        return Example(
            id=f"{self.name}-{index}",
            question=question.strip(),
            target=CALCULATOR_NOTE.sub("", solution).strip(),
            answer=gold,
            meta={"solution": solution},
        )

    def extract_answer(self, text):
        return extract_number_answer(text)

    def answers_match(self, predicted, gold):
        return numbers_equal(predicted, gold)
