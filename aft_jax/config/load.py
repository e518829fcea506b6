"""Loading a run configuration: preset files and `--config.a.b=value` overrides.

A preset is a Python file with `get_config() -> ConfigDict` (see `configs/`). Configs are locked, so a
misspelt override is an error that lists the valid keys.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from aft_jax.config.spec import RunConfig, RunConfigError, check_command, parse_config, renamed_message


class UnknownKeyError(RunConfigError, KeyError):
    """An override or preset names a key the config does not have."""


def load_config(path: str | Path, overrides: Sequence[str] = (), command: str | None = None) -> RunConfig:
    """Loads `get_config()` (or `get_config(arg)` for `file.py:arg`) from a preset file, locks it, applies
    `a.b=value` overrides and returns it parsed and checked (`spec.parse_config`, and the rules of
    `command`; `vft` sets `loss.method = "vft"`)."""
    path, _, arg = str(path).partition(".py:")
    path = Path(path if not arg else path + ".py")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"aft_jax_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RunConfigError(f"{path}: cannot be loaded as a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise RunConfigError(f"{path}: a config file must define get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    for override in overrides:
        apply_override(config, override)
    if command == "vft":
        config.loss.method = "vft"
    run = parse_config(config)
    check_command(run, command)
    return run


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Sets `a.b=value`, parsing value as the existing field's type."""
    if "=" not in override:
        raise RunConfigError(f"override {override!r} must look like key.sub=value")
    dotted, raw = override.split("=", 1)
    if message := renamed_message(dotted):
        raise RunConfigError(message)
    *parents, leaf = dotted.split(".")
    node = config
    for depth, key in enumerate(parents):
        if key not in node or not isinstance(node[key], ml_collections.ConfigDict):
            raise UnknownKeyError(_unknown(dotted, ".".join(parents[:depth]), node))
        node = node[key]
    if leaf not in node:
        raise UnknownKeyError(_unknown(dotted, ".".join(parents), node))
    current = node[leaf]
    with node.unlocked():
        node[leaf] = _parse(raw, current, dotted)


def _unknown(dotted: str, where: str, node: ml_collections.ConfigDict) -> str:
    return f"unknown config key {dotted!r}; valid keys{' under ' + where if where else ''}: {', '.join(sorted(node))}"


def _parse(raw: str, current: Any, dotted: str) -> Any:
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise RunConfigError(f"{dotted}: expected true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    if isinstance(current, ml_collections.ConfigDict):
        raise RunConfigError(f"{dotted} is a section; set one of its keys: {', '.join(sorted(current))}")
    try:
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, (tuple, list)):
            return type(current)(ast.literal_eval(raw))
    except (ValueError, SyntaxError) as err:
        raise RunConfigError(f"{dotted}: cannot parse {raw!r} as {type(current).__name__}") from err
    return raw
