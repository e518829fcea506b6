"""Reading a Hugging Face checkpoint folder: config.json and weights, one tensor at a time.

Safetensors are memory-mapped and read tensor by tensor. Pickled weights (`*.bin`, `*.pt`) can run
arbitrary code when loaded, so they are refused unless the caller passes `allow_pickle=True`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from aft_jax.errors import UserError
from aft_jax.model.config import ConfigError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(UserError, ValueError):
    """A checkpoint folder or tensor that cannot be loaded; the message names the file or tensor."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (a library's may run over many), for a one-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_hub_name(name: str) -> None:
    """A `CheckpointError` unless `name` (not a local folder) has a hub name's form, `owner/model`."""
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name}: no such folder, and not a hub name of the form 'owner/model'")


def resolve_checkpoint_dir(path_or_name: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hugging Face hub name, downloaded (configs, tokenizer, safetensors)."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint folder, found a file")
        return path
    name = str(path_or_name)
    check_hub_name(name)
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as err:  # the hub client raises many types; keep the cause attached
        raise CheckpointError(
            f"{name}: not a local folder and could not be fetched from the hub ({first_line(err)})"
        ) from err


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a Hugging Face checkpoint folder needs config.json")
    return _read_json(path)


def read_generation_config(directory: Path) -> dict[str, Any]:
    """`generation_config.json` of a checkpoint folder, or {} where it has none."""
    path = directory / "generation_config.json"
    return _read_json(path) if path.is_file() else {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class TensorReader(contextlib.AbstractContextManager):
    """Name -> (file, shape) for every tensor of a checkpoint folder, and `read(name)` as a NumPy array."""

    def __init__(self, directory: Path, *, allow_pickle: bool = False):
        self.directory = directory
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._pickled: dict[str, np.ndarray] = {}
        safetensors_files = sorted(directory.glob("*.safetensors"))
        if safetensors_files:
            self._index_safetensors(safetensors_files)
            return
        pickled = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickled:
            raise CheckpointError(f"{directory}: no weights found (expected *.safetensors files)")
        if not allow_pickle:
            raise CheckpointError(
                f"{directory}: only pickled weights found ({', '.join(p.name for p in pickled)}). Loading a "
                "pickle can run arbitrary code; convert it to safetensors, or pass allow_pickle=True "
                "(--allow-pickle) if you trust this file."
            )
        self._load_pickled(pickled)

    def _index_safetensors(self, files: list[Path]) -> None:
        from safetensors import safe_open

        for file in files:
            try:
                handle = safe_open(str(file), framework="numpy")
            except Exception as err:  # safetensors' own error type varies by version
                raise CheckpointError(f"{file}: not a readable safetensors file ({first_line(err)})") from err
            self._handles[file] = handle
            for name in handle.keys():
                self._files[name] = file

    def _load_pickled(self, files: list[Path]) -> None:
        import torch  # only on this explicitly requested path

        for file in files:
            try:
                tensors = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as err:  # torch's unpickler raises many types
                raise CheckpointError(f"{file}: not a readable PyTorch weights file ({first_line(err)})") from err
            for name, tensor in tensors.items():
                self._pickled[name] = tensor.float().numpy()
                self._files[name] = file

    def names(self) -> list[str]:
        return list(self._files)

    def file_of(self, name: str) -> Path:
        return self._files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._pickled:
            return tuple(self._pickled[name].shape)
        return tuple(self._handles[self._files[name]].get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        if name in self._pickled:
            return self._pickled[name]
        try:
            return self._handles[self._files[name]].get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{self._files[name]}: cannot read tensor {name!r} ({first_line(err)})") from err

    def __exit__(self, *exc) -> None:
        self._handles.clear()
        self._pickled.clear()
