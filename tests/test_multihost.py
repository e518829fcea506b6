"""Two processes (jax.distributed over localhost, 4 simulated CPU devices each) work exactly like one
process with 8 devices: training gives the same losses, checkpoints and final parameters; sampling (each
process its own shards, at another batch size) gives the same groups."""

import json
import os
import socket
import subprocess

import jax
import numpy as np
from conftest import tiny_cli
from train_helpers import write_arithmetic_groups

import aft_jax
from aft_jax.data.groups import read_groups
from aft_jax.io.metrics import read_metrics


def _env(devices, **extra):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(extra)
    return env


def _start_two(command):
    """`command` as two processes of a jax.distributed run over localhost, 4 devices each."""
    coordinator = f"localhost:{_free_port()}"
    return [
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(4, AFT_COORDINATOR=coordinator, AFT_NUM_PROCESSES="2", AFT_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]


def _finish(procs) -> list[str]:
    """Waits for the processes, asserts they succeeded, returns their standard outputs."""
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err.decode()[-3000:]
    return [out.decode() for out, _ in outputs]


def _run_one_and_two(command):
    """Runs `command(run_dir)` once with 8 devices and as two processes with 4 each."""
    subprocess.run(command("one"), check=True, capture_output=True, env=_env(8))
    _finish(_start_two(command("two")))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    groups = tmp_path / "groups.jsonl"
    write_arithmetic_groups(groups)
    overrides = (f"data.train_file={groups}", "train.max_steps=4", "train.mesh=1,-1,1")
    _run_one_and_two(lambda name: tiny_cli("aft", tmp_path / name, *overrides))

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


def test_two_processes_train_lora_like_one(tmp_path):
    """A LoRA run: the adapters are gathered from both processes for the PEFT export."""
    from safetensors.numpy import load_file

    groups = tmp_path / "groups.jsonl"
    write_arithmetic_groups(groups)
    overrides = (f"data.train_file={groups}", "train.max_steps=2", "train.mesh=1,-1,1", "model.lora.rank=4")
    _run_one_and_two(lambda name: tiny_cli("aft", tmp_path / name, *overrides))

    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5, err_msg=f"step {a['step']}")
    one = load_file(tmp_path / "one" / "model" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "model" / "adapter_model.safetensors")
    assert sorted(one) == sorted(two) and len(one) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for name in one:
        np.testing.assert_allclose(two[name], one[name], atol=1e-5, rtol=0, err_msg=name)


def test_two_processes_sample_the_same_groups_as_one(tmp_path):
    def command(name):
        # One sampling device per process in both runs: a random model's near-uniform next-token
        # distribution turns the last-bit differences of another device layout into other tokens. The
        # batch sizes differ too (4 and 10 questions at a time): each sample has its own keys.
        batch_size = 12 if name == "one" else 30
        return tiny_cli(
            "sample", tmp_path / name, "sample.shard_size=8", "sample.mesh=1,1,1", f"sample.batch_size={batch_size}"
        )

    _run_one_and_two(command)
    one, two = tmp_path / "one" / "groups", tmp_path / "two" / "groups"
    shards = sorted(p.name for p in one.glob("shard-*.jsonl"))
    assert shards == sorted(p.name for p in two.glob("shard-*.jsonl")) and len(shards) == 4
    writers = [json.loads((two / s.replace(".jsonl", ".meta.json")).read_text())["process"] for s in shards]
    assert writers == [0, 1, 0, 1], "each process samples every other shard"
    groups_one, groups_two = read_groups(one), read_groups(two)
    assert [g.id for g in groups_two] == [g.id for g in groups_one]
    for a, b in zip(groups_one, groups_two):
        assert [(c.text, c.correct, c.level, c.reference) for c in b.candidates] == [
            (c.text, c.correct, c.level, c.reference) for c in a.candidates
        ]
        np.testing.assert_allclose([c.logp_sum for c in b.candidates], [c.logp_sum for c in a.candidates], atol=1e-4)
    stats_one, stats_two = (json.loads((d / "stats.json").read_text()) for d in (one, two))
    assert {k: v for k, v in stats_two.items() if "per_s" not in k} == {
        k: v for k, v in stats_one.items() if "per_s" not in k
    }


def test_two_processes_run_the_whole_pipeline(tmp_path):
    """Every stage completes without a process waiting forever: training together, sampling and
    evaluation split between the processes (two models, one each, sampled on two of a process's devices: a
    local mesh that shards weights and rows, cheaper to simulate than all four), one report."""
    run_dir = tmp_path / "pipeline"
    overrides = ("train.mesh=1,-1,1", "sample.shard_size=8", "sample.mesh=1,2,1", "pipeline.methods=aft_bc")
    outputs = _finish(_start_two(tiny_cli("pipeline", run_dir, *overrides)))
    assert "report:" in outputs[0] and "report:" not in outputs[1]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(stage["status"] == "done" for stage in manifest["stages"].values())
    writers = {json.loads(p.read_text())["process"] for p in (run_dir / "groups" / "train").glob("*.meta.json")}
    assert writers == {0, 1}
    for name in ("vft", "aft_bc"):
        assert 0.0 <= json.loads((run_dir / "eval" / f"{name}.json").read_text())["assess_micro"] <= 1.0
