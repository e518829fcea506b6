"""The training command end to end: a run killed with SIGKILL resumes with exactly the same losses."""

import json

import pytest
from conftest import REPO, tiny_cli
from train_helpers import killed_and_resumed


def _command(run_dir, groups, *extra):
    return tiny_cli("aft", run_dir, f"data.train_file={groups}", "train.max_steps=8") + list(extra)


def test_killed_run_resumes_with_identical_losses(tmp_path, groups_file):
    _, interrupted = killed_and_resumed(lambda run_dir: _command(run_dir, groups_file), tmp_path)
    assert (interrupted / "model" / "params").is_dir()


def test_typo_in_override_lists_valid_keys():
    from aft_jax.config.load import load_config

    with pytest.raises(KeyError, match=r"unknown config key 'loss.betta'.*beta_dpo"):
        load_config(REPO / "configs" / "tiny.py", ["loss.betta=0.2"])
    with pytest.raises(ValueError, match=r"train.max_steps: cannot parse 'many' as int"):
        load_config(REPO / "configs" / "tiny.py", ["train.max_steps=many"])
    config = load_config(REPO / "configs" / "tiny.py", ["loss.beta=0.25", "train.tensorboard=true"])
    assert config.loss.beta == 0.25 and config.train.tensorboard is True


def test_malformed_groups_line_names_file_and_line(tmp_path):
    from aft_jax.data.groups import DataError, read_groups

    path = tmp_path / "groups.jsonl"
    good = {"id": 1, "prompt": "p", "answer": "1", "candidates": [{"text": "t", "correct": True}]}
    bad = {"id": 2, "prompt": "p", "candidates": [{"text": "t", "correct": "yes"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: candidates\[0\]: field 'correct' should be bool"):
        read_groups(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        read_groups(path)


def test_paper_presets_load():
    from aft_jax.config.load import load_config
    from aft_jax.config.presets import PAPER_MODELS, PAPER_TASKS

    for model in PAPER_MODELS:
        for task in PAPER_TASKS:
            config = load_config(f"{REPO}/configs/paper.py:{model}-{task}")
            assert config.task.name == task and config.model.path == PAPER_MODELS[model][0]
            assert config.optim.lr == 2e-5 and config.train.batch_size == 128 and config.data.max_length == 512
    assert load_config(REPO / "configs" / "llama2_13b_gsm8k.py").train.grad_accum == 8
    assert load_config(f"{REPO}/configs/paper.py:llama2_7b-gsm8k_rank").loss.use_levels is True
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(f"{REPO}/configs/paper.py:gpt2-gsm8k")


def test_qwen_presets_load_with_the_chat_template():
    from aft_jax.config.load import load_config
    from aft_jax.config.presets import OPEN_MODELS

    for model, (path, _) in OPEN_MODELS.items():
        config = load_config(f"{REPO}/configs/qwen.py:{model}-gsm8k")
        assert config.model.path == path and config.task.template == "chat" and config.train.batch_size == 128
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(f"{REPO}/configs/qwen.py:llama2_7b-gsm8k")
