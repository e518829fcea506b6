"""The run configuration as frozen, typed sections, parsed once at load and checked there, before any
model is built or data read.

The section dataclasses below are the one source for keys, types and defaults (with each key's meaning);
`defaults.default_config()` is the same as a ConfigDict, which presets (`configs/*.py`) override.
`CHOICES` holds every enum-like key's valid values and `check` every cross-field rule. An error names the
key, the value and what was expected. A stage that needs other settings gets a copy from
`RunConfig.replace(section={key: value})`, checked again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from typing import Any

import ml_collections

from aft_jax.data.batches import LAYOUTS, TRUNCATION
from aft_jax.data.task_tokenizer import MIN_VOCAB_SIZE
from aft_jax.data.tasks import TASKS, TEMPLATES
from aft_jax.errors import UserError
from aft_jax.method.registry import CONSTRAINTS, METHODS, alignment_run, get_method, method_names
from aft_jax.model.attention import ATTENTION_IMPLS, CUDNN_DTYPES
from aft_jax.model.config import LORA_TARGETS, QUANTIZATIONS, REMAT_POLICIES, ConfigError, LoraConfig
from aft_jax.parallel.sharding import parse_mesh_shape


@dataclasses.dataclass(frozen=True)
class RandomModelSection:
    """`model.random`: the dimensions of a randomly initialised model (used when `model.path` is empty)."""

    hidden_size: int = 0
    intermediate_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """`model.lora`: low-rank adapters (`aft_jax.model.lora`); rank 0 trains every weight."""

    rank: int = 0  # > 0: train adapters of this rank only
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank (PEFT's lora_alpha)
    targets: str = ",".join(LORA_TARGETS)  # comma-separated projections among q,k,v,o,gate,up,down
    dropout: float = 0.0  # only 0 (no dropout on the adapter's input) is implemented
    quantize: str = "none"  # none | int8 | nf4: how the frozen base projections are stored (QLoRA)
    init_from: str = ""  # a PEFT adapter folder to start from (else new adapters: A random, B = 0)
    merge_for_sampling: bool = True  # sample and evaluate with W + scale * A B merged once (not with nf4/int8)

    def lora_config(self) -> LoraConfig | None:
        """The model's `LoraConfig`, or None at rank 0."""
        if self.rank == 0:
            return None
        targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        return LoraConfig(self.rank, self.alpha, targets, self.quantize)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """`model`: which model, its tokenizer, dtypes and memory layout."""

    path: str = ""  # HF folder, aft_jax model folder or hub name; empty with `random` set: random init
    tokenizer: str = ""  # a folder, hub name, "smollm2" or "build" (trained on the task); empty: model.path's own
    build_vocab_size: int = 384  # tokenizer "build": at most this many tokens (fewer if merges run out)
    param_dtype: str = "float32"  # the parameters' dtype (ModelConfig.param_dtype); was `model.dtype`
    compute_dtype: str = "float32"  # activations' dtype (aft_jax.model.config.ModelConfig.dtype)
    remat_policy: str = "none"  # none | full | dots | dots_no_batch
    attention: str = "auto"  # auto (pallas: packed rows on TPU; cudnn where it applies) | xla | cudnn | pallas
    random: RandomModelSection = dataclasses.field(default_factory=RandomModelSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)


@dataclasses.dataclass(frozen=True)
class TaskFilesSection:
    """`task.files`: the files of task.name='jsonl', one per split (.jsonl, .json, .csv or .parquet)."""

    train: str = ""
    test: str = ""
    validation: str = ""


@dataclasses.dataclass(frozen=True)
class TaskFieldsSection:
    """`task.fields`: the record keys of task.name='jsonl'."""

    question: str = "question"
    answer: str = "answer"  # the gold answer, as task.checker reads it
    rationale: str = ""  # a reference chain of thought ending with the answer; empty: none (task.without_rationale)


@dataclasses.dataclass(frozen=True)
class TaskSection:
    """`task`: the benchmark, its prompt template and splits."""

    name: str = "gsm8k"  # gsm8k | gsm8k_rank | aqua_rat | ecqa | synthetic | mix | jsonl (your own files)
    data_dir: str = ""  # the benchmark data folder; empty: $AFT_DATA_DIR
    template: str = "alpaca"  # alpaca | plain | chat
    train_split: str = "train"
    eval_split: str = "test"
    validation_split: str = "validation"  # for choices (beta, lr, epochs); see eval.validation_limit
    limit: int = -1  # > 0: use only the first N training questions
    synthetic_train: int = 2000  # sizes of the generated synthetic splits
    synthetic_validation: int = 500
    synthetic_test: int = 200
    files: TaskFilesSection = dataclasses.field(default_factory=TaskFilesSection)
    fields: TaskFieldsSection = dataclasses.field(default_factory=TaskFieldsSection)
    checker: str = ""  # empty: the task's own | number | choice | exact | math_verify (aft_jax.data.tasks.checkers)
    checker_timeout: float = 5.0  # seconds per math_verify check; a check past it counts as wrong
    without_rationale: str = "sampled"  # no task.fields.rationale: VFT on the starting model's accepted samples | skip


@dataclasses.dataclass(frozen=True)
class SampleSection:
    """`sample`: drawing the candidate groups (`aft-jax sample`)."""

    k: int = 6  # samples per training question
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 32  # rows (question x sample) decoding together
    rows_per_prompt: int = 0  # rows per prompt slot, sampling and evaluation; 0: k if questions <= rows, else 1
    shard_size: int = 256  # questions per groups shard
    out_dir: str = ""  # empty: <run_dir>/groups
    mesh: str = "fsdp"  # over each process's own devices (it samples its own shards)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """`eval`: accuracy, self-consistency and assessment accuracy on held-out questions."""

    limit: int = 200  # test questions for accuracy and self-consistency (<= 0: all)
    max_new_tokens: int = 256
    sc_k: int = 8  # samples per question for self-consistency
    sc_temperature: float = 0.7
    validation_limit: int = 0  # > 0: also greedy accuracy on the first N questions of task.validation_split
    group_questions: int = 100  # test questions whose sampled groups measure assessment accuracy
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class PipelineSection:
    """`pipeline`: VFT, sampling, then each alignment method (`aft-jax pipeline`)."""

    methods: str = "aft_bc,aft_dc,rft"  # alignment runs after VFT; see aft_jax.method.registry.PRESETS
    init_from: str = "base"  # base | vft: where each alignment run starts
    vft_epochs: int = 3
    align_epochs: int = 3
    align_lr: float = -1.0  # peak learning rate of the alignment runs; negative: optim.lr
    rounds: int = 1  # R: round r >= 2 samples new groups from round r-1's model of each method and aligns again
    round_init: str = "previous"  # previous: round r aligns round r-1's model | start: init_from, all rounds' groups


@dataclasses.dataclass(frozen=True)
class StudySection:
    """`study`: the pipeline over seeds and sweeps (`aft-jax study`)."""

    seeds: str = "0"  # `aft-jax study`: one pipeline run per seed, in <run_dir>/seed-<n>
    betas: str = ""  # e.g. "0.05,0.1,0.3,1.0": also AFT-BC once per beta (claim 7)
    lrs: str = ""  # e.g. "1e-3,3e-4,1e-4": also AFT-BC once per alignment learning rate


@dataclasses.dataclass(frozen=True)
class DataSection:
    """`data`: the training file and how its examples become batches."""

    train_file: str = ""  # groups (file or folder of shards) or VFT pairs; empty for VFT: the task's train split
    max_length: int = 512
    group_size: int = 8  # K: candidate slots per group (6 samples + reference + room)
    truncation: str = "completion"  # completion | drop
    pad_multiple: int = 64
    layout: str = "packed"  # packed: each prompt once, groups in rows of tokens_per_row | padded: [B, K, T]
    tokens_per_row: int = 1024  # packed rows' token budget (>= max_length); a longer group is split over rows
    rows_by_cost: bool = True  # packed: each batch's row length (<= tokens_per_row), or padded, by estimated cost
    shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class LossSection:
    """`loss`: the training objective (aft_jax.method)."""

    method: str = "aft"  # aft_jax.method.registry.METHODS: vft | aft | rft | rrhf | pro | dpo
    constraint: str = "boundary"  # none | detach | boundary
    beta: float = 0.1  # boundary margin
    beta_dpo: float = 0.1
    lam: float = 1.0  # lambda: weight of the alignment term
    vft_weight: float = -1.0  # weight of the NLL term; negative: method default (0 for dpo, else 1)
    vft_targets: str = "reference"  # reference | positives
    use_levels: bool = False  # rank by `level` (GSM8K-RANK) instead of correct / incorrect
    logit_chunk: int = 128  # positions per chunk of the vocabulary projection


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """`optim`: AdamW with warmup and cosine decay."""

    lr: float = 2e-5
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """`train`: steps, batches and the training mesh."""

    batch_size: int = 128  # question groups per optimizer step (global)
    grad_accum: int = 1  # micro-batches per step
    num_epochs: int = 3
    max_steps: int = -1  # > 0 overrides num_epochs
    log_every: int = 1
    mesh: str = "fsdp"  # preset name (aft_jax.sharding.MESH_PRESETS) or "data,fsdp,tensor" sizes
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """`checkpoint`: training checkpoints and the exported model."""

    save_every: int = 500
    keep: int = 2
    async_save: bool = True
    export_hf: bool = False  # also write the final model as a HF folder


@dataclasses.dataclass(frozen=True)
class LogSection:
    """`log`: Weights & Biases, besides metrics.jsonl and TensorBoard (`aft_jax.io.wandb_log`)."""

    wandb: bool = False  # send metrics, evaluations, the claims table and plots to W&B (pip install 'aft_jax[wandb]')
    wandb_project: str = "aft-jax"
    wandb_entity: str = ""  # empty: the API key's default entity
    wandb_run_name: str = ""  # empty: the run directory's name; a pipeline's runs add /vft, /aft_bc, ...
    wandb_group: str = ""  # empty: the run name (a study's seeds: the study's)
    wandb_tags: str = ""  # comma-separated
    wandb_mode: str = ""  # online | offline | "": online, or offline without an API key or network (WANDB_MODE wins)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The checked run configuration: `config.loss.method`, ...; `replace(loss={...})` for a copy."""

    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    task: TaskSection = dataclasses.field(default_factory=TaskSection)
    sample: SampleSection = dataclasses.field(default_factory=SampleSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    pipeline: PipelineSection = dataclasses.field(default_factory=PipelineSection)
    study: StudySection = dataclasses.field(default_factory=StudySection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(dataclasses.asdict(self), indent=indent)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with `section={key: value}` (or top-level `key=value`) changes, parsed and checked again."""
        return parse_config(_merged(dataclasses.asdict(self), changes))


@functools.cache
def field_types(cls: type) -> dict[str, type]:
    """Each field of a section (or `RunConfig`) and its type: str, int, float, bool or a section."""
    return typing.get_type_hints(cls)


SECTION_TYPES: dict[str, type] = {k: t for k, t in field_types(RunConfig).items() if dataclasses.is_dataclass(t)}

DTYPES = ("float32", "bfloat16", "float16")
CHOICES = {
    "model.param_dtype": DTYPES,
    "model.compute_dtype": DTYPES,
    "model.remat_policy": REMAT_POLICIES,
    "model.attention": ATTENTION_IMPLS,
    "model.lora.quantize": QUANTIZATIONS,
    "task.name": tuple(TASKS),
    "task.template": TEMPLATES,
    "task.without_rationale": ("sampled", "skip"),
    "data.truncation": TRUNCATION,
    "data.layout": LAYOUTS,
    "loss.method": tuple(METHODS),
    "loss.constraint": CONSTRAINTS,
    "loss.vft_targets": ("reference", "positives"),
    "pipeline.init_from": ("base", "vft"),
    "pipeline.round_init": ("previous", "start"),
    "log.wandb_mode": ("", "online", "offline"),
}
POSITIVE = (
    "data.max_length data.group_size data.pad_multiple train.batch_size train.grad_accum train.log_every "
    "sample.k sample.max_new_tokens sample.batch_size sample.shard_size eval.max_new_tokens eval.sc_k "
    "eval.batch_size loss.logit_chunk optim.lr checkpoint.save_every checkpoint.keep pipeline.rounds"
).split()
NON_NEGATIVE = (
    "loss.beta loss.beta_dpo loss.lam sample.temperature sample.top_k sample.rows_per_prompt eval.sc_temperature "
    "optim.weight_decay optim.clip_norm optim.warmup_ratio optim.min_lr_ratio model.lora.rank model.lora.alpha"
).split()
# Keys that were renamed: old dotted key -> (new dotted key, what it is). A config (preset, override or dict)
# that still sets the old key fails with one line naming the new one.
RENAMED = {
    "model.dtype": ("model.param_dtype", "the parameter dtype; model.compute_dtype is the compute dtype"),
}


class RunConfigError(UserError, ValueError):
    """A run-config value that is malformed, out of range or inconsistent with another."""


def renamed_message(dotted: str) -> str | None:
    """The error for a renamed key (`RENAMED`), or None for any other key."""
    if dotted not in RENAMED:
        return None
    new, what = RENAMED[dotted]
    return f"{dotted} was renamed to {new} ({what})"


def _section_from(cls: type, values: dict, where: str) -> Any:
    expected = field_types(cls)
    unknown = sorted(set(values) - set(expected))
    for key in unknown:
        if message := renamed_message(where + key):
            raise RunConfigError(message)
    if unknown:
        raise RunConfigError(f"unknown config key {where}{unknown[0]}; valid keys: {', '.join(sorted(expected))}")
    missing = sorted(set(expected) - set(values))
    if missing:
        raise RunConfigError(f"missing config key {where}{missing[0]}; a config needs every key of {cls.__name__}")
    parsed: dict[str, Any] = {}
    for key, kind in expected.items():
        value, dotted = values[key], where + key
        if dataclasses.is_dataclass(kind):
            if isinstance(value, ml_collections.ConfigDict):
                value = _as_dict(value)
            if not isinstance(value, dict):
                raise RunConfigError(f"{dotted}={value!r}: expected a section of keys, got {type(value).__name__}")
            parsed[key] = _section_from(kind, value, dotted + ".")
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise RunConfigError(f"{dotted}={value!r}: expected {kind.__name__}, got {type(value).__name__}")
        parsed[key] = value
    return cls(**parsed)


def _as_dict(node: ml_collections.ConfigDict) -> dict[str, Any]:
    return {k: _as_dict(v) if isinstance(v, ml_collections.ConfigDict) else v for k, v in node.items()}


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_config(config: ml_collections.ConfigDict | dict[str, Any]) -> RunConfig:
    """The typed, checked `RunConfig` of a ConfigDict (or a plain dict of the same shape)."""
    values = _as_dict(config) if isinstance(config, ml_collections.ConfigDict) else dict(config)
    run: RunConfig = _section_from(RunConfig, values, "")
    check(run)
    return run


def _get(config: RunConfig, dotted: str) -> Any:
    value: Any = config
    for key in dotted.split("."):
        value = getattr(value, key)
    return value


def check_task(t: TaskSection) -> None:
    """The task's rules: its checker, and the files and fields of task.name='jsonl' (read only by it)."""
    from aft_jax.data.tasks.checkers import CHECKERS, math_verify_missing
    from aft_jax.data.tasks.jsonl import file_format_error

    if t.checker not in ("", *CHECKERS):
        raise RunConfigError(
            f"task.checker={t.checker!r}: expected one of {', '.join(CHECKERS)}, or empty for the task's own"
        )
    if t.checker == "math_verify" and math_verify_missing():
        raise RunConfigError("task.checker='math_verify' needs the math-verify package: pip install 'aft_jax[verify]'")
    if t.checker_timeout <= 0:
        raise RunConfigError(f"task.checker_timeout={t.checker_timeout!r}: expected a positive number of seconds")
    if t.name != "jsonl":
        for section, default in (("files", TaskFilesSection()), ("fields", TaskFieldsSection())):
            for key, value in dataclasses.asdict(getattr(t, section)).items():
                if value != getattr(default, key):
                    raise RunConfigError(
                        f"task.{section}.{key}={value!r} is read only by task.name='jsonl' (task.name={t.name!r})"
                    )
        return
    if not t.files.train:
        raise RunConfigError(
            "task.files.train is empty: task.name='jsonl' reads its training questions from that file (.jsonl, .json, "
            ".csv or .parquet)"
        )
    for split, path in dataclasses.asdict(t.files).items():
        if path and (message := file_format_error(split, path)):
            raise RunConfigError(message)
    for key in ("question", "answer"):
        if not getattr(t.fields, key):
            raise RunConfigError(f"task.fields.{key} is empty: expected the record key of the {key}")
    if not t.checker:
        raise RunConfigError(
            f"task.checker is empty: task.name='jsonl' has no checker of its own; expected one of {', '.join(CHECKERS)}"
        )


def check(config: RunConfig) -> None:
    """Every enum-like key against its choices, every range and every cross-field rule."""
    for dotted, choices in CHOICES.items():
        if _get(config, dotted) not in choices:
            raise RunConfigError(f"{dotted}={_get(config, dotted)!r}: expected one of {', '.join(choices)}")
    check_task(config.task)
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
    if m.lora.dropout != 0:
        raise RunConfigError(
            f"model.lora.dropout={m.lora.dropout!r}: only 0 is implemented (the training objective carries no "
            "random key into the forward)"
        )
    try:
        m.lora.lora_config()
    except ConfigError as err:
        raise RunConfigError(f"model.lora: {err}") from None
    if m.lora.rank == 0 and (m.lora.quantize != "none" or m.lora.init_from):
        raise RunConfigError(
            f"model.lora.quantize={m.lora.quantize!r}, model.lora.init_from={m.lora.init_from!r} need adapters: "
            "set model.lora.rank > 0"
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
            alignment_run(name)
        except ValueError as err:
            raise RunConfigError(str(err)) from None
    if config.pipeline.rounds > 1 and not methods:
        raise RunConfigError(
            f"pipeline.rounds={config.pipeline.rounds}: rounds repeat the alignment runs; set pipeline.methods"
        )
    trains_groups = get_method(config.loss.method).needs_groups or bool(methods)
    for tag in config.log.wandb_tags.split(",") if config.log.wandb_tags else ():
        if not 0 < len(tag.strip()) <= 64:
            raise RunConfigError(
                f"log.wandb_tags={config.log.wandb_tags!r}: expected comma-separated tags of 1 to 64 characters"
            )
    if trains_groups and config.data.group_size < 2:
        raise RunConfigError(
            f"data.group_size={config.data.group_size}: alignment methods compare candidates; expected >= 2"
        )


def check_command(config: RunConfig, command: str | None) -> None:
    """Rules of one command: `aft` trains an alignment method on a groups file."""
    if command == "aft" and not config.data.train_file and get_method(config.loss.method).needs_groups:
        raise RunConfigError(
            f"loss.method={config.loss.method!r} trains on candidate groups: set data.train_file to the output "
            "of `aft-jax sample`"
        )
