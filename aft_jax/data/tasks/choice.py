"""Multiple-choice answers (AQuA-RAT, ECQA): an option letter A-E."""

from __future__ import annotations

import re

from aft_jax.data.tasks.base import Task

LETTERS = "ABCDE"
# "The answer is C", "the answer is (C).", "Answer: C", "answer is: option C", "The correct answer is C)"
ANSWER_IS_LETTER = re.compile(
    r"answer(?:\s+is)?\s*(?::|-|is)?\s*(?:option\s*)?[\(\[]?\s*([A-E])\s*[\)\]]?(?![A-Za-z])", re.IGNORECASE
)
STANDALONE_LETTER = re.compile(r"(?:\(([A-E])\)|\b([A-E])\)|(?<![A-Za-z'])([A-E])(?![A-Za-z']))")


def extract_option_letter(text: str) -> str | None:
    """The letter of the last "The answer is X" (any spelling above); else the last standalone option
    letter (`(C)`, `C)`, or a lone capital A-E that is not the article "A" starting a sentence)."""
    matches = list(ANSWER_IS_LETTER.finditer(text))
    if matches:
        return matches[-1].group(1).upper()
    for match in reversed(list(STANDALONE_LETTER.finditer(text))):
        letter = next(g for g in match.groups() if g)
        if letter == "A" and match.group(3) and text[match.end() : match.end() + 1] == " ":
            continue  # "A train leaves ..." is an article, not an option
        return letter
    return None


class ChoiceTask(Task):
    def extract_answer(self, text):
        return extract_option_letter(text)

    def answers_match(self, predicted, gold):
        return predicted.strip().upper() == gold.strip().upper()


def options_text(options: list[tuple[str, str]]) -> str:
    return "\n".join(f"({letter}) {text}" for letter, text in options)
