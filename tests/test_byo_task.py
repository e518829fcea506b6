"""Your own task (`task.name=jsonl`) and the answer checkers (`task.checker`).

The checkers on tables of hand-made answers (math-verify's traps: bold, a partial answer to a
multi-answer question, `\\boxed{}` against a plain number, `0.5` against `\\frac{1}{2}`, units and text);
a math-verify check that hangs is counted wrong at its deadline, its worker killed and reaped, the next
check answered by a fresh one, and no child process left after `close`. The JSONL task: records with
custom keys, its errors (file:line, the setting of a missing file), a CSV file; a built-in task with
another checker; `task.without_rationale` (the sampled references, with a stand-in sampler; `skip`). One
`aft-jax pipeline` (VFT, sampling, evaluation) on a JSONL copy of the tiny preset's synthetic questions
with custom keys, which checks every stage ran, the groups' references and the evaluation's question count."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import DEVICES_FLAG, REPO, tiny_cli

from aft_jax.build import Context, task_from_config
from aft_jax.cli import main
from aft_jax.config.load import load_config
from aft_jax.config.spec import RunConfigError
from aft_jax.data.tasks import TaskDataError, format_prompt, get_task, make_checker
from aft_jax.data.tasks.checkers import extract_answer_line
from aft_jax.errors import SettingError

TINY = REPO / "configs" / "tiny.py"
KEYS = ("task.fields.question=problem", "task.fields.answer=gold")


def _children() -> set[int]:
    """The ids of this process's live (or zombie) child processes."""
    pids = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids |= {int(p) for p in (task / "children").read_text().split()}
    return pids


# ---- math-verify --------------------------------------------------------------------------------------------

MATH_VERIFY_CASES = [
    ("The answer is **73**.", "73", True),  # bold around the number
    ("**73**", "73", True),
    ("The answer is 1.", "{1, 2}", False),  # a partial answer to a two-answer question
    ("The answer is 2.", "{1, 2}", False),  # (the gold parsed as plain text would be its last number, 2)
    ("The answer is $\\boxed{2}$.", "1, 2", False),
    ("The answer is $\\boxed{2, 1}$.", "1, 2", True),
    ("The solutions are $\\boxed{(-\\infty, 3)}$", "x < 3", True),  # verify(gold, prediction): not symmetric
    ("So the solutions are $\\boxed{1, 2}$.", "{1, 2}", True),
    ("so we get \\boxed{5}", "5", True),  # boxed prediction, plain gold
    ("The answer is 5", "\\boxed{5}", True),  # plain prediction, boxed gold
    ("0.5", "\\frac{1}{2}", True),
    ("$\\frac{1}{2}$", "0.5", True),
    ("It costs \\$73 in total.", "73", True),  # units and text around the number
    ("She has 73 dollars left.", "73", True),
    ("The answer is 74 apples", "73", False),
    ("The answer is 1,080", "1080", True),
    ("I do not know.", "73", False),
    ("__import__('os').system('echo pwned') \\boxed{3}", "3", True),  # parsed, never run
]


@pytest.fixture(scope="module")
def math_verify():
    checker = make_checker("math_verify", 30.0)
    yield checker
    checker.close()


def test_math_verify_on_its_traps(math_verify):
    wrong = [(t, g) for t, g, right in MATH_VERIFY_CASES if math_verify.is_correct(t, g) is not right]
    assert not wrong, wrong
    # self-consistency votes on extracted answers and matches the vote against the gold
    assert math_verify.extract("so it is $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert math_verify.match("\\frac{1}{2}", "0.5") and not math_verify.match("1", "{1, 2}")
    assert math_verify.extract("no numbers here") is None


def test_a_hanging_check_is_wrong_at_its_deadline_and_leaves_no_process():
    """`9^{9^9}` against 2 makes sympy work for minutes: the check is wrong at the deadline, its worker killed
    and reaped; the next check starts a fresh worker and is right; after close no child is left."""
    checker = make_checker("math_verify", 30.0)
    assert checker.is_correct("\\boxed{2}", "2")  # starts the worker (not a check's time)
    first = checker.worker.process.pid
    checker.worker.timeout_s = 0.3
    began = time.perf_counter()
    assert not checker.is_correct("$9^{9^{9}}$", "2")
    assert time.perf_counter() - began < 1.5 and checker.worker.timeouts == 1
    assert checker.worker.process is None and first not in _children()  # killed and waited for: no zombie
    checker.worker.timeout_s = 30.0
    assert checker.is_correct("The answer is $\\frac{6}{3}$", "2")
    second = checker.worker.process.pid
    assert second != first and second in _children()
    checker.close()
    import multiprocessing

    assert second not in _children() and not multiprocessing.active_children()


# ---- the other checkers -------------------------------------------------------------------------------------

OTHER_CASES = [
    ("number", "so 3 + 4 = 7.\n#### 7", "7", True),
    ("number", "The answer is $1,080.00", "1080", True),
    ("number", "The answer is 7, not 8", "8", False),
    ("number", "no number", "1", False),
    ("choice", "The answer is (C).", "C", True),
    ("choice", "A train leaves. Option B) fits", "B", True),
    ("choice", "The answer is D", "C", False),
    ("exact", "Paris is big.\nThe answer is **Paris**.", "paris", True),
    ("exact", "#### New  York", "new york", True),
    ("exact", "Answer: Lyon\nthen more text", "Lyon", True),
    ("exact", "The answer is Paris, France", "Paris", False),
    ("exact", "", "Paris", False),
]


@pytest.mark.parametrize("name,text,gold,right", OTHER_CASES)
def test_the_number_choice_and_exact_checkers(name, text, gold, right):
    assert make_checker(name).is_correct(text, gold) is right


def test_the_exact_checker_reads_the_answer_line_else_the_last_line():
    assert extract_answer_line("step one\nstep two\n  Berlin  \n") == "Berlin"
    assert extract_answer_line("The answer is: 42 km\nbye") == "42 km"


def test_a_built_in_task_takes_another_checker():
    text, gold = "Half of it: the answer is \\frac{1}{2}", "0.5"
    assert not get_task("gsm8k").is_correct(text, gold)  # GSM8K's own: the number 1
    task = task_from_config(load_config(TINY, ["task.name=gsm8k", "task.checker=math_verify"]))
    try:
        assert task.is_correct(text, gold) and task.name == "gsm8k"
        assert task.extract_for(text, None) == "\\frac{1}{2}" and task.answers_match("\\frac{1}{2}", gold)
    finally:
        task.checker.close()
    exact = task_from_config(load_config(TINY, ["task.name=synthetic", "task.checker=exact"]))
    example = exact.load("train", limit=1)[0]
    assert exact.level(example.target, example) == 3  # ranking levels go through the checker too:
    own = get_task("synthetic", num_train=2000, num_validation=500, num_test=200, seed=0)
    assert own.level(example.target + ".0", example) == 3 and exact.level(example.target + ".0", example) < 3


# ---- the JSONL task -----------------------------------------------------------------------------------------


def _write_synthetic_jsonl(folder: Path, rationale: bool = True, latex_gold: bool = False) -> dict[str, Path]:
    """The tiny preset's synthetic questions (its 32 training and 16 test questions) as JSONL files with the
    keys problem / gold / solution: the same text, so the tokenizer the run trains is the preset's. With
    `latex_gold` the gold answer n is written MATH-style, `\\frac{2n}{2}`."""
    synthetic = get_task("synthetic", num_train=2000, num_validation=500, num_test=16, seed=0)
    files = {}
    for split, count in (("train", 32), ("test", 16)):
        files[split] = folder / f"{split}.jsonl"
        with files[split].open("w") as f:
            for e in synthetic.load(split, limit=count):
                gold = f"\\frac{{{2 * int(e.answer)}}}{{2}}" if latex_gold else int(e.answer)
                record = {"problem": e.question, "gold": gold}
                f.write(json.dumps(record | ({"solution": e.target} if rationale else {})) + "\n")
    return files


def test_jsonl_records_with_custom_keys_and_their_errors(tmp_path):
    files = _write_synthetic_jsonl(tmp_path)
    task = get_task(
        "jsonl", files={"train": str(files["train"])}, question="problem", answer="gold", rationale="solution"
    )
    examples = task.load("train", limit=5)
    assert len(examples) == 5 and examples[0].id == "jsonl-train-0" and examples[0].target.endswith(examples[0].answer)
    assert task.has_references and not get_task("jsonl", files={"train": "x.jsonl"}).has_references
    lines = files["train"].read_text().splitlines()
    cases = {
        "{not json": r"bad\.jsonl:3: invalid JSON",
        json.dumps({"gold": 3, "solution": "#### 3"}): r"bad\.jsonl:3: missing field 'problem' \(task\.fields\.question\)",
        json.dumps({"problem": 7, "gold": 3, "solution": "s"}): r"bad\.jsonl:3: field 'problem' .* should be a string, got int",
        json.dumps({"problem": "q", "gold": True, "solution": "s"}): r"bad\.jsonl:3: field 'gold' .* a string or a number, got bool",
        json.dumps([1, 2]): r"bad\.jsonl:3: expected an object with the task\.fields keys, got list",
    }  # fmt: skip
    for line, message in cases.items():
        (tmp_path / "bad.jsonl").write_text("\n".join([*lines[:2], line, *lines[2:]]) + "\n")
        with pytest.raises(TaskDataError, match=message):
            task.load("train", path=tmp_path / "bad.jsonl")
    with pytest.raises(SettingError, match=r"^task\.files\.test is empty"):
        task.load("test")
    missing = get_task("jsonl", files={"train": str(tmp_path / "absent.jsonl")})
    with pytest.raises(SettingError, match=r"^task\.files\.train='.*absent\.jsonl': not found$"):
        missing.load("train")


def test_the_jsonl_settings_are_checked_at_load():
    base = ["task.name=jsonl", "task.files.train=train.jsonl"]
    with pytest.raises(RunConfigError, match=r"^task\.checker is empty: task\.name='jsonl' has no checker of its own"):
        load_config(TINY, base)
    with pytest.raises(RunConfigError, match=r"^task\.files\.test='test\.txt': expected a \.jsonl, \.json, \.csv"):
        load_config(TINY, [*base, "task.checker=exact", "task.files.test=test.txt"])
    with pytest.raises(RunConfigError, match=r"^task\.fields\.question is empty"):
        load_config(TINY, [*base, "task.checker=exact", "task.fields.question="])
    config = load_config(TINY, [*base, "task.checker=exact"])
    assert (config.task.fields.question, config.task.fields.answer, config.task.fields.rationale) == (
        "question",
        "answer",
        "",
    )
    assert (config.task.checker_timeout, config.task.without_rationale) == (5.0, "sampled")


def test_a_csv_file_is_read_through_datasets(tmp_path):
    (tmp_path / "train.csv").write_text('problem,gold\n"What is 1 + 1?",2\n"What is 2 + 5?",7\n')
    task = get_task("jsonl", files={"train": str(tmp_path / "train.csv")}, question="problem", answer="gold")
    assert [(e.question, e.answer, e.target) for e in task.load("train")] == [
        ("What is 1 + 1?", "2", ""),
        ("What is 2 + 5?", "7", ""),
    ]
    (tmp_path / "other.csv").write_text("question,gold\nq,2\n")
    with pytest.raises(TaskDataError, match=r"other\.csv: record 1: missing field 'problem'"):
        task.load("train", path=tmp_path / "other.csv")


def _error_line(argv: list[str], capsys, monkeypatch) -> str:
    for name in ("AFT_DEBUG", "AFT_COORDINATOR", "AFT_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and "Traceback" not in err and lines[-1].startswith(f"aft-jax {argv[0]}: "), err
    return lines[-1]


def test_the_command_line_names_the_file_and_line_or_the_setting(tmp_path, capsys, monkeypatch):
    files = _write_synthetic_jsonl(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(files["train"].read_text().splitlines()[:3] + ['{"problem": "q"}']) + "\n")

    def vft(train: str, *more: str) -> list[str]:
        head = ["vft", "--config", str(TINY), f"--config.run_dir={tmp_path / 'run'}", "--config.task.name=jsonl"]
        return head + [f"--config.{o}" for o in (f"task.files.train={train}", *KEYS, "task.checker=number", *more)]

    line = _error_line(vft(str(bad), "task.fields.rationale=solution"), capsys, monkeypatch)
    assert re.search(r"bad\.jsonl:4: missing field 'gold' \(task\.fields\.answer\)", line), line
    line = _error_line(vft(str(tmp_path / "absent.jsonl")), capsys, monkeypatch)
    assert re.search(r"task\.files\.train='.*absent\.jsonl': not found$", line), line
    line = _error_line(vft(str(files["train"]), "task.without_rationale=skip"), capsys, monkeypatch)
    assert "task.fields.rationale is empty and task.without_rationale='skip'" in line, line


# ---- without reference rationales ---------------------------------------------------------------------------


class RightForEvenQuestions:
    """A stand-in sampler: for the even-numbered questions (`every` other; 0: none) one of its `num_samples`
    chains has the right answer (the second), for the others none."""

    def __init__(self, examples, every: int = 2, template="plain"):
        self.answers = {format_prompt(e.question, template): (i, e.answer) for i, e in enumerate(examples)}
        self.every = every

    def sample(self, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, num_samples=1, seed=0):
        out = []
        for prompt in prompts:
            i, answer = self.answers[prompt]
            wrong = [f"I guess {n}.\n#### {int(answer) + n + 1}" for n in range(num_samples)]
            right = self.every and i % self.every == 0
            out.append(wrong[:1] + [f"so it is {answer}\n#### {answer}"] + wrong[2:] if right else wrong)
        return out


def test_sampled_references_keep_accepted_chains_and_drop_the_rest(tmp_path):
    from aft_jax.pipeline import PipelineContext, sample_references

    files = _write_synthetic_jsonl(tmp_path, rationale=False)
    overrides = ["task.name=jsonl", f"task.files.train={files['train']}", *KEYS, "task.checker=number"]
    config = load_config(TINY, [*overrides, f"run_dir={tmp_path / 'run'}"])
    assert config.task.without_rationale == "sampled"  # the default
    ctx = PipelineContext.of(config)
    examples = ctx.examples("train")
    assert len(examples) == 32 and not any(e.target for e in examples)
    pairs = sample_references(ctx, ctx.run_dir / "groups", sampler=RightForEvenQuestions(examples))
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert [r["id"] for r in records] == [e.id for e in examples[::2]]
    assert all(r["target"].endswith(f"#### {e.answer}") for r, e in zip(records, examples[::2]))
    counts = json.loads((ctx.run_dir / "groups" / "vft_references.json").read_text())
    assert (counts["accepted"], counts["dropped"], counts["samples_per_question"]) == (16, 16, 3)
    with_references = ctx.examples("train")  # the accepted chains are the questions' references from now on
    assert [e.target for e in with_references[::2]] == [r["target"] for r in records]
    assert not any(e.target for e in with_references[1::2])
    with pytest.raises(SettingError, match=r"task\.without_rationale='sampled': none of .* 3 samples per question"):
        sample_references(Context(config, ctx.task), tmp_path / "none", sampler=RightForEvenQuestions(examples, 0))


def test_skip_exports_the_starting_model_as_the_vft_model(tmp_path):
    from aft_jax.pipeline import PipelineContext, train_vft, vft_data

    files = _write_synthetic_jsonl(tmp_path, rationale=False)
    overrides = ["task.name=jsonl", f"task.files.train={files['train']}", *KEYS, "task.checker=number"]
    config = load_config(TINY, [*overrides, "task.without_rationale=skip", f"run_dir={tmp_path / 'run'}"])
    ctx = PipelineContext.of(config)
    assert vft_data(ctx) == "nothing: the starting model is the VFT model (task.without_rationale=skip)"
    train_vft(ctx)
    assert ctx.model_done("vft") and not (ctx.run_dir / "vft" / "metrics.jsonl").exists()


def test_math_verify_labels_the_sampled_groups_and_grades_the_evaluation(tmp_path):
    """The sampling stage (`sample_candidates`, unscored) and the evaluation's greedy accuracy on a JSONL task
    with LaTeX answers and no rationales, checked by math-verify."""
    from aft_jax.data.groups import read_groups
    from aft_jax.pipeline import Unscored
    from aft_jax.stages.evaluate import greedy_correct
    from aft_jax.stages.sample import sample_candidates

    records = [("Half of 1?", "\\frac{1}{2}"), ("Roots of (x-1)(x-2)?", "{1, 2}"), ("Price?", "73")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in records))
    config = load_config(
        TINY,
        ["task.name=jsonl", f"task.files.train={tmp_path / 'train.jsonl'}", "task.fields.question=q",
         "task.fields.answer=a", "task.checker=math_verify", "sample.k=3"],
    )  # fmt: skip
    task = task_from_config(config)
    examples = task.load("train")
    completions = {
        "Half of 1?": ["It is $0.5$.", "The answer is **0.5**", "\\boxed{2}"],
        "Roots of (x-1)(x-2)?": ["The roots are $\\boxed{1, 2}$", "The answer is 1.", "x = 2"],
        "Price?": ["It costs \\$73 in total.", "73 dollars", "The answer is 37"],
    }

    class Canned:
        def sample(self, prompts, *, max_new_tokens, temperature=0.0, num_samples=1, **_):
            by_prompt = {format_prompt(q, "plain"): completions[q] for q, _ in records}
            return [by_prompt[p][:num_samples] for p in prompts]

    def tokenizer(text, add_special_tokens=False):
        return {"input_ids": text.split()}

    try:
        out = sample_candidates(
            Canned(), Unscored(tokenizer), task, examples, tmp_path / "groups", settings=config.sample,
            template="plain", seed=0,
        )  # fmt: skip
        groups = read_groups(out)
        assert [[c.correct for c in g.candidates] for g in groups] == [
            [True, True, False],
            [True, False, False],
            [True, True, False],
        ]
        assert not any(c.reference for g in groups for c in g.candidates)  # no rationale: no reference candidate
        _, correct = greedy_correct(Canned(), task, examples, template="plain", max_new_tokens=8)
        assert correct == [True, True, True]
    finally:
        task.checker.close()


# ---- end to end ---------------------------------------------------------------------------------------------


def _env():
    """One plain CPU device (sharding is tested elsewhere); XLA's cheap compilation, as the session's (each
    program runs a few times only)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICES_FLAG))
    return env


def test_a_jsonl_task_runs_through_the_pipeline(tmp_path):
    """A MATH-style JSONL task (LaTeX gold answers) through the pipeline with the math_verify checker: every
    sampled candidate's label is math-verify's own verdict on it."""
    from math_verify import parse, verify

    files = _write_synthetic_jsonl(tmp_path, latex_gold=True)
    run_dir = tmp_path / "run"
    overrides = [
        "task.name=jsonl",
        f"task.files.train={files['train']}",
        f"task.files.test={files['test']}",
        *KEYS,
        "task.fields.rationale=solution",
        "task.checker=math_verify",
        "pipeline.methods=",  # an alignment run reads the groups, not the task: its stage is tested elsewhere
    ]
    result = subprocess.run(tiny_cli("pipeline", run_dir, *overrides), capture_output=True, text=True, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert list(stages) == ["tokenizer", "vft", "sample_train", "sample_eval", "eval"]
    assert all(s["status"] == "done" for s in stages.values())
    assert stages["vft"]["trained_on"] == "the reference chains of thought of task jsonl"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {name: row["questions"] for name, row in metrics.items()} == {"vft": 16}
    groups = [json.loads(line) for f in sorted((run_dir / "groups" / "train").glob("*.jsonl")) for line in open(f)]
    assert len(groups) == 32 and all(g["candidates"][0]["reference"] and g["candidates"][0]["correct"] for g in groups)
    for g in groups:
        for c in g["candidates"][1:]:
            assert c["correct"] == bool(
                verify(parse(f"\\boxed{{{g['answer']}}}"), parse(c["text"].replace("**", "")))
            ), c
    assert "VFT trained on the reference chains of thought of task jsonl." in (run_dir / "report.md").read_text()
