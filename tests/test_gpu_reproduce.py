"""benchmarks/gpu_reproduce.sh: the command it runs is a valid study config with the issue's protocol (every
override names a real key), on a GPU and with `--limit N`; the slow test runs it end to end on CPU."""

import os
import shlex
import subprocess

import pytest
from conftest import FIXTURE_DATA, REPO

from aft_jax.config.load import load_config
from aft_jax.study.runner import study_plan

SCRIPT = REPO / "benchmarks" / "gpu_reproduce.sh"


def _command(*args):
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], check=True, capture_output=True, text=True)
    argv = shlex.split(out.stdout)
    assert argv[1] == "study" and argv[2] == "--config"
    overrides = [a[len("--config.") :] for a in argv[4:]]
    return load_config(REPO / argv[3], overrides)


def test_gpu_protocol():
    c = _command()
    assert (c.model.path, c.task.name, c.task.limit) == ("smollm2", "gsm8k", 2000)
    assert (c.sample.k, c.sample.temperature) == (6, 1.0)
    assert (c.pipeline.init_from, c.pipeline.vft_epochs, c.pipeline.align_epochs) == ("base", 1, 1)
    assert c.eval.limit == -1 and c.eval.group_questions == 200  # all 1,319 test questions
    seeds, runs, sweeps = study_plan(c)
    assert (seeds, [run.name for run in runs], sweeps) == ([0], ["aft_bc", "aft_dc", "rft"], {"beta": {}, "lr": {}})


def test_cpu_limit_keeps_the_protocol_and_passes_overrides_on():
    c = _command("--limit", "3", "--config.study.seeds=0,1")
    assert (c.task.limit, c.eval.limit, c.eval.group_questions, c.train.batch_size) == (3, 3, 3, 3)
    assert (c.sample.k, c.pipeline.methods, c.model.compute_dtype) == (6, "aft_bc,aft_dc,rft", "float32")
    assert study_plan(c)[0] == [0, 1]
    bad = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--limmit", "2"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "--limmit" in bad.stderr
    bad = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--limit"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "--limit needs a value" in bad.stderr


@pytest.mark.slow
def test_runs_end_to_end_on_cpu(tmp_path):
    """On the first 2 GSM8K train and test questions, which tests/data holds as the full files do."""
    env = {**os.environ, "AFT_DATA_DIR": str(FIXTURE_DATA)}
    subprocess.run(["bash", str(SCRIPT), "--limit", "2", "--run-dir", str(tmp_path / "run")], check=True, env=env)
    assert "## The paper's claims" in (tmp_path / "run" / "study.md").read_text()
