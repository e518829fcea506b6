"""Every training method in one table: what it needs, its alignment loss, and the pipeline names it has.

A record's `align(scores_bk, sum_logp_bk, levels_bk, batch, loss_cfg) -> [B]` is the per-group alignment
loss (None: the objective is the VFT term alone). Adding a loss is one function in `losses` plus one
entry here; the objective, the trainer, the memory plan, the config check and the pipeline read it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from aft_jax.errors import UserError
from aft_jax.method import losses

CONSTRAINTS = ("none", "detach", "boundary")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # the value of `loss.method`
    align: Callable | None  # the per-group alignment loss `[B]`; None for the NLL-only methods
    needs_groups: bool = True  # trains on a candidate-groups file (VFT: (question, reference) pairs)
    needs_reference_logps: bool = False  # candidates must carry the sampling model's `logp_sum` (DPO)
    vft_weight: float = 1.0  # the NLL term's weight when `loss.vft_weight` is negative
    vft_rows: str = ""  # "positives": the NLL term trains on every positive (RFT); "": `loss.vft_targets`
    presets: dict = dataclasses.field(default_factory=dict)  # pipeline name suffix -> constraint
    rank_presets: dict = dataclasses.field(default_factory=dict)  # the same, ranking by levels (`aft_bc_rank`)


def _rank_loss(fn):
    def align(scores_bk, sum_logp_bk, levels_bk, batch, loss_cfg):
        return fn(scores_bk, levels_bk, batch["valid"], constraint=loss_cfg.constraint, beta=loss_cfg.beta)

    return align


def _dpo(scores_bk, sum_logp_bk, levels_bk, batch, loss_cfg):
    return losses.dpo_loss(
        sum_logp_bk,
        batch["ref_logp_sum"],
        levels_bk,
        batch["valid"],
        beta_dpo=loss_cfg.beta_dpo,
        constraint=loss_cfg.constraint,
        scores_bk=scores_bk,
        beta=loss_cfg.beta,
    )


_BASELINE = {"": "none", "_bc": "boundary", "_dc": "detach"}  # rrhf, rrhf_bc, rrhf_dc
_AFT = {"_bc": "boundary", "_dc": "detach", "_none": "none"}
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("vft", None, needs_groups=False),
        Method("aft", _rank_loss(losses.ranking_loss), presets=_AFT, rank_presets={"_bc": "boundary", "_dc": "detach"}),
        Method("rft", None, vft_rows="positives", presets={"": "none"}),
        Method("rrhf", _rank_loss(losses.rrhf_loss), presets=_BASELINE, rank_presets={"": "none"}),
        Method("pro", _rank_loss(losses.pro_loss), presets=_BASELINE),
        Method("dpo", _dpo, needs_reference_logps=True, vft_weight=0.0, presets=_BASELINE),
    )
}


def _presets() -> dict[str, dict]:
    table = {}
    for m in METHODS.values():
        for suffix, c in m.presets.items():
            table[m.name + suffix] = {"method": m.name, "constraint": c}
        for suffix, c in m.rank_presets.items():
            table[f"{m.name}{suffix}_rank"] = {"method": m.name, "constraint": c, "use_levels": True}
    return table


PRESETS: dict[str, dict] = _presets()  # pipeline method name -> the `loss` settings it stands for


@dataclasses.dataclass(frozen=True)
class AlignmentRun:
    """One alignment run of the pipeline, as data: its `name` (its folder and its model's name in reports),
    the `loss` keys it sets and its peak learning rate `lr` (None: the pipeline's `pipeline.align_lr`)."""

    name: str
    loss: dict
    lr: float | None = None

    def varied(self, *, beta: float | None = None, lr: float | None = None) -> AlignmentRun:
        """This run with another boundary margin or learning rate, named `<name>-beta<b>` / `-lr<lr>`."""
        name, loss = self.name, dict(self.loss)
        if beta is not None:
            name, loss["beta"] = f"{name}-beta{beta:g}", beta
        if lr is not None:
            name, lr = f"{name}-lr{lr:g}", lr
        return AlignmentRun(name, loss, lr if lr is not None else self.lr)


SUFFIXES = {"beta": ("loss", "beta"), "lr": ("optim", "lr")}  # name suffix -> the (section, key) it sets
_SUFFIX_NAMES = "|".join(SUFFIXES)
_SUFFIX = re.compile(rf"-({_SUFFIX_NAMES})(.*?)(?=-(?:{_SUFFIX_NAMES})|$)")  # -<name><value>, to the next suffix
_KNOWN_SUFFIXES = ", ".join(f"-{key}<value>" for key in SUFFIXES)


class MethodNameError(UserError, ValueError):
    """A `pipeline.methods` name that is not a preset with known suffixes."""


def alignment_run(name: str) -> AlignmentRun:
    """The run a `pipeline.methods` name stands for: `loss` from its `PRESETS` key, and with suffixes
    `-beta<value>` the boundary margin (`loss.beta`) and `-lr<value>` the peak learning rate of its
    alignment run, e.g. `aft_bc-beta0.3` or `aft_bc-lr0.0003` (the names `AlignmentRun.varied` gives)."""
    preset = name.split("-", 1)[0]
    if preset not in PRESETS:
        raise MethodNameError(f"pipeline.methods: unknown {name!r}; known: {', '.join(PRESETS)} (+ {_KNOWN_SUFFIXES})")
    settings: dict = {"loss": dict(PRESETS[preset]), "optim": {}}
    rest, end = name[len(preset) :], 0
    for match in _SUFFIX.finditer(rest):
        if match.start() != end:
            break
        key, text = match.groups()
        try:
            value = float(text)
        except ValueError:
            raise MethodNameError(f"pipeline.methods: {name!r}: {text!r} after -{key} is not a number") from None
        section, field = SUFFIXES[key]
        settings[section][field] = value
        end = match.end()
    if end != len(rest):
        raise MethodNameError(f"pipeline.methods: {name!r}: unknown suffix {rest[end:]!r}; known: {_KNOWN_SUFFIXES}")
    return AlignmentRun(name, settings["loss"], settings["optim"].get("lr"))


def method_names(text: str) -> list[str]:
    """The names of a comma-separated `pipeline.methods`."""
    return [name.strip() for name in text.split(",") if name.strip()]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MethodNameError(f"loss.method={name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]
