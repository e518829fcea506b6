"""Answer extraction and checking on a table of tricky cases, and every task's real data loading: the few
real records of every file in tests/data always, the full files when $AFT_DATA_DIR names them."""

import json

import pytest

from aft_jax.data.tasks import Example, format_prompt, get_task
from aft_jax.data.tasks.choice import extract_option_letter
from aft_jax.data.tasks.gsm8k import extract_number_answer

NUMBER_CASES = [
    ("so she has 5 + 3 = 8 apples.\n#### 8", "8"),
    ("#### 1,080", "1080"),
    ("The total is $1,234.50 in the end.\n#### $1,234.50", "1234.5"),
    ("#### 18.00", "18"),
    ("#### 72.", "72"),
    ("The answer is -7.", "-7"),
    ("It drops by 3 to 4 degrees.\n#### -3", "-3"),
    ("first #### 5 then corrected\n#### 6", "6"),
    ("The answer is: 42 apples", "42"),
    ("the answer is $ 15", "15"),
    ("We get 12 and then 0.5 of it is 6", "6"),
    ("#### \n The answer is 9", "9"),
    ("no digits at all", None),
    ("#### .5", "0.5"),
    ("__import__('os').system('echo pwned') #### 3", "3"),
]


@pytest.mark.parametrize("text,expected", NUMBER_CASES)
def test_number_extraction(text, expected):
    assert extract_number_answer(text) == expected


@pytest.mark.parametrize(
    "text,gold,correct",
    [
        ("#### 18.00", "18", True),
        ("#### 1,080", "1080", True),
        ("The answer is $5.", "5", True),
        ("#### 17", "18", False),
        ("nothing here", "3", False),
        ("#### -2", "2", False),
        ("#### 2.5", "2.50", True),
    ],
)
def test_gsm8k_is_correct(text, gold, correct):
    assert get_task("gsm8k").is_correct(text, gold) is correct


LETTER_CASES = [
    ("Speed is 600. The answer is C.", "C"),
    ("so the answer is (B)", "B"),
    ("Answer: D", "D"),
    ("The correct answer is E)", "E"),
    ("the answer is: option A", "A"),
    ("A train runs 60 km. Hence (C) is right", "C"),
    ("A car goes fast. Option B) fits", "B"),
    ("A man walks.", None),
    ("The answer is B. Wait, the answer is D", "D"),
    ("answer is c", "C"),
]


@pytest.mark.parametrize("text,expected", LETTER_CASES)
def test_option_letter_extraction(text, expected):
    assert extract_option_letter(text) == expected


def test_gsm8k_rank_levels(fixture_data_dir):
    task = get_task("gsm8k_rank")
    [example] = [e for e in task.load("train", data_dir=fixture_data_dir, limit=1)]
    assert example.answer == "72"
    assert task.level("48/2 = 24 in May, 48+24 = 72 in total. #### 72", example) == 3
    assert task.level("48/2 = 24 in May, so 48+24 = 73.\n#### 73", example) == 2  # 24 of {24, 72}: half
    assert task.level("She sold 100.\n#### 100", example) == 1
    assert task.level("I do not know", example) == 0


@pytest.mark.parametrize(
    "name,split,count",
    [
        ("gsm8k", "test", 1319),
        ("aqua_rat", "train", 2728),
        ("aqua_rat", "test", 254),
        ("ecqa", "test", 2194),
    ],
)
def test_real_data_loads_and_references_are_correct(name, split, count, full_data_dir):
    task = get_task(name)
    examples = task.load(split, data_dir=full_data_dir)
    assert len(examples) == count
    check_references(task, examples)


def check_references(task, examples):
    """Each reference is correct against its own gold answer and wrong against another one."""
    assert all(task.is_correct(e.target, e.answer) for e in examples)
    assert not any(task.is_correct(e.target, another_answer(e.answer)) for e in examples)


def another_answer(gold: str) -> str:
    if gold in "ABCDE":
        return "ABCDE"[("ABCDE".index(gold) + 1) % 5]
    return str(-float(gold)) if float(gold) else "1"  # the sign counts: -7 is not 7


def gold_in_file(name: str, file, line: str) -> str:
    """A record's gold answer read from its line as the data's README describes it, not by the task's loader."""
    if name.startswith("gsm8k"):
        return json.loads(line)["answer"].split("\n#### ")[-1].replace(",", "")
    if file.suffix == ".tsv":  # FLAN's AQuA subset: question, "(C)", rationale
        return line.split("\t")[1].strip("()")
    record = json.loads(line)
    return record["correct"] if name == "aqua_rat" else record["answer_key"]


@pytest.mark.parametrize(
    "name,split",
    [(t, s) for t in ("gsm8k", "gsm8k_rank") for s in ("train", "test")]
    + [("aqua_rat", s) for s in ("train", "dev", "test")]
    + [("ecqa", s) for s in ("train", "dev", "test")],
)
def test_fixture_records_load_with_the_files_gold_answers(name, split, fixture_data_dir):
    """Every file of tests/data: each line is an example, in order, whose gold is the record's own and whose
    reference checks as correct (what the full-data test checks on every record of the full files)."""
    task = get_task(name)
    file = fixture_data_dir / task.splits[split]
    lines = file.read_text(encoding="utf-8").splitlines()
    examples = task.load(split, data_dir=fixture_data_dir)
    assert [e.answer for e in examples] == [gold_in_file(name, file, line) for line in lines]
    check_references(task, examples)
    assert task.load(split, data_dir=fixture_data_dir, limit=3) == examples[:3]


def test_gsm8k_answers_with_thousands_separators_and_signs(fixture_data_dir):
    """Real answers `#### 1,080` and `#### -7` (train), `#### 2,125` and `#### -10` (test): commas dropped,
    the sign kept; the references check as correct against them (above)."""
    task = get_task("gsm8k")
    train, test = (task.load(split, data_dir=fixture_data_dir) for split in ("train", "test"))
    assert {"1080", "-7"} <= {e.answer for e in train} and {"2125", "-10"} <= {e.answer for e in test}
    [example] = [e for e in train if e.meta["solution"].endswith("#### 1,080")]
    assert example.answer == "1080" and example.target.endswith("#### 1,080") and "<<" not in example.target


def test_ecqa_uses_answer_key_and_lists_options(fixture_data_dir):
    example = get_task("ecqa").load("train", data_dir=fixture_data_dir, limit=1)[0]
    assert example.answer in "ABCDE" and "(A)" in example.question and "(E)" in example.question


def test_ecqa_gold_is_the_answer_key_where_its_text_is_two_options(fixture_data_dir):
    """Real records whose gold text is two of the options, the gold the later one: the gold is `answer_key`,
    not the first option with that text."""
    task = get_task("ecqa")
    for split in ("train", "dev", "test"):
        lines = (fixture_data_dir / task.splits[split]).read_text(encoding="utf-8").splitlines()
        examples = task.load(split, data_dir=fixture_data_dir)
        twice = 0
        for record, example in zip(map(json.loads, lines), examples, strict=True):
            texts = [c["text"] for c in record["choices"]]
            if texts.count(record["answer_text"]) > 1:
                twice += 1
                assert example.answer == record["answer_key"] != "ABCDE"[texts.index(record["answer_text"])]
                assert task.is_correct(f"so the answer is {record['answer_key']}", example.answer)
        assert twice, f"tests/data ecqa/{split} should hold a record whose gold text is two options"


def test_synthetic_is_seeded_and_has_several_orders():
    task = get_task("synthetic", num_train=300)
    a, b = task.load("train"), get_task("synthetic", num_train=300).load("train")
    assert a == b
    assert a != get_task("synthetic", num_train=300, seed=1).load("train")
    assert all(task.is_correct(e.target, e.answer) for e in a)
    first_steps = {e.target.splitlines()[0].split(" ")[1] for e in a}
    assert {"+", "-", "*"} <= first_steps, "references start with different kinds of step"
    questions = {split: {e.question for e in task.load(split)} for split in ("train", "validation", "test")}
    assert len(questions["train"]) == 300 and len(questions["validation"]) == 500 and len(questions["test"]) == 200
    assert not questions["train"] & questions["test"] and not questions["validation"] & (
        questions["train"] | questions["test"]
    )
    assert [e.question for e in task.load("test", limit=5)] == [e.question for e in task.load("test")[:5]]


SYNTHETIC_EXAMPLE = Example(
    id="hand-made",
    question="Ann has 5 pens. Ann buys 2 boxes of 3 pens. Ann gives away 4. How many pens does Ann have?",
    target="2 * 3 = 6\n5 + 6 = 11\n11 - 4 = 7\n#### 7",
    answer="7",
    meta={"solution": "2 * 3 = 6\n5 + 6 = 11\n11 - 4 = 7", "events": {"buy": [(2, 3)], "find": [], "give": [4]}},
)


@pytest.mark.parametrize(
    "text, level",
    [
        ("2 * 3 = 6\n5 + 6 = 11\n11 - 4 = 7\n#### 7", 3),  # the reference
        ("5 - 4 = 1\n2 * 3 = 6\n1 + 6 = 7\n#### 7", 3),  # another order
        ("2 * 3 = 6\n5 + 6 = 11\n11 - 4 = 8\n#### 8", 2),  # one slip in the last step: 2 of 3 steps right
        ("2 * 3 = 6\n5 + 6 = 11\n#### 11", 2),  # forgot the gift: 2 right steps
        ("2 * 3 = 6\n5 + 6 = 12\n12 - 4 = 8\n#### 8", 2),  # a wrong sum, the other two steps right
        ("5 + 6 = 11\n#### 11", 1),  # one right step of the reference's three
        ("2 * 3 = 6\n2 * 3 = 6\n#### 6", 1),  # a right step twice counts once
        ("2 * 4 = 8\n5 + 8 = 13\n#### 13", 1),  # a purchase the question does not have
        ("5 + 3 = 8\n8 - 4 = 4\n#### 4", 1),  # 3 is no event's amount; one right step
        ("I do not know", 0),  # no answer
    ],
)
def test_synthetic_levels_on_hand_made_candidates(text, level):
    assert get_task("synthetic").level(text, SYNTHETIC_EXAMPLE) == level


def test_synthetic_references_are_level_3_and_totals_never_negative():
    for e in get_task("synthetic", num_train=200).load("train"):
        assert get_task("synthetic").level(e.target, e) == 3
        for boxes, each in e.meta["events"]["buy"]:
            assert f"buys {boxes} boxes of {each} " in e.question
        start = int(e.question.split(" has ")[1].split(" ")[0])
        assert start >= sum(e.meta["events"]["give"]), "no order of the steps goes below zero"


def test_prompt_templates():
    assert format_prompt("Q?", "alpaca").endswith("### Instruction:\nQ?\n\n### Response:\n")
    assert format_prompt("Q?", "plain") == "Question: Q?\nAnswer: "
    with pytest.raises(ValueError, match="template"):
        format_prompt("Q?", "fancy")


def test_ecqa_hub_layout_maps_to_the_same_example(fixture_data_dir):
    task = get_task("ecqa")
    local = task.load("test", data_dir=fixture_data_dir, limit=1)[0]
    record = json.loads((fixture_data_dir / "ecqa" / "test.jsonl").read_text().splitlines()[0])
    hub = {
        "q_no": record["id"],
        "q_text": record["question"],
        "q_ans": record["answer_text"],
        "taskB": record["explanation"],
        **{f"q_op{k + 1}": c["text"] for k, c in enumerate(record["choices"])},
    }
    mapped = task.parse_record(hub, "hub:0", 0)
    assert (mapped.question, mapped.target, mapped.answer) == (local.question, local.target, local.answer)


def test_mix_checks_each_example_by_its_own_task(fixture_data_dir):
    task = get_task("mix")
    examples = task.load("test", data_dir=fixture_data_dir, limit=3)
    assert [e.meta["task"] for e in examples] == ["gsm8k"] * 3 + ["aqua_rat"] * 3 + ["ecqa"] * 3
    assert all(task.is_correct(e.target, e.answer) for e in examples)
    gsm, aqua = examples[0], examples[3]
    assert task.extract_for("so 3 apples. The answer is B", aqua) == "B"
    assert task.extract_for("so 3 apples. The answer is B", gsm) == "3"
    assert not task.is_correct(f"#### {gsm.answer}", aqua.answer)


def test_the_chat_template_is_the_tokenizers_and_never_thinks(smollm2_dir):
    """SmolLM2's ChatML template (Qwen's layout), and a template with a thinking switch as Qwen3's has."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = format_prompt("What is 2 + 3?", "chat", tokenizer)
    assert prompt.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == prompt.count("<|im_end|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
        "{% endif %}"
    )
    assert format_prompt("Q?", "chat", tokenizer).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
