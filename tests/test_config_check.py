"""The run config is parsed once at load into frozen typed sections and checked there; the command line
turns every user error into one line on stderr and exit status 2."""

import dataclasses
import subprocess

import pytest
from conftest import REPO, tiny_cli
from ml_collections import ConfigDict

from aft_jax.config.defaults import default_config
from aft_jax.config.load import load_config
from aft_jax.config.spec import SECTION_TYPES, RunConfig, RunConfigError, field_types, parse_config

TINY = REPO / "configs" / "tiny.py"


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.method=aftt", r"loss\.method='aftt': expected one of vft, aft, rft, rrhf, pro, dpo"),
        ("loss.constraint=bondary", r"loss\.constraint='bondary': expected one of none, detach, boundary"),
        ("task.name=gsm9k", r"task\.name='gsm9k': expected one of gsm8k, .*synthetic"),
        ("task.template=alpacca", r"task\.template='alpacca': expected one of alpaca, plain, chat"),
        ("task.checker=regex", r"task\.checker='regex': expected one of number, choice, exact, math_verify, or empty"),
        ("task.checker_timeout=0", r"task\.checker_timeout=0\.0: expected a positive number of seconds"),
        ("task.without_rationale=star", r"task\.without_rationale='star': expected one of sampled, skip"),
        ("task.name=jsonl", r"task\.files\.train is empty: task\.name='jsonl' reads its training questions"),
        ("task.files.train=a.jsonl", r"task\.files\.train='a\.jsonl' is read only by task\.name='jsonl'"),
        ("model.remat_policy=some", r"model\.remat_policy='some': expected one of none, full"),
        ("model.attention=flash", r"model\.attention='flash': expected one of auto, xla, cudnn"),
        ("model.attention=cudnn", r"model\.attention='cudnn' needs model\.compute_dtype bfloat16 or float16"),
        ("model.param_dtype=float8", r"model\.param_dtype='float8': expected one of float32, bfloat16"),
        ("data.truncation=cut", r"data\.truncation='cut': expected one of completion, drop"),
        ("pipeline.init_from=sft", r"pipeline\.init_from='sft': expected one of base, vft"),
        ("train.mesh=fsdpp", r"train\.mesh='fsdpp': unknown mesh preset"),
        ("sample.mesh=1,2", r"sample\.mesh='1,2': mesh shape \[1, 2\] must have 3 sizes"),
        ("loss.beta=-0.1", r"loss\.beta=-0\.1: expected a number >= 0"),
        ("sample.top_p=1.5", r"sample\.top_p=1\.5: expected a number in \(0, 1\]"),
        ("train.grad_accum=3", r"train\.batch_size=8 must be a multiple of train\.grad_accum=3"),
        ("data.group_size=1", r"data\.group_size=1: alignment methods compare candidates"),
        ("model.tokenizer=", r"model\.path is empty"),
        ("model.build_vocab_size=100", r"model\.build_vocab_size=100: expected at least 260"),
        ("pipeline.methods=aft_bc,aft_xx", r"pipeline\.methods: unknown 'aft_xx'; known: aft_bc"),
        ("pipeline.rounds=0", r"pipeline\.rounds=0: expected a positive number"),
        ("pipeline.round_init=base", r"pipeline\.round_init='base': expected one of previous, start"),
        ("pipeline.methods=", r"pipeline\.rounds=2: rounds repeat the alignment runs; set pipeline\.methods"),
    ],
)
def test_a_config_mistake_fails_at_load_naming_key_value_and_choices(override, message):
    with pytest.raises(RunConfigError, match=message):
        load_config(TINY, [override, *(["pipeline.rounds=2"] if override == "pipeline.methods=" else [])])


def test_sections_are_frozen_and_typed_and_replace_checks_again():
    config = load_config(TINY, ["optim.lr=1"])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.loss.beta = 0.5
    changed = config.replace(loss={"beta": 0.5}, run_dir="elsewhere")
    assert (changed.loss.beta, changed.run_dir, config.loss.beta) == (0.5, "elsewhere", 0.1)
    with pytest.raises(RunConfigError, match=r"loss\.method='nope'"):
        config.replace(loss={"method": "nope"})
    with pytest.raises(RunConfigError, match=r"loss\.beta='high': expected float, got str"):
        config.replace(loss={"beta": "high"})
    assert load_config(TINY, command="vft").loss.method == "vft"
    with pytest.raises(RunConfigError, match=r"set data\.train_file to the output of `aft-jax sample`"):
        load_config(TINY, command="aft")


RENAMED = (
    r"^model\.dtype was renamed to model\.param_dtype \(the parameter dtype; model\.compute_dtype is the compute "
    r"dtype\)$"
)


def test_the_renamed_parameter_dtype_key_names_its_new_name(tmp_path):
    """`model.dtype` (the parameters' dtype, easy to take for ModelConfig.dtype, the compute dtype) is now
    `model.param_dtype`: an override, a preset or a dict that still sets it fails with one line naming it."""
    assert load_config(TINY, ["model.param_dtype=bfloat16"]).model.param_dtype == "bfloat16"
    with pytest.raises(RunConfigError, match=RENAMED):
        load_config(TINY, ["model.dtype=bfloat16"])
    preset = tmp_path / "old_preset.py"
    preset.write_text(
        "from aft_jax.config.defaults import default_config\n\n\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.model.path = 'smollm2'\n"
        "    c.model.dtype = 'bfloat16'\n"
        "    return c\n"
    )
    with pytest.raises(RunConfigError, match=RENAMED):
        load_config(preset)
    as_dict = load_config(TINY).to_dict()
    as_dict["model"]["dtype"] = as_dict["model"].pop("param_dtype")
    with pytest.raises(RunConfigError, match=RENAMED):
        parse_config(as_dict)


def test_the_section_dataclasses_are_the_defaults():
    """`default_config()` is `RunConfig()` as a ConfigDict: the same keys, defaults and types."""
    defaults = default_config()
    assert RunConfig().to_dict() == defaults.to_dict()
    for section, cls in SECTION_TYPES.items():
        assert isinstance(getattr(RunConfig(), section), cls)
        for key, kind in field_types(cls).items():
            value = defaults[section][key]
            assert isinstance(value, ConfigDict if dataclasses.is_dataclass(kind) else kind), (section, key)


def _one_line_error(argv):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if " INFO " not in line and " WARNING " not in line]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, lines
    return lines[0]


def test_command_line_errors_are_one_line_with_exit_status_2(tmp_path):
    line = _one_line_error(tiny_cli("vft", tmp_path / "run", "loss.constraint=bondary"))
    assert line.startswith("aft-jax vft: loss.constraint='bondary': expected one of")
    line = _one_line_error(tiny_cli("vft", tmp_path / "run", "loss.betta=1"))
    assert "unknown config key 'loss.betta'" in line
    bad = tmp_path / "groups.jsonl"
    bad.write_text('{"id": 1, "prompt": "p", "candidates": [{"text": "t", "correct": "yes"}]}\n')
    line = _one_line_error(tiny_cli("aft", tmp_path / "run", f"data.train_file={bad}"))
    assert f"{bad}:1: candidates[0]: field 'correct' should be bool" in line
    missing = tmp_path / "absent"
    line = _one_line_error(tiny_cli("sample", tmp_path / "run", f"model.path={missing}", "model.tokenizer="))
    assert str(missing) in line


def test_debug_shows_the_traceback(tmp_path):
    argv = tiny_cli("vft", tmp_path / "run", "loss.constraint=bondary")
    result = subprocess.run([*argv[:3], "--debug", *argv[3:]], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" in result.stderr and "RunConfigError" in result.stderr


def test_the_attention_choice_is_checked_and_auto_takes_xla_without_a_gpu():
    """`auto` resolves to cuDNN only on a GPU backend in bfloat16 / float16 with a head size it takes; here (a
    CPU) always to XLA. cuDNN asked for explicitly fails where it cannot run, naming what it needs."""
    import jax.numpy as jnp

    from aft_jax.build import model_from_config
    from aft_jax.model.attention import resolve_impl
    from aft_jax.model.config import ConfigError, ModelConfig

    assert resolve_impl("auto", jnp.bfloat16, 64) == "xla"  # no GPU backend in the tests
    assert resolve_impl("cudnn", jnp.float32, 64) == "cudnn" and resolve_impl("xla", jnp.bfloat16, 64) == "xla"
    dims = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    with pytest.raises(ConfigError, match=r"attention='cudnn' needs a bfloat16 or float16 compute dtype"):
        ModelConfig(**dims, head_dim=8, attention="cudnn")
    with pytest.raises(ConfigError, match=r"attention='sdpa'; expected one of \('auto', 'xla', 'cudnn', 'pallas'\)"):
        ModelConfig(**dims, head_dim=8, attention="sdpa")
    config = load_config(TINY, ["model.attention=cudnn", "model.compute_dtype=bfloat16"])
    with pytest.raises(ConfigError, match=r"model\.attention='cudnn' needs an NVIDIA GPU; JAX's backend is 'cpu'"):
        model_from_config(config.model, mesh=None)
