"""Per-step metrics: one JSON line per step in `metrics.jsonl`, TensorBoard events and (with `log.wandb`)
Weights & Biases (`aft_jax.io.wandb_log`).

On resume, lines for steps after the restored checkpoint are dropped first, so the file always holds
one uninterrupted curve; W&B keeps the steps it already had (those lines were sent when written).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

from aft_jax.io import paths
from aft_jax.io.wandb_log import WandbRun, WandbSettings

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends to `metrics.jsonl` locally; under a URI (objects cannot be appended to) it rewrites the
    whole file at most every `upload_every_s` seconds and at `close`, and stages TensorBoard events
    locally until then. With `wandb` settings each line also goes to the run directory's W&B run (its
    run config: `wandb`'s, updated with `wandb_config`)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        resume_step: int = 0,
        tensorboard: bool = True,
        enabled: bool = True,
        upload_every_s: float = 30.0,
        wandb: WandbSettings | None = None,
        wandb_config: dict | None = None,
    ):
        self.enabled = enabled
        self._file = self._tb = self._wandb = None
        self._staged = contextlib.ExitStack()  # TensorBoard's local folder, uploaded on close
        if not enabled:  # another process writes
            return
        run_dir = paths.Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.remote, self.upload_every_s, self._uploaded = paths.is_remote(run_dir), upload_every_s, 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        written = self._written()
        self._lines = [line for line in written if json.loads(line).get("step", 0) <= resume_step]
        paths.write_atomically(self.path, "".join(self._lines))
        if not self.remote:
            self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed; writing metrics.jsonl only")
            else:
                local = self._staged.enter_context(paths.staged_dir(run_dir / "tensorboard"))
                self._tb = SummaryWriter(local, purge_step=resume_step + 1)
        self._wandb = WandbRun.start(wandb, run_dir, job_type="train", config=wandb_config)
        if self._wandb is not None and self._wandb.new:  # a W&B run starting now: the steps kept first
            for line in self._lines:
                row = json.loads(line)
                self._wandb.log_step(row["step"], row)
        elif self._wandb is not None:  # a resumed W&B run has every line written (each sent when written)
            self._wandb.sent = max((json.loads(line).get("step", 0) for line in written), default=0)

    def _written(self) -> list[str]:
        if not self.path.exists():
            return []
        return [line + "\n" for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        line = json.dumps({"step": step, **clean}) + "\n"
        self._lines.append(line)
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        elif time.monotonic() - self._uploaded > self.upload_every_s:
            self._upload()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log_step(step, metrics)

    def _upload(self) -> None:
        paths.write_atomically(self.path, "".join(self._lines))
        self._uploaded = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
        else:
            self._upload()
        if self._tb is not None:
            self._tb.close()
        self._staged.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = paths.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
