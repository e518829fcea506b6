"""Tasks behind one interface (see `base.Task`): gsm8k, gsm8k_rank, aqua_rat, ecqa, synthetic, mix, and jsonl (your
own files); answer checkers a task can use instead of its own (`checkers.CHECKERS`)."""

from aft_jax.data.tasks.aqua_rat import AquaRat
from aft_jax.data.tasks.base import TEMPLATES, Example, Task, TaskDataError, format_prompt
from aft_jax.data.tasks.checkers import CHECKERS, Checker, make_checker
from aft_jax.data.tasks.ecqa import ECQA
from aft_jax.data.tasks.gsm8k import GSM8K
from aft_jax.data.tasks.gsm8k_rank import GSM8KRank
from aft_jax.data.tasks.jsonl import JsonlTask
from aft_jax.data.tasks.mix import Mix
from aft_jax.data.tasks.synthetic import Synthetic
from aft_jax.errors import SettingError

TASKS = {cls.name: cls for cls in (GSM8K, GSM8KRank, AquaRat, ECQA, Synthetic, Mix, JsonlTask)}


def get_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise SettingError(f"task.name={name!r}: expected one of {', '.join(sorted(TASKS))}")
    return TASKS[name](**options)


__all__ = [
    "CHECKERS",
    "TASKS",
    "TEMPLATES",
    "Checker",
    "Example",
    "Task",
    "TaskDataError",
    "format_prompt",
    "get_task",
    "make_checker",
]
