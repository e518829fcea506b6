"""jsonl: your own task, read from local files (`task.name = "jsonl"`).

Each split is one file, `task.files.{train,test,validation}`: JSON Lines (`.jsonl`, read here so that a
malformed record's error names its file and line), or any format `datasets` reads from local files
(`.json`, `.csv`, `.parquet`; errors name the file and record). A record's question, gold answer and
optional reference rationale (a chain of thought ending with the answer) are the keys
`task.fields.{question,answer,rationale}`. Without a rationale key every example's `target` is "" and
`has_references` is false: see `task.without_rationale` for what VFT does then. Answers are checked by
`task.checker` (`checkers.py`), which this task requires: it has no checker of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from aft_jax.data.tasks.base import Example, Task, TaskDataError, no_split
from aft_jax.errors import SettingError

# File suffix -> the `datasets` builder that reads it (None: our own JSON Lines reader).
FORMATS = {".jsonl": None, ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLITS = ("train", "test", "validation")


def file_format_error(split: str, path: str) -> str | None:
    """The error for a `task.files.<split>` value of an unknown format, else None."""
    if Path(path).suffix.lower() in FORMATS:
        return None
    return f"task.files.{split}={path!r}: expected a {', '.join(FORMATS)} file"


class JsonlTask(Task):
    name = "jsonl"
    hub_name = ""

    def __init__(
        self,
        files: dict[str, str] | None = None,
        question: str = "question",
        answer: str = "answer",
        rationale: str = "",
    ):
        self.files = {split: path for split, path in (files or {}).items() if path}
        self.splits = dict(self.files)
        self.keys = {"question": question, "answer": answer, "rationale": rationale}
        self.has_references = bool(rationale)

    def load(self, split, *, data_dir=None, path=None, limit=None):
        """The examples of `split` (`task.files.<split>`, or `path`), the first `limit` when given."""
        setting = f"task.files.{split}"
        path = path or self.files.get(split)
        if not path:
            if split not in SPLITS:
                raise no_split(self.name, split, SPLITS)
            raise SettingError(
                f"{setting} is empty: task 'jsonl' reads its {split!r} split from that file (a "
                f"{', '.join(FORMATS)} file)"
            )
        file = Path(path)
        if not file.is_file():
            raise SettingError(f"{setting}={str(path)!r}: not found")
        if message := file_format_error(split, str(path)):
            raise SettingError(message)
        examples = []
        for where, record in self._records(file):
            examples.append(self.example(record, where, split, len(examples)))
            if limit and len(examples) >= limit:
                break
        return examples

    def _records(self, file: Path) -> Iterator[tuple[str, Any]]:
        builder = FORMATS[file.suffix.lower()]
        if builder is None:
            yield from self.read_records(file)
            return
        try:
            import datasets
        except ImportError as err:
            raise SettingError(f"{file}: reading a {file.suffix} file needs the `datasets` package") from err
        try:
            rows = datasets.load_dataset(builder, data_files=str(file), split="train")
        except Exception as err:  # the builders raise many kinds; the file is what the user can fix
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TaskDataError(f"{file}: cannot be read as {file.suffix} ({first})") from err
        for number, row in enumerate(rows, start=1):
            yield f"{file}: record {number}", dict(row)

    def _field(self, record: dict, name: str, where: str, required: bool = True):
        key, setting = self.keys[name], f"task.fields.{name}"
        if key not in record:
            raise TaskDataError(f"{where}: missing field {key!r} ({setting}); the record has {sorted(record)}")
        value = record[key]
        text_like = isinstance(value, str) or (name == "answer" and isinstance(value, (int, float)))
        if not text_like or isinstance(value, bool):
            expected = "a string or a number" if name == "answer" else "a string"
            raise TaskDataError(f"{where}: field {key!r} ({setting}) should be {expected}, got {type(value).__name__}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        value = str(value).strip()
        if required and not value:
            raise TaskDataError(f"{where}: field {key!r} ({setting}) is empty")
        return value

    def example(self, record: Any, where: str, split: str, index: int) -> Example:
        """The example of one record (`where` is its file and line, for errors)."""
        if not isinstance(record, dict):
            raise TaskDataError(f"{where}: expected an object with the task.fields keys, got {type(record).__name__}")
        question, answer = self._field(record, "question", where), self._field(record, "answer", where)
        target = self._field(record, "rationale", where) if self.has_references else ""
        return Example(id=f"{self.name}-{split}-{index}", question=question, target=target, answer=answer)

    def parse_record(self, record, where, index):
        return self.example(record, where, "", index)

    def extract_answer(self, text):
        raise SettingError("task.name='jsonl' checks answers with task.checker: set it (number, choice, exact, ...)")

    def answers_match(self, predicted, gold):
        raise SettingError("task.name='jsonl' checks answers with task.checker: set it (number, choice, exact, ...)")
