"""Run-directory paths: local folders or object-store URIs (`gs://bucket/run`, also `s3://`) behind one
`epath.Path` type, so a URI is never mangled into a local path. The only module that calls etils.epath.

Orbax reads and writes such URIs itself. Tools that only write local folders (a tokenizer's
`save_pretrained`, safetensors, TensorBoard) write into `staged_dir` and are copied up; tools that only
read local folders read from `fetched_dir`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from etils import epath

Path = epath.Path  # pathlib's interface, with URIs kept whole: `Path("gs://b/run") / "x"`


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def for_orbax(path: str | os.PathLike) -> epath.Path:
    """An absolute path (Orbax needs one); URIs unchanged."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Readers see the old file or the whole new one, never a part: locally a synced temporary file
    renamed over `path`; an object store makes an upload visible only once complete."""
    path = Path(path)
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_tree(source: str | os.PathLike, destination: str | os.PathLike, skip: tuple[str, ...] = ()) -> None:
    """Copies every file under `source` to the same place under `destination` (folders named in `skip`
    are left out)."""
    source, destination = Path(source), Path(destination)
    for entry in source.iterdir():
        if entry.name in skip:
            continue
        if entry.is_dir():
            copy_tree(entry, destination / entry.name, skip)
        else:
            destination.mkdir(parents=True, exist_ok=True)
            (destination / entry.name).write_bytes(entry.read_bytes())


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[str]:
    """A local folder to write into: `path` itself, or for a URI a temporary folder copied up on exit."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="aft_jax_stage_") as local:
        yield local
        copy_tree(local, path)


@contextlib.contextmanager
def fetched_dir(path: str | os.PathLike, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """A local folder to read from: `path` itself, or for a URI a temporary copy of it (without `skip`)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="aft_jax_fetch_") as local:
        copy_tree(path, local, skip)
        yield local
