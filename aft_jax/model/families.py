"""The model families, keyed by Hugging Face `model_type`: each maps `config.json` to a `ModelConfig` and back,
turns on the module options it needs, names its weight specs and the architecture written on export.

| model_type | architecture | options |
|---|---|---|
| llama | LlamaForCausalLM | (none): Llama 1/2/3, SmolLM2 |
| mistral | MistralForCausalLM | `sliding_window` on every layer (`null`: none) |
| qwen2 | Qwen2ForCausalLM | `qkv_bias`; `sliding_window` on the layers `layer_types` marks, when `use_sliding_window` |
| qwen3 | Qwen3ForCausalLM | `qk_norm`, an explicit `head_dim`; sliding as qwen2 |

Adding a family is one `Family` in `FAMILIES`: transformers' defaults for the keys a `config.json` may leave
out, how it reads and writes its own keys (the common ones, sizes, RoPE, tokens, are read by `config_from_hf`
for all), plus, for a layer the others do not have, an option in `ModelConfig`, its use in `layers.py` and
its tensors in `hf_weights.weight_specs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from aft_jax.model import hf_weights
from aft_jax.model.config import SUPPORTED_ROPE_TYPES, ConfigError, ModelConfig, RopeScaling

Options = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
    """`defaults`: the values transformers' config class gives keys that `config.json` leaves out;
    `read(hf, source, num_layers)`: the family's `ModelConfig` fields from `config.json` (raising
    `ConfigError` for what it cannot represent); `write(config)`: its `config.json` keys."""

    model_type: str
    architecture: str
    defaults: Options
    read: Callable[[Mapping[str, Any], str, int], Options]
    write: Callable[[ModelConfig], Options]
    weight_specs: Callable[[ModelConfig], list[hf_weights.WeightSpec]] = hf_weights.weight_specs


def _no_bias(hf, source: str) -> None:
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported for model_type {hf['model_type']!r}")


def _read_llama(hf, source, num_layers) -> Options:
    _no_bias(hf, source)
    return {}


def _read_mistral(hf, source, num_layers) -> Options:
    _no_bias(hf, source)
    window = hf["sliding_window"]
    return {"sliding_window": None} if window is None else _window(window, range(num_layers), source)


def _write_mistral(cfg: ModelConfig) -> Options:
    if cfg.sliding_window is not None and cfg.sliding_layers != tuple(range(cfg.num_layers)):
        raise ConfigError(
            f"mistral slides its window over every layer; this config slides it over {list(cfg.sliding_layers)}"
        )
    return {"sliding_window": cfg.sliding_window}


def _read_qwen_window(hf, source, num_layers) -> Options:
    """Qwen's window: only with `use_sliding_window`, on the layers `layer_types` marks "sliding_attention"
    (without `layer_types`: the layers from `max_window_layers` on, as transformers derives them); no
    window where no layer slides."""
    window = hf["sliding_window"]
    if not hf.get("use_sliding_window") or window is None:
        return {}
    types = hf.get("layer_types")
    if types is None:
        first = int(hf["max_window_layers"])
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ConfigError(f"{source}: layer_types={types} is not {num_layers} of 'sliding_attention'/'full_attention'")
    layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    return _window(window, layers, source) if layers else {}


def _window(window, layers, source) -> Options:
    if not isinstance(window, int) or window < 1:
        raise ConfigError(f"{source}: sliding_window={window!r}; expected a positive integer or null")
    return {"sliding_window": window, "sliding_layers": tuple(layers)}


def _write_qwen_window(cfg: ModelConfig) -> Options:
    types = ["sliding_attention" if cfg.window_of(i) else "full_attention" for i in range(cfg.num_layers)]
    return {
        "use_sliding_window": cfg.sliding_window is not None,
        "sliding_window": cfg.sliding_window,
        "max_window_layers": min(cfg.sliding_layers, default=cfg.num_layers),
        "layer_types": types,
    }


def _read_qwen2(hf, source, num_layers) -> Options:
    return {"qkv_bias": True, **_read_qwen_window(hf, source, num_layers)}


def _write_qwen3(cfg: ModelConfig) -> Options:
    return {"attention_bias": False, **_write_qwen_window(cfg)}


def _read_qwen3(hf, source, num_layers) -> Options:
    if hf.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true (Qwen3 with biases on q/k/v/o) is not supported")
    return {"qk_norm": True, **_read_qwen_window(hf, source, num_layers)}


_LLAMA_TOKENS = {"bos_token_id": 1, "eos_token_id": 2}
_QWEN = {
    "bos_token_id": None,
    "eos_token_id": None,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "max_window_layers": 28,
}
FAMILIES = {
    f.model_type: f
    for f in (
        Family(
            "llama",
            "LlamaForCausalLM",
            {**_LLAMA_TOKENS, "max_position_embeddings": 2048},
            _read_llama,
            lambda cfg: {"attention_bias": False, "mlp_bias": False},
        ),
        Family(
            "mistral",
            "MistralForCausalLM",
            {**_LLAMA_TOKENS, "max_position_embeddings": 4096 * 32, "sliding_window": 4096},
            _read_mistral,
            _write_mistral,
        ),
        Family("qwen2", "Qwen2ForCausalLM", _QWEN, _read_qwen2, _write_qwen_window),
        Family("qwen3", "Qwen3ForCausalLM", {**_QWEN, "head_dim": 128}, _read_qwen3, _write_qwen3),
    )
}


def family_of(config: ModelConfig) -> Family:
    return FAMILIES[config.family]


def supported() -> str:
    return ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())


_INTEGER_FIELDS = (
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads head_dim "
    "max_position_embeddings"
).split()
_REAL_FIELDS = ("rms_norm_eps", "initializer_range", "rope_theta")


def _check_numbers(hf: Mapping[str, Any], source: str) -> None:
    """Every size field a positive integer (or absent / null where it has a default), every real a number."""
    for key in _INTEGER_FIELDS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{source}: {key}={value!r}; expected a positive integer")
    for key in _REAL_FIELDS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{source}: {key}={value!r}; expected a number")


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json", **overrides) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face `config.json` dict (transformers 4 or 5 layout) of any family in
    `FAMILIES`; `overrides` replace fields (dtypes, remat policy)."""
    archs = list(hf.get("architectures") or [])
    family = FAMILIES.get(hf.get("model_type"))
    if family is None or (archs and family.architecture not in archs):
        raise ConfigError(
            f"{source}: unsupported model family (model_type={hf.get('model_type')!r}, architectures={archs}); "
            f"aft_jax supports {supported()}"
        )
    hf = {**family.defaults, **hf}
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported, expected 'silu'")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {missing}")
    _check_numbers(hf, source)
    num_heads, num_layers = int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
    rope_theta, rope_scaling = _rope_from_hf(hf, source)
    fields = dict(
        family=family.model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(hf["max_position_embeddings"]),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf["bos_token_id"],
        eos_token_ids=eos_ids(hf["eos_token_id"]),
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        **family.read(hf, source, num_layers),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A `config.json` dict that transformers 4 and 5 both load as the family's architecture."""
    family = family_of(config)
    scaling = config.rope_scaling.to_hf() if config.rope_scaling else None
    eos: int | list[int] = list(config.eos_token_ids)
    if len(eos) == 1:
        eos = eos[0]
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
        "torch_dtype": config.param_dtype,
        **family.write(config),
    }


def eos_ids(value) -> tuple[int, ...]:
    """`eos_token_id` of a config.json or generation_config.json (an id, a list of ids or null) as a tuple."""
    return tuple(int(e) for e in (value if isinstance(value, (list, tuple)) else [value]) if e is not None)


def _rope_from_hf(hf: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = {**legacy, **{k: v for k, v in params.items() if k != "rope_theta"}}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return theta, None
    if "factor" not in scaling:
        raise ConfigError(f"{source}: rope scaling {rope_type!r} needs a 'factor'")
    kwargs = {f.name: scaling[f.name] for f in dataclasses.fields(RopeScaling) if f.name in scaling}
    kwargs["rope_type"] = rope_type
    return theta, RopeScaling(**kwargs)
