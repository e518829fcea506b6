"""Per-step metrics: one JSON line per step in `metrics.jsonl` and TensorBoard events.

On resume, lines for steps after the restored checkpoint are dropped first, so the file always holds
one uninterrupted curve.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

from aft_jax.io import paths

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends to `metrics.jsonl` locally; under a URI (objects cannot be appended to) it rewrites the
    whole file at most every `upload_every_s` seconds and at `close`, and stages TensorBoard events
    locally until then."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        resume_step: int = 0,
        tensorboard: bool = True,
        enabled: bool = True,
        upload_every_s: float = 30.0,
    ):
        self.enabled = enabled
        self._file = self._tb = None
        self._staged = contextlib.ExitStack()  # TensorBoard's local folder, uploaded on close
        if not enabled:  # another process writes
            return
        run_dir = paths.Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.remote, self.upload_every_s, self._uploaded = paths.is_remote(run_dir), upload_every_s, 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lines = self._lines_until(resume_step)
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

    def _lines_until(self, step: int) -> list[str]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [line + "\n" for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]

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


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = paths.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
