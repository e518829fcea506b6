"""synthetic (ours): multi-step arithmetic word problems generated from a seed, with no files.

A start amount and 2-3 events (buy boxes of items, give away, find, eat). The events commute, so any
order of the steps is a valid chain of thought; each reference solution uses its own seeded order, one
line per step (`a + b = c`), then `#### N`. Running totals never go negative in any order.
"""

from __future__ import annotations

import random

from aft_jax.tasks.base import Example
from aft_jax.tasks.gsm8k import GSM8K

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon"]
ITEMS = ["apples", "pens", "cards", "shells", "stamps", "marbles", "books", "coins"]
SPLIT_SEEDS = {"train": 0, "test": 1_000_003}


def make_problem(rng: random.Random) -> tuple[str, list[str], int, list[str]]:
    """`(question, reference steps, answer, all step lines of this problem)` for one problem."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(5, 12)
    events = []
    for _ in range(rng.randint(2, 3)):
        kind = rng.choice(["buy", "give", "find"])
        if kind == "buy":
            boxes, each = rng.randint(2, 3), rng.randint(2, 5)
            events.append((f"buys {boxes} boxes with {each} {item} in each box", boxes * each, f"{boxes} * {each}"))
        elif kind == "give":
            events.append((f"gives away {(d := rng.randint(1, 4))} {item}", -d, None))
        else:
            events.append((f"finds {(e := rng.randint(1, 6))} more {item}", e, None))
    story = ". ".join(f"Then {name} {text}" if k else f"{name} {text}" for k, (text, _, _) in enumerate(events))
    question = f"{name} has {start} {item}. {story}. How many {item} does {name} have now?"
    order = list(range(len(events)))
    rng.shuffle(order)
    steps, total = [], start
    for k in order:
        _, delta, product = events[k]
        if product:
            steps.append(f"{product} = {delta}")
        sign = "+" if delta >= 0 else "-"
        steps.append(f"{total} {sign} {abs(delta)} = {total + delta}")
        total += delta
    return question, steps, total, [text for text, _, _ in events]


class Synthetic(GSM8K):
    name = "synthetic"
    splits = {"train": "", "test": ""}
    hub_name = ""

    def __init__(self, num_train: int = 2000, num_test: int = 200, seed: int = 0):
        self.sizes = {"train": num_train, "test": num_test}
        self.seed = seed

    def load(self, split, *, data_dir=None, path=None, limit=None):
        if split not in self.sizes:
            raise ValueError(f"task synthetic has no split {split!r}; splits: {sorted(self.sizes)}")
        rng = random.Random(self.seed * 7919 + SPLIT_SEEDS[split])
        count = min(limit, self.sizes[split]) if limit else self.sizes[split]
        examples = []
        for index in range(count):
            question, steps, answer, _ = make_problem(rng)
            examples.append(
                Example(
                    id=f"synthetic-{split}-{index}",
                    question=question,
                    target="\n".join(steps) + f"\n#### {answer}",
                    answer=str(answer),
                    meta={"solution": "\n".join(steps)},
                )
            )
        return examples
