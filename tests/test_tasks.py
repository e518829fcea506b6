"""Answer extraction and checking on a table of tricky cases, and every task's real data loading."""

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


def test_gsm8k_rank_levels():
    task = get_task("gsm8k_rank")
    [example] = [e for e in task.load("train", limit=1)]
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
def test_real_data_loads_and_references_are_correct(name, split, count):
    task = get_task(name)
    examples = task.load(split)
    assert len(examples) == count
    assert all(task.is_correct(e.target, e.answer) for e in examples)


def test_ecqa_uses_answer_key_and_lists_options():
    example = get_task("ecqa").load("train", limit=1)[0]
    assert example.answer in "ABCDE" and "(A)" in example.question and "(E)" in example.question


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


def test_ecqa_hub_layout_maps_to_the_same_example():
    task = get_task("ecqa")
    local = task.load("test", limit=1)[0]
    import json
    import os
    from pathlib import Path

    record = json.loads((Path(os.environ["AFT_DATA_DIR"]) / "ecqa" / "test.jsonl").read_text().splitlines()[0])
    hub = {
        "q_no": record["id"],
        "q_text": record["question"],
        "q_ans": record["answer_text"],
        "taskB": record["explanation"],
        **{f"q_op{k + 1}": c["text"] for k, c in enumerate(record["choices"])},
    }
    mapped = task.parse_record(hub, "hub:0", 0)
    assert (mapped.question, mapped.target, mapped.answer) == (local.question, local.target, local.answer)


def test_mix_checks_each_example_by_its_own_task():
    task = get_task("mix")
    examples = task.load("test", limit=3)
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
