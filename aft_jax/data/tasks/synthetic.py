"""synthetic (ours): short multi-step arithmetic word problems generated from a seed, with no files.

A start amount and two events (buy boxes of items, give some away, find some). The events commute, so
any order of the steps is a valid chain of thought; each reference solution uses its own seeded order,
one line per step (`a * b = c` for a purchase, then `t + c = t'`), then `#### N`. Running totals never go
negative in any order. Splits `train`, `validation` and `test` are drawn from separate seeds and share no
question.

Levels for ranking feedback: 3 correct answer; 2 wrong answer but at least half as many right steps as
the reference has (a right step is a true equation that applies one of the question's events, each once:
`b * e` for a purchase, `t + x` for a find or a purchase's total, `t - x` for a gift); 1 a wrong answer
with fewer right steps; 0 no answer.

The space is small: about 1,100 problems differ in their numbers (names and items aside), so most test
questions share their arithmetic with some training question; they are disjoint only as text.
"""

from __future__ import annotations

import random
import re

from aft_jax.data.tasks.base import Example, no_split
from aft_jax.data.tasks.gsm8k import GSM8K
from aft_jax.errors import SettingError

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon"]
ITEMS = ["apples", "pens", "cards", "shells", "stamps", "marbles", "books", "coins"]
SPLIT_SEEDS = {"train": 0, "validation": 500_009, "test": 1_000_003}
STEP = re.compile(r"^\s*(\d+)\s*([-+*])\s*(\d+)\s*=\s*(-?\d+)\s*$")


def make_problem(rng: random.Random) -> tuple[str, list[str], int, dict]:
    """`(question, reference steps, answer, events)` for one problem; `events` maps `"buy"` to the
    `(boxes, each)` pairs, `"find"` and `"give"` to the amounts."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(2, 9)
    events, phrases, budget = [], [], start
    for _ in range(2):
        kind = rng.choice(["buy", "give", "find"] if budget else ["buy", "find"])
        if kind == "buy":
            boxes, each = 2, rng.randint(2, 4)
            events.append(("buy", (boxes, each)))
            phrases.append(f"{name} buys {boxes} boxes of {each} {item}")
        elif kind == "give":
            amount = rng.randint(1, min(4, budget))
            budget -= amount
            events.append(("give", amount))
            phrases.append(f"{name} gives away {amount}")
        else:
            events.append(("find", amount := rng.randint(1, 5)))
            phrases.append(f"{name} finds {amount} more")
    question = f"{name} has {start} {item}. " + ". ".join(phrases) + f". How many {item} does {name} have?"
    rng.shuffle(order := list(range(len(events))))
    steps, total = [], start
    for k in order:
        kind, value = events[k]
        if kind == "buy":
            delta = value[0] * value[1]
            steps.append(f"{value[0]} * {value[1]} = {delta}")
        else:
            delta = value if kind == "find" else -value
        steps.append(f"{total} {'+' if delta >= 0 else '-'} {abs(delta)} = {total + delta}")
        total += delta
    grouped = {kind: [v for k, v in events if k == kind] for kind in ("buy", "find", "give")}
    return question, steps, total, grouped


def right_steps(text: str, events: dict) -> int:
    """The lines of `text` that are true equations applying one of the question's events, each event
    counted once (a purchase twice: its product, then adding it)."""
    unused = {
        "*": [tuple(v) for v in events["buy"]],
        "+": list(events["find"]) + [b * e for b, e in events["buy"]],
        "-": list(events["give"]),
    }
    count = 0
    for line in text.splitlines():
        match = STEP.match(line)
        if not match:
            continue
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        key = (a, b) if op == "*" else b
        if c == {"*": a * b, "+": a + b, "-": a - b}[op] and key in unused[op]:
            unused[op].remove(key)
            count += 1
    return count


class Synthetic(GSM8K):
    name = "synthetic"
    splits = {"train": "", "validation": "", "test": ""}
    hub_name = ""

    def __init__(self, num_train: int = 2000, num_test: int = 200, seed: int = 0, num_validation: int = 500):
        self.sizes = {"train": num_train, "validation": num_validation, "test": num_test}
        self.seed = seed

    def _generate(self, split: str, count: int, exclude: set[str]) -> list[Example]:
        rng = random.Random(self.seed * 7919 + SPLIT_SEEDS[split])
        examples, repeats = [], 0
        while len(examples) < count:
            question, steps, answer, events = make_problem(rng)
            if question in exclude:
                repeats += 1
                if repeats > 100 * count:
                    raise SettingError(
                        f"task.synthetic_{split}={count}: cannot draw that many new synthetic questions (too few "
                        "distinct ones); expected a smaller size"
                    )
                continue
            exclude.add(question)
            examples.append(
                Example(
                    id=f"synthetic-{split}-{len(examples)}",
                    question=question,
                    target="\n".join(steps) + f"\n#### {answer}",
                    answer=str(answer),
                    meta={"solution": "\n".join(steps), "events": events},
                )
            )
        return examples

    def load(self, split, *, data_dir=None, path=None, limit=None):
        """The first `limit` questions of `split`; a later split in train, validation, test never repeats
        a question of an earlier one (each is generated whole, so limits do not change the questions)."""
        if split not in self.sizes:
            raise no_split(self.name, split, self.sizes)
        seen: set[str] = set()
        for name in SPLIT_SEEDS:
            examples = self._generate(name, self.sizes[name], seen)
            if name == split:
                return examples[:limit] if limit else examples
        raise AssertionError(split)

    def level(self, text, example):
        reference_steps = len(example.meta["solution"].splitlines())
        return self.graded_level(text, example, lambda t: 2 * right_steps(t, example.meta["events"]) >= reference_steps)
