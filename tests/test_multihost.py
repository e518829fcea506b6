"""Two processes (jax.distributed over localhost, 4 simulated CPU devices each) train exactly like one
process with 8 devices: the same losses and the same final parameters."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

import aft_jax
from aft_jax.metrics import read_metrics
from conftest import REPO
from train_helpers import write_arithmetic_groups


def _env(devices, **extra):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(extra)
    return env


def _command(run_dir, groups):
    return [
        sys.executable,
        "-m",
        "aft_jax.cli",
        "aft",
        "--config",
        str(REPO / "configs" / "tiny.py"),
        f"--config.data.train_file={groups}",
        f"--config.run_dir={run_dir}",
        "--config.train.max_steps=4",
        "--config.train.mesh=1,-1,1",
    ]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path, smollm2_dir):
    groups = tmp_path / "groups.jsonl"
    write_arithmetic_groups(groups)
    subprocess.run(_command(tmp_path / "one", groups), check=True, capture_output=True, env=_env(8))

    coordinator = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            _command(tmp_path / "two", groups),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=_env(4, AFT_COORDINATOR=coordinator, AFT_NUM_PROCESSES="2", AFT_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]

    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3, 4], "process 0 alone writes the metrics, once per step"
    for a, b in zip(one, two):
        for key in ("loss", "vft_loss", "align_loss", "grad_norm", "assess_micro"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"step {a['step']} {key}")
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    model_one, _ = aft_jax.from_pretrained(tmp_path / "one" / "model")
    model_two, _ = aft_jax.from_pretrained(tmp_path / "two" / "model")
    from flax import nnx

    # Cross-process all-reduces sum in another order; after 4 Adam steps of size ~3e-3 that leaves ~2e-6.
    for a, b in zip(jax.tree.leaves(nnx.state(model_one)), jax.tree.leaves(nnx.state(model_two))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)
