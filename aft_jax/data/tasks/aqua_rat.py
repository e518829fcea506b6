"""AQuA-RAT: algebra word problems with five options. Train is FLAN's 2,728-problem COT subset (the
full train split is not in the shared data); dev and test are the official files."""

from __future__ import annotations

import csv
import re

from aft_jax.data.tasks.base import Example, TaskDataError, require
from aft_jax.data.tasks.choice import ChoiceTask, options_text

OPTION = re.compile(r"^\s*([A-E])\s*\)\s*(.*)$", re.DOTALL)


class AquaRat(ChoiceTask):
    name = "aqua_rat"
    splits = {
        "train": "aqua_rat/flan_cot_subset/aqua_train.tsv",
        "dev": "aqua_rat/dev.json",
        "test": "aqua_rat/test.json",
    }
    hub_name = "deepmind/aqua_rat:raw"

    def read_records(self, file):
        if file.suffix != ".tsv":
            yield from super().read_records(file)
            return
        with file.open(encoding="utf-8", newline="") as f:
            for number, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
                if len(row) != 3:
                    raise TaskDataError(f"{file}:{number}: expected 3 tab-separated columns, got {len(row)}")
                question, answer, rationale = (c.replace("\\n", "\n") for c in row)
                yield (
                    f"{file}:{number}",
                    {"flan_question": question, "correct": answer.strip("() "), "rationale": rationale},
                )

    def parse_record(self, record, where, index):
        gold = str(require(record, "correct", where)).strip()
        if gold not in "ABCDE" or len(gold) != 1:
            raise TaskDataError(f"{where}: 'correct' should be a letter A-E, got {gold!r}")
        if "flan_question" in record:  # options are already inside the question text
            question = record["flan_question"].strip()
        else:
            options = []
            for raw in require(record, "options", where):
                match = OPTION.match(raw)
                if not match:
                    raise TaskDataError(f"{where}: option {raw!r} does not look like 'A)...'")
                options.append((match.group(1), match.group(2).strip()))
            question = f"{require(record, 'question', where).strip()}\nOptions:\n{options_text(options)}"
        rationale = require(record, "rationale", where).strip()
        return Example(
            id=f"{self.name}-{index}", question=question, target=f"{rationale}\nThe answer is {gold}.", answer=gold
        )
