"""The task interface: load a split, build the prompt and the target, extract and check answers.

Answer checking parses text only; it never evaluates model output as code.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from aft_jax.errors import SettingError, UserError

TEMPLATES = ("alpaca", "plain", "chat")
ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)


class TaskDataError(UserError, ValueError):
    """A data file that does not have the expected layout; the message names file and line."""


def no_split(task: str, split: str, splits) -> SettingError:
    """The error for a split name (`task.train_split`, `task.eval_split` or `task.validation_split`) that
    `task` does not have."""
    return SettingError(
        f"task {task!r} has no split {split!r} (task.train_split, task.eval_split or task.validation_split); "
        f"expected one of {', '.join(sorted(splits))}"
    )


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    question: str  # the full question text shown to the model (options included)
    target: str  # the reference chain of thought, ending with the task's answer line
    answer: str  # the gold answer (a number, or an option letter)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


def format_prompt(question: str, template: str = "alpaca", tokenizer=None) -> str:
    """The prompt for `question`: Alpaca style (as in RFT), `plain`, or the tokenizer's chat template (one
    user turn and the assistant's header; a template with a thinking mode, Qwen3's, is asked not to think,
    since the training targets are plain chains of thought)."""
    if template == "alpaca":
        return f"{ALPACA_HEADER}### Instruction:\n{question}\n\n### Response:\n"
    if template == "plain":
        return f"Question: {question}\nAnswer: "
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "")
            found = "no tokenizer was given" if tokenizer is None else f"the tokenizer {name!r} has none"
            raise SettingError(
                f"task.template='chat' needs a tokenizer with a chat template; {found}: set task.template to "
                "alpaca or plain, or model.tokenizer to a tokenizer with a chat template"
            )
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
    raise SettingError(f"task.template={template!r}: expected one of {', '.join(TEMPLATES)}")


class Task:
    """Subclasses set `name`, `splits` (split -> relative file) and implement `parse_record`,
    `extract_answer` and `answers_match`."""

    name = ""
    splits: dict[str, str] = {}
    hub_name = ""  # Hugging Face dataset for users with network access
    has_references = True  # every example's `target` is a reference chain of thought (else it is "")
    checker = None  # a `checkers.Checker` that replaces the task's own answer checks (`with_checker`)

    def load(
        self,
        split: str,
        *,
        data_dir: str | os.PathLike | None = None,
        path: str | os.PathLike | None = None,
        limit: int | None = None,
    ) -> list[Example]:
        """Examples of `split` from `path` (a JSONL file), or `data_dir` (default `$AFT_DATA_DIR`) laid out
        as the shared data folder, or, when neither exists, the hub dataset `hub_name` via `datasets`."""
        file = Path(path) if path else self._split_file(split, data_dir)
        if file is None:
            return self._from_hub(split, limit)
        examples = []
        for where, record in self.read_records(file):
            examples.append(self.parse_record(record, where, index=len(examples)))
            if limit and len(examples) >= limit:
                break
        return examples

    def _split_file(self, split: str, data_dir) -> Path | None:
        if split not in self.splits:
            raise no_split(self.name, split, self.splits)
        root = Path(data_dir or os.environ.get("AFT_DATA_DIR", ""))
        file = root / self.splits[split]
        if file.is_file():
            return file
        if data_dir or os.environ.get("AFT_DATA_DIR"):
            raise FileNotFoundError(f"{file}: not found (task {self.name}, split {split})")
        return None

    def _from_hub(self, split: str, limit: int | None) -> list[Example]:
        if not self.hub_name:
            raise FileNotFoundError(f"task {self.name}: set AFT_DATA_DIR or task.data_dir to the data folder")
        try:
            import datasets
        except ImportError as err:
            raise FileNotFoundError(
                f"task {self.name}: no data folder given and the `datasets` package is not "
                "installed to load it from the hub"
            ) from err
        name, _, config = self.hub_name.partition(":")
        rows = datasets.load_dataset(name, config or None, split=split)
        records = rows.select(range(min(limit, len(rows)))) if limit else rows
        return [self.parse_record(dict(r), f"{self.hub_name}[{split}]:{i}", index=i) for i, r in enumerate(records)]

    def read_records(self, file: Path) -> Iterator[tuple[str, Any]]:
        with file.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield f"{file}:{number}", json.loads(line)
                    except json.JSONDecodeError as err:
                        raise TaskDataError(f"{file}:{number}: invalid JSON ({err.msg})") from err

    def parse_record(self, record: Any, where: str, index: int) -> Example:
        raise NotImplementedError

    def prompt(self, example: Example, template: str = "alpaca", tokenizer=None) -> str:
        return format_prompt(example.question, template, tokenizer)

    def extract_answer(self, text: str) -> str | None:
        raise NotImplementedError

    def answers_match(self, predicted: str, gold: str) -> bool:
        raise NotImplementedError

    def extract_for(self, text: str, example: Example) -> str | None:
        """The answer in `text` for this example's task (the multi-task mix dispatches on the example)."""
        return self.extract_answer(text)

    def is_correct(self, text: str, gold: str) -> bool:
        predicted = self.extract_answer(text)
        return predicted is not None and self.answers_match(predicted, gold)

    def with_checker(self, checker) -> Task:
        """A copy of this task whose answers are extracted and checked by `checker` (`task.checker`): its
        `extract_answer`, `answers_match`, `is_correct` and `extract_for` are the checker's, so the levels
        of ranking feedback (`level`, `graded_level`) use it too."""
        task = copy.copy(self)
        task.checker = checker
        task.extract_answer = checker.extract
        task.answers_match = checker.match
        task.is_correct = checker.is_correct
        task.extract_for = lambda text, example: checker.extract(text)
        return task

    def level(self, text: str, example: Example) -> int:
        """Quality level for ranking feedback: 1 if correct, else 0 (GSM8K-RANK refines this)."""
        return int(self.is_correct(text, example.answer))

    def graded_level(self, text: str, example: Example, mostly_right) -> int:
        """Four levels: 3 correct answer, 2 wrong answer but `mostly_right(text)` (the task's test of its
        intermediate results), 1 another answer, 0 no answer."""
        predicted = self.extract_answer(text)
        if predicted is None:
            return 0
        if self.answers_match(predicted, example.answer):
            return 3
        return 2 if mostly_right(text) else 1


def require(record: dict, key: str, where: str):
    if not isinstance(record, dict) or key not in record:
        raise TaskDataError(f"{where}: missing field {key!r}")
    return record[key]


# Numbers as written in answers: optional sign, optional $, digits with thousands separators, decimals.
NUMBER = re.compile(r"(?<![\w.])(-|−)?\s?\$?\s?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?![\d])")


def parse_number(text: str) -> float | None:
    """The first number in `text` as a float (`$1,080.00` -> 1080.0, `-7.` -> -7.0), else None."""
    match = NUMBER.search(text)
    if not match:
        return None
    value = float(match.group(2).replace(",", ""))
    return -value if match.group(1) else value


def all_numbers(text: str) -> list[float]:
    return [(-1 if m.group(1) else 1) * float(m.group(2).replace(",", "")) for m in NUMBER.finditer(text)]


def numbers_equal(a: str, b: str) -> bool:
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and abs(x - y) <= 1e-6 * max(1.0, abs(y))
