"""`launch/tpu_run.sh --dry-run` prints the gcloud commands for a configuration, in order."""

import shlex
import subprocess

from conftest import REPO

SCRIPT = str(REPO / "launch" / "tpu_run.sh")


def _dry_run(*args):
    out = subprocess.run(["bash", SCRIPT, "--dry-run", *args], check=True, capture_output=True, text=True).stdout
    return [shlex.split(line) for line in out.splitlines()]


def test_dry_run_creates_copies_sets_up_runs_and_deletes():
    commands = _dry_run(
        "--name",
        "aft-v4",
        "--zone",
        "us-central2-b",
        "--accelerator",
        "v4-32",
        "--",
        "aft-jax",
        "pipeline",
        "--config",
        "configs/llama2_7b_gsm8k.py",
        "--config.run_dir=gs://b/r",
    )
    assert commands[0] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "aft-v4",
        "--zone",
        "us-central2-b",
        "--accelerator-type",
        "v4-32",
        "--version",
        "tpu-ubuntu2204-base",
    ]
    assert commands[1][:3] == ["git", "-C", str(REPO)] and "archive" in commands[1]
    assert commands[2][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in commands[2]
    setup, run = commands[3], commands[4]
    assert "--worker=all" in setup and "pip install" in setup[-1] and "jax[tpu]" in setup[-1]
    assert run[-1].endswith("aft-jax pipeline --config configs/llama2_7b_gsm8k.py --config.run_dir=gs://b/r ")
    assert "AFT_DISTRIBUTED=auto " in run[-1], "every worker joins one jax.distributed run (initialize_distributed)"
    assert commands[5] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "delete",
        "aft-v4",
        "--zone",
        "us-central2-b",
        "--quiet",
    ]
    assert len(commands) == 6


def test_dry_run_queued_spot_keep():
    commands = _dry_run(
        "--name",
        "q",
        "--zone",
        "us-west4-a",
        "--accelerator",
        "v5litepod-64",
        "--version",
        "v2-alpha-tpuv5-lite",
        "--queued",
        "--spot",
        "--keep",
        "--project",
        "p",
        "--",
        "aft-jax",
        "vft",
        "--config",
        "c.py",
    )
    assert commands[0] == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "q",
        "--node-id",
        "q",
        "--zone",
        "us-west4-a",
        "--project",
        "p",
        "--accelerator-type",
        "v5litepod-64",
        "--runtime-version",
        "v2-alpha-tpuv5-lite",
        "--spot",
    ]
    assert not any("delete" in c for c in commands), "--keep leaves the TPU running"


def test_bad_invocations_are_refused():
    for args in (
        ["--zone", "z", "--accelerator", "v4-8", "--", "aft-jax", "vft"],
        ["--name", "n", "--zone", "z", "--accelerator", "v4-8", "--", "python", "x.py"],
        ["--name", "n", "--zone", "z", "--accelerator", "v4-8"],
    ):
        result = subprocess.run(["bash", SCRIPT, "--dry-run", *args], capture_output=True, text=True)
        assert result.returncode == 2 and "tpu_run.sh:" in result.stderr
