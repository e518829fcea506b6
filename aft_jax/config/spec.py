"""The run configuration as frozen, typed sections, parsed once at load and checked there, before any
model is built or data read.

Each section's fields and types are those of `defaults.default_config()` (one source for keys, types and
defaults); `CHOICES` holds every enum-like key's valid values and `check` every cross-field rule. An
error names the key, the value and what was expected. A stage that needs other settings gets a copy
from `RunConfig.replace(section={key: value})`, checked again.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from aft_jax.config.defaults import default_config
from aft_jax.data.batches import LAYOUTS, TRUNCATION
from aft_jax.data.task_tokenizer import MIN_VOCAB_SIZE
from aft_jax.data.tasks import TASKS, TEMPLATES
from aft_jax.errors import UserError
from aft_jax.method.registry import CONSTRAINTS, METHODS, get_method, method_names, method_settings
from aft_jax.model.attention import ATTENTION_IMPLS, CUDNN_DTYPES
from aft_jax.model.config import REMAT_POLICIES
from aft_jax.parallel.sharding import parse_mesh_shape

DTYPES = ("float32", "bfloat16", "float16")
CHOICES = {
    "model.dtype": DTYPES,
    "model.compute_dtype": DTYPES,
    "model.remat_policy": REMAT_POLICIES,
    "model.attention": ATTENTION_IMPLS,
    "task.name": tuple(TASKS),
    "task.template": TEMPLATES,
    "data.truncation": TRUNCATION,
    "data.layout": LAYOUTS,
    "loss.method": tuple(METHODS),
    "loss.constraint": CONSTRAINTS,
    "loss.vft_targets": ("reference", "positives"),
    "pipeline.init_from": ("base", "vft"),
}
POSITIVE = (
    "data.max_length data.group_size data.pad_multiple train.batch_size train.grad_accum train.log_every "
    "sample.k sample.max_new_tokens sample.batch_size sample.shard_size eval.max_new_tokens eval.sc_k "
    "eval.batch_size loss.logit_chunk optim.lr checkpoint.save_every checkpoint.keep"
).split()
NON_NEGATIVE = (
    "loss.beta loss.beta_dpo loss.lam sample.temperature sample.top_k sample.rows_per_prompt eval.sc_temperature optim.weight_decay "
    "optim.clip_norm optim.warmup_ratio optim.min_lr_ratio"
).split()


class RunConfigError(UserError, ValueError):
    """A run-config value that is malformed, out of range or inconsistent with another."""


def _section_type(name: str, node: ml_collections.ConfigDict) -> type:
    fields = [
        (key, _section_type(key, value) if isinstance(value, ml_collections.ConfigDict) else type(value))
        for key, value in node.items()
    ]
    return dataclasses.make_dataclass(name.capitalize() + "Config", fields, frozen=True)


def _section_from(cls: type, values: dict, where: str):
    expected = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(expected))
    if unknown:
        raise RunConfigError(f"unknown config key {where}{unknown[0]}; valid keys: {', '.join(sorted(expected))}")
    parsed = {}
    for key, kind in expected.items():
        value, dotted = values[key], where + key
        if dataclasses.is_dataclass(kind):
            parsed[key] = _section_from(kind, dict(value), dotted + ".")
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise RunConfigError(f"{dotted}={value!r}: expected {kind.__name__}, got {type(value).__name__}")
        parsed[key] = value
    return cls(**parsed)


def _as_dict(node) -> dict:
    return {k: _as_dict(v) if isinstance(v, ml_collections.ConfigDict) else v for k, v in node.items()}


_DEFAULTS = default_config()
SECTION_TYPES = {k: _section_type(k, v) for k, v in _DEFAULTS.items() if isinstance(v, ml_collections.ConfigDict)}
_TOP = {k: type(v) for k, v in _DEFAULTS.items() if k not in SECTION_TYPES}
RunConfig = dataclasses.make_dataclass(
    "RunConfig",
    [(k, t) for k, t in _TOP.items()] + [(k, t) for k, t in SECTION_TYPES.items()],
    frozen=True,
    namespace={
        "to_dict": lambda self: dataclasses.asdict(self),
        "to_json": lambda self, indent=None: json.dumps(dataclasses.asdict(self), indent=indent),
        "replace": lambda self, **changes: parse_config(_merged(dataclasses.asdict(self), changes)),
        "__doc__": "The checked run configuration: `config.loss.method`, ...; `replace(loss={...})` for a copy.",
    },
)


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_config(config) -> RunConfig:
    """The typed, checked `RunConfig` of a ConfigDict (or a plain dict of the same shape)."""
    values = _as_dict(config) if isinstance(config, ml_collections.ConfigDict) else dict(config)
    run = _section_from(RunConfig, values, "")
    check(run)
    return run


def _get(config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def check(config) -> None:
    """Every enum-like key against its choices, every range and every cross-field rule."""
    for dotted, choices in CHOICES.items():
        if _get(config, dotted) not in choices:
            raise RunConfigError(f"{dotted}={_get(config, dotted)!r}: expected one of {', '.join(choices)}")
    for dotted in POSITIVE:
        if _get(config, dotted) <= 0:
            raise RunConfigError(f"{dotted}={_get(config, dotted)!r}: expected a positive number")
    for dotted in NON_NEGATIVE:
        if _get(config, dotted) < 0:
            raise RunConfigError(f"{dotted}={_get(config, dotted)!r}: expected a number >= 0")
    for dotted in ("train.mesh", "sample.mesh"):
        try:
            parse_mesh_shape(_get(config, dotted))
        except ValueError as err:
            raise RunConfigError(f"{dotted}={_get(config, dotted)!r}: {err}") from None
    if not 0 < config.sample.top_p <= 1:
        raise RunConfigError(f"sample.top_p={config.sample.top_p!r}: expected a number in (0, 1]")
    train = config.train
    if train.batch_size % train.grad_accum:
        raise RunConfigError(
            f"train.batch_size={train.batch_size} must be a multiple of train.grad_accum={train.grad_accum}"
        )
    if config.data.tokens_per_row < config.data.max_length:
        raise RunConfigError(
            f"data.tokens_per_row={config.data.tokens_per_row} must be at least data.max_length="
            f"{config.data.max_length}: a packed row holds at least one whole sequence"
        )
    m = config.model
    if not m.path and not (m.tokenizer and m.random.num_layers > 0):
        raise RunConfigError(
            "model.path is empty: set it (an HF folder, aft_jax model folder, hub name or 'smollm2'), or set "
            "model.tokenizer and model.random.* for a randomly initialised model"
        )
    if m.attention == "cudnn" and m.compute_dtype not in CUDNN_DTYPES:
        raise RunConfigError(
            f"model.attention='cudnn' needs model.compute_dtype bfloat16 or float16, not {m.compute_dtype!r}"
        )
    if m.tokenizer == "build" and m.build_vocab_size < MIN_VOCAB_SIZE:
        raise RunConfigError(
            f"model.build_vocab_size={m.build_vocab_size}: expected at least {MIN_VOCAB_SIZE} (the 256 byte "
            "symbols and the special tokens)"
        )
    if not m.path:
        for key, value in dataclasses.asdict(m.random).items():
            if value <= 0:
                raise RunConfigError(f"model.random.{key}={value}: a random model needs every dimension > 0")
    methods = method_names(config.pipeline.methods)
    for name in methods:
        try:
            method_settings(name)
        except ValueError as err:
            raise RunConfigError(str(err)) from None
    trains_groups = get_method(config.loss.method).needs_groups or bool(methods)
    if trains_groups and config.data.group_size < 2:
        raise RunConfigError(
            f"data.group_size={config.data.group_size}: alignment methods compare candidates; expected >= 2"
        )


def check_command(config, command: str) -> None:
    """Rules of one command: `aft` trains an alignment method on a groups file."""
    if command == "aft" and not config.data.train_file and get_method(config.loss.method).needs_groups:
        raise RunConfigError(
            f"loss.method={config.loss.method!r} trains on candidate groups: set data.train_file to the output "
            "of `aft-jax sample`"
        )
