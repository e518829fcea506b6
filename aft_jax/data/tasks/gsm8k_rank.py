"""GSM8K-RANK (ours): GSM8K with graded feedback for the ranking losses.

level 3: correct answer; 2: wrong answer but at least half of the reference's intermediate results (the
values in its `<<a=b>>` notes) appear in the text; 1: some answer extracted; 0: none.
"""

from __future__ import annotations

import re

from aft_jax.data.tasks.base import all_numbers, parse_number
from aft_jax.data.tasks.gsm8k import GSM8K

NOTE_RESULT = re.compile(r"<<[^<>=]*=([^<>]*)>>")


def intermediate_results(solution: str) -> list[float]:
    values = (parse_number(m.group(1)) for m in NOTE_RESULT.finditer(solution))
    return [v for v in values if v is not None]


class GSM8KRank(GSM8K):
    name = "gsm8k_rank"

    def level(self, text, example):
        wanted = intermediate_results(example.meta.get("solution", ""))

        def mostly_right(text):
            present = set(all_numbers(text))
            return bool(wanted) and 2 * sum(any(abs(v - p) < 1e-6 for p in present) for v in wanted) >= len(wanted)

        return self.graded_level(text, example, mostly_right)
