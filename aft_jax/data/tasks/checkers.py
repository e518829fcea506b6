"""Answer checkers a task can use instead of its own (`task.checker`): `number`, `choice`, `exact` and
`math_verify`. A checker extracts an answer from a completion and matches it against the gold answer,
parsing text only (never evaluating it).

- `number`: GSM8K's rule (the number after the last `####`, else after the last "The answer is", else the
  last number; equal as numbers, so `18.00` is `18` and `1,080` is `1080`).
- `choice`: an option letter A-E in the spellings of `choice.extract_option_letter`.
- `exact`: the answer line (the text after the last `####`, "The answer is" or "Answer:" to the end of its
  line, else the last non-empty line), normalised (`normalise_answer`), equal to the normalised gold.
- `math_verify`: Hugging Face's math-verify (`parse`, then `verify(gold, prediction)`: the gold first, the
  comparison is not symmetric). The gold is parsed as `\\boxed{gold}` (so `1, 2` is the set {1, 2}, not its
  last number), the completion with math-verify's LaTeX and expression extraction (`\\boxed{}` first) after
  bold markers and escaped dollars are removed (`verify_worker.py`). Every call runs in one persistent
  worker process (`VerifyWorker`) with a deadline of `task.checker_timeout` seconds: a check past it is
  counted wrong, the worker is killed (and waited for, so no zombie is left) and started again for the next
  check. math-verify's own timeout (`signal.alarm`) works only in a main thread; this one works in any.

`make_checker(name, timeout_s)` builds one; the pure functions here and in `verify_worker.py` are what
the checkers run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import select
import subprocess
import sys
import weakref
from typing import Callable

from aft_jax.data.tasks.base import numbers_equal
from aft_jax.data.tasks.choice import extract_option_letter
from aft_jax.data.tasks.gsm8k import extract_number_answer
from aft_jax.errors import SettingError

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 60.0  # the worker's import of math-verify: not counted in a check's time


# ---- exact -----------------------------------------------------------------------------------------------

ANSWER_MARKER = re.compile(r"####|\banswer\s*(?:is\b|:)", re.IGNORECASE)
EMPHASIS = re.compile(r"[*_`]+")


def extract_answer_line(text: str) -> str | None:
    """The rest of the line after the last `####`, "answer is" or "answer:"; else the last non-empty line."""
    for match in reversed(list(ANSWER_MARKER.finditer(text))):
        rest = text[match.end() :].split("\n", 1)[0].strip(" \t:")
        if rest:
            return rest
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def normalise_answer(text: str) -> str:
    """Lower case, markdown emphasis (`**`, `_`, backticks) removed, whitespace collapsed, surrounding quotes
    and trailing punctuation (`.`, `,`, `;`, `:`, `!`) stripped."""
    text = " ".join(EMPHASIS.sub("", text).split()).lower()
    return text.strip("\"'").rstrip(".,;:!").strip().strip("\"'")


def exact_match(predicted: str, gold: str) -> bool:
    return normalise_answer(predicted) == normalise_answer(gold)


def choice_match(predicted: str, gold: str) -> bool:
    return predicted.strip().upper() == gold.strip().upper()


# ---- the worker process ----------------------------------------------------------------------------------


def _stop(state: dict, graceful: bool = True) -> None:
    """Ends the worker in `state` (closing its input when `graceful`, so that it exits; else, or when it does
    not within a second, killing it) and waits for it, so that it leaves no zombie; idempotent."""
    proc = state.pop("proc", None)
    if proc is None:
        return
    try:
        proc.stdin.close()
    except OSError:
        pass
    if graceful:
        try:
            proc.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


class VerifyWorker:
    """One persistent worker process (`verify_worker.py` under `python -I`: the standard library and
    math-verify only, so it starts in about a second and re-imports nothing of the caller), started at the
    first call. `call(op, *args)` returns `(True, result)`, or `(False, why)` when the call raised, the worker
    died or `timeout_s` passed: then the worker is killed, waited for (no zombie) and started again at the
    next call. `close()` ends it; so does the exit of this process (and the worker ends by itself when its
    input closes, should this process be killed)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.timeouts = 0
        self._state: dict = {}
        weakref.finalize(self, _stop, self._state)

    @property
    def process(self) -> subprocess.Popen | None:
        return self._state.get("proc")

    def _start(self) -> None:
        from aft_jax.data.tasks import verify_worker

        proc = subprocess.Popen(
            [sys.executable, "-I", verify_worker.__file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self._state["proc"] = proc
        status = self._read(STARTUP_TIMEOUT_S)
        if status is None or status[0] != "ready":
            _stop(self._state, graceful=False)
            raise RuntimeError(
                "the math-verify worker did not start (is math-verify installed? pip install 'aft_jax[verify]')"
            )

    def _read(self, timeout_s: float):
        """The worker's next reply, or None at the deadline or when its output closed."""
        out = self.process.stdout
        if not select.select([out], [], [], timeout_s)[0]:
            return None
        line = out.readline()
        return json.loads(line) if line else None

    def call(self, op: str, *args) -> tuple[bool, object]:
        if self.process is None or self.process.poll() is not None:
            _stop(self._state, graceful=False)
            self._start()
        try:
            self.process.stdin.write(json.dumps([op, args]) + "\n")
            self.process.stdin.flush()
        except OSError:
            _stop(self._state, graceful=False)
            return False, "the worker died"
        reply = self._read(self.timeout_s)
        if reply is None:
            timed_out = self.process.poll() is None
            _stop(self._state, graceful=False)  # kills a stuck check; the next call starts a fresh worker
            if not timed_out:
                return False, "the worker died"
            self.timeouts += 1
            log.warning(
                "math_verify: a check passed task.checker_timeout=%gs and counts as wrong (%d so far)",
                self.timeout_s,
                self.timeouts,
            )
            return False, "timeout"
        status, value = reply
        return status == "ok", value

    def close(self) -> None:
        _stop(self._state)


# ---- checkers --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checker:
    """`extract(text) -> answer or None` and `match(answer, gold) -> bool`; `is_correct` is both."""

    name: str
    extract: Callable[[str], str | None]
    match: Callable[[str, str], bool]

    def is_correct(self, text: str, gold: str) -> bool:
        predicted = self.extract(text)
        return predicted is not None and self.match(predicted, gold)

    def close(self) -> None:
        pass


class MathVerifyChecker(Checker):
    """math-verify in a `VerifyWorker`; a call that fails or times out is a wrong (or no) answer. Results are
    kept for the last `CACHE` distinct questions asked (a sampled candidate is checked for its label and its
    level)."""

    CACHE = 1 << 16

    def __init__(self, timeout_s: float):
        worker = VerifyWorker(timeout_s)
        object.__setattr__(self, "worker", worker)
        object.__setattr__(self, "_cache", {})
        super().__init__("math_verify", self._extract, self._match)

    def _ask(self, op: str, *args):
        cache = self._cache
        key = (op, *args)
        if key not in cache:
            ok, value = self.worker.call(op, *args)
            if len(cache) >= self.CACHE:
                cache.clear()
            cache[key] = value if ok else None
        return cache[key]

    def _extract(self, text: str) -> str | None:
        return self._ask("extract", text)

    def _match(self, predicted: str, gold: str) -> bool:
        return bool(self._ask("match", predicted, gold))

    def is_correct(self, text: str, gold: str) -> bool:
        return bool(self._ask("check", text, gold))

    def close(self) -> None:
        self.worker.close()


CHECKERS: dict[str, Callable[[float], Checker]] = {
    "number": lambda timeout_s: Checker("number", extract_number_answer, numbers_equal),
    "choice": lambda timeout_s: Checker("choice", extract_option_letter, choice_match),
    "exact": lambda timeout_s: Checker("exact", extract_answer_line, exact_match),
    "math_verify": MathVerifyChecker,
}


def math_verify_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("math_verify") is None


def make_checker(name: str, timeout_s: float = 5.0) -> Checker:
    """The checker `name` (`CHECKERS`), calls past `timeout_s` seconds counted wrong (math_verify)."""
    if name not in CHECKERS:
        raise SettingError(f"task.checker={name!r}: expected one of {', '.join(CHECKERS)}")
    if name == "math_verify" and math_verify_missing():
        raise SettingError(
            "task.checker='math_verify' needs the math-verify package: pip install 'aft_jax[verify]' (or math-verify)"
        )
    return CHECKERS[name](timeout_s)
