"""Small random models and candidate-group batches for trainer tests (no tokenizer needed)."""

import json
import os
import signal
import subprocess
import time

import numpy as np
from ml_collections import ConfigDict

import aft_jax
from aft_jax.config.defaults import default_config
from aft_jax.data.batches import EncodedGroup, collate
from aft_jax.data.groups import Candidate

VOCAB = 61


def tiny_model(mesh=None, seed=0, vocab=VOCAB, **options):
    """A 2-layer random model; `options` set `ModelConfig` fields (a family's options, a window)."""
    cfg = aft_jax.ModelConfig(
        **options,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        initializer_range=0.1,
    )
    return aft_jax.create_model(cfg, mesh=mesh, seed=seed)


def random_batch(seed, groups=8, group_size=4, length=24, levels=2):
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(groups):
        n = int(rng.integers(1, group_size + 1))
        prompt_len = int(rng.integers(2, 8))
        tokens, cands = [], []
        prompt = list(rng.integers(1, VOCAB, size=prompt_len))
        for k in range(n):
            tokens.append(prompt + list(rng.integers(1, VOCAB, size=int(rng.integers(2, length - prompt_len)))))
            level = levels - 1 if k == 0 else int(rng.integers(0, levels))
            cands.append(
                Candidate(
                    "", correct=level == levels - 1, level=level, reference=k == 0, logp_sum=float(-rng.random() * 30)
                )
            )
        encoded.append(EncodedGroup(tokens, [prompt_len] * n, cands))
    return collate(encoded, group_size, length, pad_id=0)


def loss_config(**changes) -> ConfigDict:
    cfg = default_config().loss
    cfg.update(changes)
    return cfg


def write_arithmetic_groups(path, n=32, seed=0):
    """A groups file of simple sums: a correct reference and three wrong candidates each."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for q in range(n):
            a, b = (int(x) for x in rng.integers(1, 50, size=2))
            cands = [
                {
                    "text": f"{a} plus {b} is {a + b}. The answer is {a + b}",
                    "correct": True,
                    "reference": True,
                    "logp_sum": -5.0,
                }
            ]
            for delta in rng.choice([-2, -1, 1, 2], size=3, replace=False):
                x = a + b + int(delta)
                cands.append({"text": f"{a} plus {b} is {x}. The answer is {x}", "correct": False, "logp_sum": -6.0})
            f.write(
                json.dumps({"id": q, "prompt": f"What is {a} plus {b}?\n", "answer": str(a + b), "candidates": cands})
                + "\n"
            )


def killed_and_resumed(command, tmp_path, check_killed=None):
    """Runs `command(run_dir)` (an 8-step training command) straight through in `tmp_path/straight`, and in
    `tmp_path/interrupted` SIGKILLed after its fifth logged step, then run again; asserts the restart
    resumed from its last checkpoint and logged the straight run's losses. `check_killed(run_dir, step)`
    inspects the killed run's last checkpoint before the restart. Returns the two run directories."""
    from aft_jax.io.metrics import read_metrics

    straight, interrupted, env = tmp_path / "straight", tmp_path / "interrupted", dict(os.environ)
    subprocess.run(command(straight), check=True, env=env, capture_output=True)
    assert [m["step"] for m in read_metrics(straight)] == list(range(1, 9))
    proc = subprocess.Popen(command(interrupted), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics_file = interrupted / "metrics.jsonl"
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "model").exists(), "the run was killed before it finished"
    saved = sorted(int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < 8
    if check_killed is not None:
        check_killed(interrupted, max(saved))

    result = subprocess.run(command(interrupted), check=True, env=env, capture_output=True, text=True)
    assert f"resumed from step {max(saved)}" in result.stderr
    resumed = read_metrics(interrupted)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(read_metrics(straight), resumed):
        for key in ("loss", "vft_loss", "align_loss", "grad_norm", "lr", "assess_micro"):
            assert a[key] == b[key], (a["step"], key)
    return straight, interrupted
