"""The whole pipeline on the tiny preset: every stage runs, the report holds the numbers, the plots are
PNG files, and a pipeline killed in the middle of a stage resumes and ends with the same result."""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import tiny_cli


def _env():
    """The pipeline's own process on the plain CPU device: sharding is tested elsewhere, speed matters here."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    return env


def _pipeline(run_dir):
    return tiny_cli("pipeline", run_dir)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "straight"
    subprocess.run(_pipeline(run_dir), check=True, capture_output=True, env=_env())
    return run_dir


def test_pipeline_runs_every_stage_and_reports(straight_run):
    run_dir = straight_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = ["base", "vft", "sample_train", "sample_eval", "aft_bc", "rft", "eval"]
    assert all(manifest["stages"][s]["status"] == "done" for s in stages)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"vft", "aft_bc", "rft"}
    report = (run_dir / "report.md").read_text()
    for name, row in metrics.items():
        assert f"| {name} | {100 * row['accuracy']:.1f} | {100 * row['self_consistency']:.1f} |" in report
        assert 0 <= row["accuracy"] <= 1 and row["ppl_pos"] > 1
        per_question = json.loads((run_dir / "eval" / f"{name}.json").read_text())["per_question"]
        assert len(per_question["ids"]) == len(per_question["correct"]) == row["questions"] == 16
        assert sum(per_question["correct"]) / 16 == row["accuracy"]
        assert sum(per_question["self_consistent"]) / 16 == row["self_consistency"]
    for plot in ("scores.png", "training.png"):
        data = (run_dir / "plots" / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_killed_pipeline_resumes_to_the_same_result(straight_run, tmp_path):
    straight_dir = straight_run
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_pipeline(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and not list((run_dir / "groups" / "train").glob("shard-00000.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # in the middle of sampling the training groups
    proc.wait()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["sample_train"]["status"] == "running"
    result = subprocess.run(_pipeline(run_dir), check=True, capture_output=True, text=True, env=_env())
    assert "vft: complete, skipped" in result.stdout
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads((straight_dir / "metrics.json").read_text())
    for shard in sorted((straight_dir / "groups" / "train").glob("shard-*.jsonl")):
        assert (run_dir / "groups" / "train" / shard.name).read_text() == shard.read_text()
