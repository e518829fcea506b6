"""Candidate groups: the groups file and VFT pairs file, parsed with errors that name file:line.

Groups file (JSONL; a file or a folder of `*.jsonl` shards read in name order), one question a line:

    {"id": "gsm8k-train-17", "prompt": "<formatted prompt>", "answer": "72",
     "candidates": [{"text": "<completion, no EOS>", "correct": true, "level": 3, "reference": true,
                     "logp_sum": -12.3, "logp_mean": -0.41}, ...]}

`level` defaults to `int(correct)`; `reference` to false; `logp_sum` / `logp_mean` (the sampling
model's scores, DPO's reference) to null. A VFT pairs file has `{"prompt", "target"}` (and optionally
`"id"`) a line and reads as groups with the target as the only (reference) candidate.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterator

from aft_jax.errors import UserError
from aft_jax.io.paths import Path


class DataError(UserError, ValueError):
    """A malformed data line; the message starts with `file:line:`."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    text: str
    correct: bool
    level: int
    reference: bool = False
    logp_sum: float | None = None
    logp_mean: float | None = None


@dataclasses.dataclass(frozen=True)
class Group:
    id: str
    prompt: str
    answer: str
    candidates: tuple[Candidate, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "prompt": self.prompt,
                "answer": self.answer,
                "candidates": [dataclasses.asdict(c) for c in self.candidates],
            },
            ensure_ascii=False,
        )


def _data_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise DataError(f"{path}: folder holds no *.jsonl files")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return [path]


def _records(path: str | Path) -> Iterator[tuple[str, dict]]:
    for file in _data_files(path):
        with file.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from err
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                yield where, record


def _field(record: dict, key: str, kind, where: str, default=dataclasses.MISSING):
    if key not in record or record[key] is None:
        if default is dataclasses.MISSING:
            raise DataError(f"{where}: missing field {key!r}")
        return default
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise DataError(f"{where}: field {key!r} should be {expected}, got {type(value).__name__}")
    return value


def read_groups(path: str | Path) -> list[Group]:
    """Parses a groups file (or folder of shards); a malformed line raises DataError naming file:line."""
    groups = []
    for where, record in _records(path):
        raw = _field(record, "candidates", list, where)
        candidates = []
        for k, c in enumerate(raw):
            at = f"{where}: candidates[{k}]"
            if not isinstance(c, dict):
                raise DataError(f"{at}: expected an object")
            correct = _field(c, "correct", bool, at)
            candidates.append(
                Candidate(
                    text=_field(c, "text", str, at),
                    correct=correct,
                    level=_field(c, "level", int, at, int(correct)),
                    reference=_field(c, "reference", bool, at, False),
                    logp_sum=_field(c, "logp_sum", float, at, None),
                    logp_mean=_field(c, "logp_mean", float, at, None),
                )
            )
        groups.append(
            Group(
                id=str(_field(record, "id", (str, int), where)),
                prompt=_field(record, "prompt", str, where),
                answer=str(_field(record, "answer", (str, int, float), where, "")),
                candidates=tuple(candidates),
            )
        )
    return groups


def read_pairs(path: str | Path) -> list[Group]:
    """A VFT pairs file (`prompt`, `target`) as single-candidate groups."""
    groups = []
    for index, (where, record) in enumerate(_records(path)):
        target = _field(record, "target", str, where)
        groups.append(
            Group(
                id=str(record.get("id", index)),
                prompt=_field(record, "prompt", str, where),
                answer=str(record.get("answer", "")),
                candidates=(Candidate(target, correct=True, level=1, reference=True),),
            )
        )
    return groups


def read_training_file(path: str | Path) -> list[Group]:
    """Groups or pairs, told apart by the first record's fields."""
    for where, record in _records(path):
        if "candidates" in record:
            return read_groups(path)
        if "target" in record:
            return read_pairs(path)
        raise DataError(f"{where}: expected a group ('candidates') or a pair ('target') record")
    raise DataError(f"{path}: empty")
