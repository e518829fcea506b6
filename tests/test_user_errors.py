"""Every user mistake (a config value, a data file, a checkpoint folder, a task's files, a command-line
argument) reaches the user as one line, `aft-jax <command>: <message>`, and exit status 2, with no
traceback; the message names the key or the file (and line), the value and what was expected.

Each case calls `aft_jax.cli.main` in this process on the tiny preset with `--config.` overrides and small
files in a temporary folder, and fails before any model is built or program compiled; the `plan` cases
trace (not compile) the train step. The run directory, and the tokenizer the preset trains there on
first use, is shared by the cases that do not need a fresh one."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from aft_jax.cli import main
from aft_jax.errors import UserError

TINY = str(REPO / "configs" / "tiny.py")


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    """No debug mode, no multi-process run; `plan` sets XLA_FLAGS, which is put back afterwards."""
    for name in ("AFT_DEBUG", "AFT_COORDINATOR", "AFT_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The shared run directory and the small bad inputs, by name."""
    root = tmp_path_factory.mktemp("user_errors")

    def groups(name: str, count: int, logp: bool = True) -> str:
        candidate = {"text": " 2", "correct": True, "reference": True}
        if logp:
            candidate |= {"logp_sum": -1.5, "logp_mean": -0.5}
        wrong = {"text": " 3", "correct": False} | ({"logp_sum": -2.0, "logp_mean": -1.0} if logp else {})
        record = {"prompt": "Question: 1 + 1\nAnswer:", "answer": "2", "candidates": [candidate, wrong]}
        path = root / name
        path.write_text("".join(json.dumps({"id": i} | record) + "\n" for i in range(count)))
        return str(path)

    out = {
        "run": str(root / "run"),
        "two_groups": groups("two.jsonl", 2),
        "no_logp": groups("no_logp.jsonl", 8, logp=False),
    }
    bad = root / "bad_line.jsonl"
    bad.write_text(Path(out["two_groups"]).read_text().splitlines()[0] + '\n{"id": 1, "prompt": "p", "candidates": [\n')
    out["bad_line"] = str(bad)
    bad_type = root / "bad_type.jsonl"
    bad_type.write_text('{"id": 1, "prompt": "p", "candidates": [{"text": "t", "correct": "yes"}]}\n')
    out["bad_type"] = str(bad_type)

    empty = root / "empty_model"
    empty.mkdir()
    out["empty_model"] = str(empty)
    out["no_tokenizer"] = _model_folder(root / "no_tokenizer")
    out["str_hidden_size"] = _model_folder(root / "str_hidden_size", hidden_size="64")

    gsm8k = root / "gsm8k_data" / "gsm8k"
    gsm8k.mkdir(parents=True)
    good = {"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}
    (gsm8k / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"question": "q", "answer": "2"}) + "\n")
    out["gsm8k_no_answer_line"] = str(root / "gsm8k_data")
    invalid = root / "gsm8k_json" / "gsm8k"
    invalid.mkdir(parents=True)
    (invalid / "train.jsonl").write_text(json.dumps(good) + "\n\n{not json}\n")
    out["gsm8k_invalid_json"] = str(root / "gsm8k_json")
    (root / "no_data").mkdir()
    out["no_data"] = str(root / "no_data")
    return out


def _model_folder(folder, **config_changes) -> str:
    """A tiny Llama checkpoint folder (config.json and zero weights) without tokenizer files."""
    from safetensors.numpy import save_file

    from aft_jax.model.config import ModelConfig
    from aft_jax.model.families import config_to_hf, family_of
    from aft_jax.model.hf_weights import hf_names

    config = ModelConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8
    )
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_to_hf(config) | config_changes))
    tensors = {
        name: np.zeros(spec.hf_shape, np.float32)
        for spec in family_of(config).weight_specs(config)
        for name in hf_names(spec, config)
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def _argv(command: str, run: str, overrides: tuple[str, ...], files: dict) -> list[str]:
    if command == "convert":
        return ["convert", *[o.format(**files) for o in overrides]]
    head = [command, "--config", TINY]
    if command != "plan":
        head.append(f"--config.run_dir={run}")
    return head + [o.format(**files) if o.startswith("-") else f"--config.{o.format(**files)}" for o in overrides]


def _error_line(argv: list[str], capsys) -> str:
    """Runs `aft-jax <argv>`; checks exit status 2, no traceback and a last stderr line of the form
    `aft-jax <command>: <message>`, which it returns."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"aft-jax {argv[0]}: "), err
    return lines[-1]


# (case, command, fresh run directory, overrides ({name} is a file of `files`), the message's pattern)
CASES = [
    # check_batch: train.batch_size vs the mesh's data x fsdp devices (8 simulated)
    (
        "batch_size_vs_mesh",
        "aft",
        False,
        ("data.train_file={two_groups}", "train.batch_size=12"),
        r"train\.batch_size=12 must be a multiple of train\.grad_accum x the mesh's data x fsdp devices = 1 x 1 x 8",
    ),
    # the method registry, checked at load
    (
        "unknown_method",
        "pipeline",
        False,
        ("pipeline.methods=aft_bc,aft_xx",),
        r"pipeline\.methods: unknown 'aft_xx'; known: aft_bc",
    ),
    (
        "unknown_method_suffix",
        "pipeline",
        False,
        ("pipeline.methods=aft_bc-gamma2",),
        r"pipeline\.methods: 'aft_bc-gamma2': unknown suffix '-gamma2'; known: -beta<value>, -lr<value>",
    ),
    (
        "method_suffix_not_a_number",
        "pipeline",
        False,
        ("pipeline.methods=aft_bc-betahigh",),
        r"pipeline\.methods: 'aft_bc-betahigh': 'high' after -beta is not a number",
    ),
    (
        "unknown_loss_method",
        "aft",
        False,
        ("loss.method=dpoo",),
        r"loss\.method='dpoo': expected one of vft, aft",
    ),
    # meshes: the string at load, the device count when the mesh is made
    ("bad_mesh_string", "vft", False, ("train.mesh=1,x,1",), r"train\.mesh='1,x,1': mesh '1,x,1': expected a preset"),
    (
        "mesh_of_two_sizes",
        "vft",
        False,
        ("train.mesh=1,2",),
        r"train\.mesh='1,2': mesh shape \[1, 2\] must have 3 sizes",
    ),
    (
        "mesh_needs_more_devices",
        "vft",
        False,
        ("train.mesh=1,16,1",),
        r"train\.mesh='1,16,1': mesh shape \[1, 16, 1\] needs 16 devices, only 8 available",
    ),
    (
        "mesh_does_not_divide_devices",
        "vft",
        False,
        ("train.mesh=3,-1,1",),
        r"train\.mesh='3,-1,1': mesh shape \[3, -1, 1\] \(-1: the rest\) does not divide the 8 devices",
    ),
    (
        "sampling_mesh_needs_more_devices",
        "sample",
        False,
        ("sample.mesh=1,1,16",),
        r"sample\.mesh='1,1,16': mesh shape \[1, 1, 16\] needs 16 devices, only 8 available",
    ),
    # groups files
    (
        "too_few_groups_for_a_batch",
        "aft",
        False,
        ("data.train_file={two_groups}",),
        r"two\.jsonl: 2 usable groups \(of 2; 0 dropped.*\) is fewer than one batch of train\.batch_size=8",
    ),
    (
        "malformed_groups_line",
        "aft",
        False,
        ("data.train_file={bad_line}",),
        r"bad_line\.jsonl:2: invalid JSON \(Expecting value at column \d+\)",
    ),
    (
        "groups_field_of_wrong_type",
        "aft",
        False,
        ("data.train_file={bad_type}",),
        r"bad_type\.jsonl:1: candidates\[0\]: field 'correct' should be bool, got str",
    ),
    (
        "groups_file_missing",
        "aft",
        False,
        ("data.train_file={run}/absent.jsonl",),
        r"absent\.jsonl: no such file",
    ),
    (
        "dpo_without_reference_logps",
        "aft",
        False,
        ("data.train_file={no_logp}", "loss.method=dpo"),
        r"no_logp\.jsonl: loss\.method=dpo needs each candidate's reference log-prob \(logp_sum\)",
    ),
    # model folders
    (
        "model_folder_without_config_json",
        "vft",
        False,
        ("model.path={empty_model}",),
        r"empty_model/config\.json: not found; a Hugging Face checkpoint folder needs config\.json",
    ),
    (
        "convert_folder_without_config_json",
        "convert",
        False,
        ("--to=orbax", "{empty_model}", "{run}/converted"),
        r"empty_model/config\.json: not found",
    ),
    (
        "model_path_without_tokenizer_files",
        "vft",
        False,
        ("model.path={no_tokenizer}", "model.tokenizer="),
        r"model\.path='.*no_tokenizer'.*has no tokenizer files",
    ),
    (
        "model_path_that_does_not_exist",
        "vft",
        False,
        ("model.path={run}/absent", "model.tokenizer="),
        r"absent: no such folder, and not a hub name of the form 'owner/model'",
    ),
    (
        "tokenizer_folder_without_tokenizer_files",
        "vft",
        False,
        ("model.tokenizer={empty_model}",),
        r"model\.tokenizer='.*empty_model'.*has no tokenizer files",
    ),
    (
        "config_json_field_of_wrong_type",
        "convert",
        False,
        ("--to=orbax", "{str_hidden_size}", "{run}/converted"),
        r"str_hidden_size/config\.json: hidden_size='64'; expected a positive integer",
    ),
    # tasks and their files
    (
        "synthetic_split_that_does_not_exist",
        "vft",
        True,
        ("task.train_split=dev",),
        r"task 'synthetic' has no split 'dev' \(task\.train_split, .*\); expected one of test, train, validation",
    ),
    (
        "gsm8k_split_that_does_not_exist",
        "vft",
        True,
        ("task.name=gsm8k", "task.data_dir={gsm8k_no_answer_line}", "task.train_split=dev"),
        r"task 'gsm8k' has no split 'dev' \(task\.train_split, .*\); expected one of test, train",
    ),
    (
        "task_file_line_without_answer",
        "vft",
        True,
        ("task.name=gsm8k", "task.data_dir={gsm8k_no_answer_line}"),
        r"gsm8k/train\.jsonl:2: field 'answer' has no '#### <answer>' line",
    ),
    (
        "task_file_invalid_json",
        "vft",
        True,
        ("task.name=gsm8k", "task.data_dir={gsm8k_invalid_json}"),
        r"gsm8k/train\.jsonl:3: invalid JSON",
    ),
    (
        "task_file_missing",
        "vft",
        True,
        ("task.name=gsm8k", "task.data_dir={no_data}"),
        r"no_data/gsm8k/train\.jsonl: not found \(task gsm8k, split train\)",
    ),
    (
        "chat_template_without_one",
        "vft",
        True,
        ("task.template=chat",),
        r"task\.template='chat' needs a tokenizer with a chat template",
    ),
    # plan: command-line arguments
    (
        "plan_prompt_length_out_of_range",
        "plan",
        False,
        ("--devices=8", "--seq-len=128", "--prompt-len=200"),
        r"--prompt-len=200: expected a prompt length in \(0, 128\)",
    ),
    (
        "plan_sequence_longer_than_a_row",
        "plan",
        False,
        ("--devices=8", "--seq-len=2048"),
        r"data\.tokens_per_row=1024: a sequence of 2048 tokens does not fit in a packed row",
    ),
]


@pytest.mark.parametrize("command,fresh,overrides,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_user_mistake_is_one_line_and_exit_status_2(command, fresh, overrides, pattern, files, tmp_path, capsys):
    run = str(tmp_path / "run") if fresh else files["run"]
    line = _error_line(_argv(command, run, overrides, files | {"run": run}), capsys)
    assert re.search(pattern, line), line


def test_debug_reraises_the_error_which_is_still_a_value_error(files, monkeypatch):
    argv = _argv("aft", files["run"], ("data.train_file={two_groups}", "train.batch_size=12"), files)
    with pytest.raises(UserError) as err:
        main(["--debug", *argv])
    assert isinstance(err.value, ValueError)
    monkeypatch.setenv("AFT_DEBUG", "1")
    with pytest.raises(ValueError, match=r"train\.batch_size=12"):
        main(argv)
