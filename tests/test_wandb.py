"""Weights & Biases (`log.wandb`, `aft_jax.io.wandb_log`), offline only: a training run's W&B history holds
metrics.jsonl's values under the TRL-style names, a resumed run continues the same W&B run without sending
a step twice, nothing needs wandb while the key is off, and a missing wandb is one error line. Also the
per-step share of groups without ranking signal against a NumPy count."""

import json
import struct
import sys
import time

import numpy as np
import pytest
from conftest import REPO, tiny_cli

from aft_jax.io.metrics import MetricsWriter, read_metrics
from aft_jax.io.wandb_log import METRIC_NAMES, STEP, WandbSettings


def offline_runs(folder, count: int) -> list[dict]:
    """The `count` offline W&B runs under `folder` (`wandb/offline-run-*`), oldest first, read from their
    `.wandb` files (a LevelDB-style log of `wandb_internal.Record` protobufs) once each holds its exit
    record (wandb's service process may still be writing when `finish()` returns): id, name, group, tags,
    config, history rows (by step) and summary updates."""
    deadline = time.monotonic() + 60
    while True:
        runs = [_read_run(path) for path in sorted(folder.glob("**/offline-run-*/run-*.wandb"))]
        if (len(runs) >= count and all(r["exited"] for r in runs)) or time.monotonic() > deadline:
            assert len(runs) == count and all(r["exited"] for r in runs), runs
            return runs
        time.sleep(0.2)


def _read_run(path) -> dict:
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4) and pos <= len(data):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    run = {"history": {}, "summary": {}, "exited": False}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run |= {"id": r.run.run_id, "name": r.run.display_name, "group": r.run.run_group, "tags": list(r.run.tags)}
            run["config"] = {i.key: json.loads(i.value_json) for i in r.run.config.update}
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            run["history"][row["_step"]] = row
        elif kind == "summary":
            run["summary"] |= {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update}
        elif kind == "exit":
            run["exited"] = True
    return run


def test_training_run_sends_each_step_to_wandb_under_trl_names(tmp_path, groups_file, monkeypatch):
    from aft_jax.cli import main

    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    command = tiny_cli(
        "aft", run_dir, f"data.train_file={groups_file}", "train.max_steps=2", "log.wandb=true",
        "log.wandb_run_name=tiny-aft", "log.wandb_tags=test, tiny",
    )  # fmt: skip
    main(command[3:])  # in this process: no second import of JAX and the package
    assert not (run_dir / "wandb").exists()  # WANDB_DIR wins over the run directory
    [run] = offline_runs(wandb_dir, 1)
    assert run["id"] == (run_dir / "wandb_id").read_text().strip()
    assert (run["name"], run["group"], run["tags"]) == ("tiny-aft", "tiny-aft", ["test", "tiny"])
    assert run["config"]["loss"]["method"] == "aft" and run["config"]["train"]["max_steps"] == 2
    lines = read_metrics(run_dir)
    assert sorted(run["history"]) == [line["step"] for line in lines] == [1, 2]
    for line in lines:
        row = run["history"][line["step"]]
        assert row[STEP] == line["step"]
        for key, value in line.items():
            if key != "step" and value is not None:
                assert row[METRIC_NAMES.get(key, f"train/{key}")] == pytest.approx(value, rel=1e-12), key
    names = set(run["history"][1])
    assert {"train/loss", "train/grad_norm", "train/learning_rate", "train/rewards/chosen"} <= names
    assert {"train/rewards/rejected", "train/rewards/margins", "train/rewards/accuracies"} <= names
    assert 0 <= run["history"][1]["train/frac_reward_zero_std"] <= 1


def _settings(tmp_path, **changes):
    values = dict(project="p", entity="", name="run", group="run", tags=(), mode="offline", root=str(tmp_path))
    return WandbSettings(**(values | changes))


def test_a_resumed_run_continues_its_wandb_run_and_sends_no_step_twice(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run_dir, settings = tmp_path / "vft", _settings(tmp_path)

    def train(resume_step, steps, offset):
        writer = MetricsWriter(run_dir, resume_step=resume_step, tensorboard=False, wandb=settings)
        for step in steps:
            writer.write(step, {"loss": step + offset, "lr": 0.1, "margin": float("nan")})
        writer.close()

    train(0, range(1, 5), 0.0)  # killed after step 4, its last checkpoint at step 2
    train(2, range(3, 7), 0.5)
    first, resumed = offline_runs(run_dir / "wandb", 2)
    assert first["id"] == resumed["id"] == (run_dir / "wandb_id").read_text().strip()
    assert first["name"] == "run/vft"
    assert {s: r["train/loss"] for s, r in first["history"].items()} == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    assert {s: r["train/loss"] for s, r in resumed["history"].items()} == {5: 5.5, 6: 6.5}
    assert "train/rewards/margins" not in first["history"][1]  # NaN (null in metrics.jsonl) is left out
    assert [line["step"] for line in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]

    # W&B turned on for a run that had none: its kept steps are sent first
    other = tmp_path / "rft"
    other.mkdir()
    (other / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    writer = MetricsWriter(other, resume_step=1, tensorboard=False, wandb=settings)
    writer.write(2, {"loss": 2.0})
    writer.close()
    [run] = offline_runs(other / "wandb", 1)
    assert {s: r["train/loss"] for s, r in run["history"].items()} == {1: 1.0, 2: 2.0}


def test_evaluations_claims_and_plots_go_to_the_pipeline_and_study_runs(tmp_path, monkeypatch):
    from PIL import Image

    from aft_jax.io.wandb_log import log_report, log_study

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    (tmp_path / "plots").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "plots" / "scores.png")
    result = {"accuracy": 0.5, "per_task": {"gsm8k": {"accuracy": 0.25}}, "pos_scores": [-1.0], "per_question": {}}
    log_report(_settings(tmp_path), tmp_path, {"vft": result, "aft_bc": result | {"accuracy": 0.75}})
    claims = [
        {"claim": 1, "method": "aft_bc", "baseline": "vft", "difference": 0.25, "p_holm": 0.01, "verdict": "supported"},
        {"claim": 2, "method": "aft_bc", "baseline": None, "difference": -0.1, "p_holm": None, "verdict": "open"},
    ]
    log_study(_settings(tmp_path), tmp_path, {"claims": claims})
    report, study = offline_runs(tmp_path / "wandb", 2)  # one run directory, so one W&B run, resumed
    assert report["summary"]["eval/vft/accuracy"] == 0.5 and report["summary"]["eval/aft_bc/accuracy"] == 0.75
    assert report["summary"]["eval/vft/per_task/gsm8k/accuracy"] == 0.25
    assert not any("pos_scores" in k or "per_question" in k for k in report["summary"])
    assert report["summary"]["plots/scores/_type"] == study["summary"]["plots/scores/_type"] == "image-file"
    assert study["summary"]["claims/_type"] == "table-file"
    [table] = (tmp_path / "wandb").glob("offline-run-*/files/media/table/claims_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == list(claims[0]) and table["data"] == [list(c.values()) for c in claims]


def test_off_by_default_needs_no_wandb_and_a_missing_wandb_is_one_error_line(tmp_path, monkeypatch, capsys):
    from aft_jax.cli import main
    from aft_jax.config.load import load_config
    from aft_jax.io.wandb_log import log_report
    from aft_jax.stages.train import TrainSettings

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError: not installed
    config = load_config(REPO / "configs" / "tiny.py", [f"run_dir={tmp_path}"])
    assert config.log.wandb is False and TrainSettings.of(config).wandb is None
    writer = MetricsWriter(tmp_path, tensorboard=False, wandb=WandbSettings.of(config))
    writer.write(1, {"loss": 1.0})
    writer.close()
    log_report(WandbSettings.of(config), tmp_path, {"vft": {"accuracy": 0.5}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no wandb folder, no wandb_id

    with pytest.raises(SystemExit) as exit:
        main(["vft", "--config", str(REPO / "configs" / "tiny.py"), f"--config.run_dir={tmp_path}", "--config.log.wandb=true"])  # fmt: skip
    assert exit.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "log.wandb=true" in line and "pip install 'aft_jax[wandb]'" in line


def test_log_section_is_checked_and_an_empty_mode_falls_back_to_offline_without_a_key(tmp_path, monkeypatch):
    from aft_jax.config.load import load_config
    from aft_jax.config.spec import RunConfigError
    from aft_jax.io.wandb_log import resolve_mode

    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    assert (resolve_mode(""), resolve_mode("online")) == ("offline", "online")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("") is None  # wandb reads its own WANDB_MODE

    with pytest.raises(RunConfigError, match="log.wandb_mode='cloud': expected one of , online, offline"):
        load_config(REPO / "configs" / "tiny.py", ["log.wandb_mode=cloud"])
    with pytest.raises(RunConfigError, match="log.wandb_tags='a,,b'"):
        load_config(REPO / "configs" / "tiny.py", ["log.wandb_tags=a,,b"])


def test_groups_without_signal_counts_groups_whose_candidates_share_one_level():
    import jax.numpy as jnp

    from aft_jax.config.defaults import default_config
    from aft_jax.method.objective import finalize_metrics, groups_without_signal, rank_levels

    # valid candidates per group: mixed labels; all positive at two levels; all negative; one candidate;
    # one positive with a padded (invalid) negative; no candidate (a padding group)
    valid = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 0, 0], [0, 0, 0]], bool)
    is_pos = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]], bool)
    levels = np.array([[3, 0, 2], [3, 2, 0], [0, 0, 0], [3, 0, 0], [3, 0, 0], [0, 3, 0]], np.int32)
    batch = {"valid": jnp.asarray(valid), "is_pos": jnp.asarray(is_pos), "levels": jnp.asarray(levels)}
    for use_levels in (False, True):
        cfg = default_config().loss
        cfg.use_levels = use_levels
        keys = levels if use_levels else is_pos.astype(np.int32)
        expected = [v.any() and len(set(k[v])) == 1 for k, v in zip(keys, valid)]
        got = groups_without_signal(rank_levels(batch, cfg), batch["valid"])
        np.testing.assert_array_equal(np.asarray(got), expected)
        share = np.sum(expected) / np.sum(valid.any(-1))
        assert share == (0.6 if use_levels else 0.8)
        sums = {k: jnp.zeros(()) for k in ("loss", "vft_loss", "align_loss", "pos_score_sum", "neg_score_sum")}
        sums |= {k: jnp.ones(()) for k in ("pos_count", "neg_count", "pairs_right", "pairs_total")}
        sums |= {"macro_sum": jnp.zeros(()), "macro_groups": jnp.ones(())}
        sums |= {"no_signal_groups": jnp.sum(got), "real_groups": jnp.sum(jnp.any(batch["valid"], -1))}
        assert float(finalize_metrics(sums)["groups_without_signal"]) == pytest.approx(share)
