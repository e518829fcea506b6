"""Weights & Biases (`log.wandb`): the one module that imports `wandb`, lazily, so nothing needs it while the
key is off.

One W&B run per run directory, started on process 0 only: a training run (`MetricsWriter` sends each line
of `metrics.jsonl` under the TRL-style names of `METRIC_NAMES`), a pipeline's evaluation (`log_report`:
`eval/<model>/<metric>` summaries and the plots) and a study (`log_study`: the claims table and the plots).
The W&B run id is kept in `<run_dir>/wandb_id`, so a resumed run continues the same W&B run
(`resume="allow"`); the steps it had already sent are not sent again (`MetricsWriter` knows them from
`metrics.jsonl`). Runs are named after their directory: `log.wandb_run_name` (default: the run
directory's name) for the run directory itself, `<name>/vft`, `<name>/aft_bc`, ... below it; all of them
are in the group `log.wandb_group` (default: the name).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import netrc
import os
import secrets
import socket
import string
from typing import Any
from urllib.parse import urlsplit

from aft_jax.errors import SettingError
from aft_jax.io import paths
from aft_jax.parallel import sharding

log = logging.getLogger(__name__)

INSTALL = "pip install 'aft_jax[wandb]'"
# metrics.jsonl key -> W&B key: TRL's names (as a TRL run shows them in W&B, with the Trainer's `train/`)
# where the quantity is the same. A score is a candidate's mean completion log-prob, the reward AFT ranks
# by (TRL's DPO reward is beta times the log-ratio to the reference model instead). A key not listed
# goes to `train/<key>`.
METRIC_NAMES = {
    "loss": "train/loss",
    "vft_loss": "train/nll_loss",  # the NLL of the VFT targets per token (TRL's CPO/RPO `nll_loss`)
    "align_loss": "train/align_loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/learning_rate",
    "pos_score": "train/rewards/chosen",  # mean score of the positive candidates
    "neg_score": "train/rewards/rejected",  # mean score of the negative candidates
    "margin": "train/rewards/margins",  # pos_score - neg_score
    "assess_micro": "train/rewards/accuracies",  # share of (positive, negative) pairs ranked right
    "assess_macro": "train/rewards/accuracies_macro",  # the same averaged per group
    "groups_without_signal": "train/frac_reward_zero_std",  # GRPO's: groups whose candidates share one level
    "tokens_per_s": "train/tokens_per_second",
    "step_s": "train/step_seconds",
    "tflops_per_device": "train/tflops_per_device",
    "epoch": "train/epoch",
}
STEP = "train/global_step"


def wandb_module():
    """The `wandb` package, or the one-line error naming the key and the install command."""
    try:
        import wandb
    except ImportError:
        raise SettingError(
            f"log.wandb=true needs the wandb package, which is not installed: {INSTALL} (or set log.wandb=false)"
        ) from None
    return wandb


def wandb_key(key: str) -> str:
    return METRIC_NAMES.get(key, f"train/{key}")


def step_values(step: int, metrics: dict) -> dict:
    """One metrics.jsonl line as W&B history values: renamed, non-numbers and NaN/inf left out."""
    values = {
        wandb_key(k): v
        for k, v in metrics.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    return values | {STEP: step}


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """The `log` section's W&B keys, with the run config and its run directory (`root`): a run directory
    below `root` is the W&B run `<name>/<its path below root>`."""

    project: str
    entity: str
    name: str
    group: str
    tags: tuple[str, ...]
    mode: str
    root: str
    config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, config) -> WandbSettings | None:
        """The settings of a run config (`aft_jax.config.spec.RunConfig`), None with `log.wandb` off; an
        error now, not after hours of training, when wandb is not installed."""
        c = config.log
        if not c.wandb:
            return None
        wandb_module()
        run_dir = config.run_dir if paths.is_remote(config.run_dir) else os.path.abspath(config.run_dir)
        name = c.wandb_run_name or paths.Path(run_dir).name
        return cls(
            project=c.wandb_project,
            entity=c.wandb_entity,
            name=name,
            group=c.wandb_group or name,
            tags=tuple(t.strip() for t in c.wandb_tags.split(",") if t.strip()),
            mode=c.wandb_mode,
            root=os.fspath(config.run_dir),
            config=config.to_dict(),
        )

    def run_name(self, run_dir) -> str:
        root, here = self.root.rstrip("/"), os.fspath(run_dir).rstrip("/")
        if not paths.is_remote(here):
            root, here = os.path.abspath(root), os.path.abspath(here)
        if here == root:
            return self.name
        below = here[len(root) + 1 :] if here.startswith(root + "/") else paths.Path(here).name
        return f"{self.name}/{below}"


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def resolve_mode(mode: str) -> str | None:
    """`log.wandb_mode`; when empty, wandb's own WANDB_MODE if set (None: wandb reads it), else online, or
    offline when there is no API key or the W&B server cannot be reached."""
    if mode or os.environ.get("WANDB_MODE"):
        return mode or None
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = url.hostname or "api.wandb.ai"
    port = url.port or (80 if url.scheme == "http" else 443)
    if not _has_api_key(host):
        why = "no W&B API key (WANDB_API_KEY or `wandb login`)"
    elif not _reachable(host, port):
        why = f"{host}:{port} cannot be reached"
    else:
        return "online"
    log.warning("W&B logs offline: %s; upload later with `wandb sync`", why)
    return "offline"


def _new_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbRun:
    """The W&B run of one run directory; `start` returns None on every process but 0."""

    def __init__(self, run, new: bool):
        self.run, self.new = run, new  # new: no W&B run had this run directory's id before
        self.sent = 0  # the last step W&B has

    @classmethod
    def start(cls, settings: WandbSettings | None, run_dir, *, job_type: str, config: dict | None = None):
        if settings is None or not sharding.is_main_process():
            return None
        wandb = wandb_module()
        run_dir = paths.Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb_id"
        new = not id_file.exists()
        run_id = _new_id() if new else id_file.read_text().strip()
        if new:
            paths.write_atomically(id_file, run_id + "\n")
        local = not os.environ.get("WANDB_DIR") and not paths.is_remote(run_dir)
        try:
            run = wandb.init(
                project=settings.project,
                entity=settings.entity or None,
                name=settings.run_name(run_dir),
                group=settings.group,
                job_type=job_type,
                tags=list(settings.tags),
                config=settings.config | (config or {}),
                id=run_id,
                resume="allow",
                mode=resolve_mode(settings.mode),
                dir=os.fspath(run_dir) if local else None,
            )
        except wandb.errors.Error as err:
            raise SettingError(
                f"log.wandb=true: W&B could not start ({err}); set log.wandb_mode=offline or log.wandb=false"
            ) from None
        return cls(run, new)

    def log_step(self, step: int, metrics: dict) -> None:
        """One training step (a metrics.jsonl line); a step W&B already has (a resumed run) is skipped."""
        if step > self.sent and step >= self.run.step:
            self.run.log(step_values(step, metrics), step=step)
            self.sent = step

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def table(self, key: str, rows: list[dict]) -> None:
        """`rows` (dicts) as a `wandb.Table` under `key`: every key any row has is a column."""
        columns = list(dict.fromkeys(k for row in rows for k in row))
        cell = lambda v: v if v is None or isinstance(v, (bool, int, float, str)) else str(v)  # noqa: E731
        data = [[cell(row.get(c)) for c in columns] for row in rows]
        self.run.log({key: wandb_module().Table(columns=columns, data=data)})

    def images(self, folder, prefix: str = "plots") -> None:
        """Every PNG file of `folder` as a `wandb.Image` under `<prefix>/<file name>`."""
        from PIL import Image

        folder = paths.Path(folder)
        files = sorted(folder.glob("*.png")) if folder.is_dir() else []
        wandb = wandb_module()
        images = {f"{prefix}/{f.stem}": wandb.Image(Image.open(io.BytesIO(f.read_bytes()))) for f in files}
        if images:
            self.run.log(images)

    def finish(self) -> None:
        self.run.finish()


def _scalars(values: dict, prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _scalars(value, f"{prefix}/{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{key}"] = value
    return out


def log_report(settings: WandbSettings | None, run_dir, results: dict[str, dict]) -> None:
    """A pipeline's evaluation: every number of each model's evaluation as the summary
    `eval/<model>/<metric>` (`eval/<model>/per_task/<task>/<metric>` for a mix), and `plots/*.png`."""
    run = WandbRun.start(settings, run_dir, job_type="eval")
    if run is None:
        return
    try:
        run.summary({k: v for name, r in results.items() for k, v in _scalars(r, f"eval/{name}").items()})
        run.images(paths.Path(run_dir) / "plots")
    finally:
        run.finish()


def log_study(settings: WandbSettings | None, run_dir, study: dict) -> None:
    """A study: its claims (one row each: comparison, interval, p-values, verdict) as the table `claims`,
    and `plots/*.png`."""
    run = WandbRun.start(settings, run_dir, job_type="study")
    if run is None:
        return
    try:
        run.table("claims", study.get("claims", []))
        run.images(paths.Path(run_dir) / "plots")
    finally:
        run.finish()
