"""math-verify's answer checks as pure functions, and the worker process that runs them (`python -I
verify_worker.py`: it imports only the standard library and math-verify, never this package).

The worker reads one JSON request a line on stdin, `[op, args]` with `op` one of `WORKER_OPS`, and writes
one JSON line on stdout, `["ok", result]` or `["error", message]`; it first writes `["ready", null]`, and
ends at end of input. The caller (`checkers.VerifyWorker`) owns the deadline and kills a stuck worker.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys

BOLD = re.compile(r"\*\*|__")


def prepare_prediction(text: str) -> str:
    """A completion as math-verify reads it: bold markers dropped (`**73**` -> `73`) and escaped dollars
    (`\\$73`, a price) made plain, so that neither hides or splits the number."""
    return BOLD.sub("", text).replace("\\$", "")


def gold_latex(gold: str) -> str:
    """An answer as LaTeX that math-verify parses whole: `\\boxed{gold}` (so `1, 2` is the set {1, 2}, not
    its last number)."""
    return f"\\boxed{{{gold.strip()}}}"


def _parse(text: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)


def parse_answer(answer: str):
    """An answer on its own (a gold answer, or one `mv_extract` gave): `\\boxed{answer}`, else plain text."""
    return _parse(gold_latex(answer)) or _parse(answer)


def mv_extract(text: str) -> str | None:
    """The answer math-verify extracts from a completion (`\\boxed{}` first), as text, or None."""
    parsed = _parse(prepare_prediction(text))
    return str(parsed[-1]) if parsed else None


def mv_check(text: str, gold: str) -> bool:
    """Whether a completion's answer equals the gold: `verify(gold, prediction)`, the gold first."""
    from math_verify import verify

    prediction = _parse(prepare_prediction(text))
    return bool(prediction) and bool(verify(parse_answer(gold), prediction, timeout_seconds=None))


def mv_match(predicted: str, gold: str) -> bool:
    """Whether an extracted answer (`mv_extract`'s) equals the gold."""
    from math_verify import verify

    prediction = parse_answer(predicted)
    return bool(prediction) and bool(verify(parse_answer(gold), prediction, timeout_seconds=None))


WORKER_OPS = {"extract": mv_extract, "check": mv_check, "match": mv_match}


def serve() -> None:
    """The worker's loop (see the module docstring). Anything else printed goes to stderr, so the protocol
    on stdout stays whole."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": the deadline is the caller's
    mv_check("\\boxed{\\frac{1}{2}}", "0.5")  # loads the parsers now: a check's deadline is for the check

    def reply(*message) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    reply("ready", None)
    for line in sys.stdin:
        op, args = json.loads(line)
        try:
            reply("ok", WORKER_OPS[op](*args))
        except Exception as err:  # a check that fails is a wrong answer, not a crash of the stage
            reply("error", f"{type(err).__name__}: {err}")


if __name__ == "__main__":
    serve()
