"""Test set-up: 8 simulated CPU devices (set before JAX is imported), one XLA compilation cache for the
session, XLA's cheap compilation, and shared fixtures.

The cache is JAX's persistent one in a fresh folder per session, inherited by every subprocess the tests
start: a resumed run, the other process of a two-process run and the next test load the programs the
first compiled instead of compiling them again (on this project's 2-core machines compiling is most of
a tiny run's time). It starts empty, so a session never reads programs from another version of the code.

The tests' programs are tiny and most are run once, so compiling is most of their time:
`JAX_DISABLE_MOST_OPTIMIZATIONS` turns off XLA's backend and LLVM's expensive optimisation passes (as
Flax's own tests do for slow compiles). The programs compute the same functions; what they are compared
with (NumPy, torch, another layout) is unchanged.
"""

import atexit
import os
import shutil
import tempfile

DEVICES_FLAG = "--xla_force_host_platform_device_count="
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICES_FLAG)] + [f"{DEVICES_FLAG}8"]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="aft_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # a limit turns on the cache's file lock
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Benchmark data. The full files: $AFT_DATA_DIR, by default ../shared/data beside the checkout when that
# folder exists (CI lays it there); a clone alone has neither and the tests that need them are skipped
# (`full_data_dir`). The few real records of each file in tests/data (see its README), always there, are
# what every other test reads, passed as `data_dir` (or as AFT_DATA_DIR to a subprocess).
FIXTURE_DATA = REPO / "tests" / "data"
if not os.environ.get("AFT_DATA_DIR") and (REPO.parent / "shared" / "data").is_dir():
    os.environ["AFT_DATA_DIR"] = str(REPO.parent / "shared" / "data")


def tiny_cli(command: str, run_dir, *overrides: str) -> list[str]:
    """The argv of `aft-jax <command>` on the tiny preset in `run_dir`, with `--config.` overrides."""
    import sys

    config = str(REPO / "configs" / "tiny.py")
    return [sys.executable, "-m", "aft_jax.cli", command, "--config", config, f"--config.run_dir={run_dir}"] + [
        f"--config.{o}" for o in overrides
    ]


FULL_DATA_SKIP = (
    "needs the full benchmark data: set AFT_DATA_DIR to the benchmark data folder (gsm8k/, aqua_rat/, ecqa/; "
    "see tests/data/README.md), or lay it at ../shared/data beside the checkout"
)


@pytest.fixture(scope="session")
def full_data_dir() -> Path:
    """The full benchmark data folder, $AFT_DATA_DIR; the test is skipped when it is not set, and fails when it
    names a missing folder (a mistake, not a clone without the data)."""
    value = os.environ.get("AFT_DATA_DIR")
    if not value:
        pytest.skip(FULL_DATA_SKIP)
    path = Path(value).resolve()
    if path == FIXTURE_DATA.resolve():
        pytest.skip(f"AFT_DATA_DIR names the test fixtures, not the full files; {FULL_DATA_SKIP}")
    if not path.is_dir():
        pytest.fail(f"AFT_DATA_DIR={value} is not a folder: set it to the benchmark data folder")
    return path


@pytest.fixture(scope="session")
def fixture_data_dir() -> Path:
    """tests/data: a few real records of every benchmark file, laid out as the full data folder."""
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def gsm8k_test_questions() -> list[dict]:
    """The GSM8K test records of tests/data, in order (the first ones are the full file's first ones)."""
    import json

    with (FIXTURE_DATA / "gsm8k" / "test.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def groups_file(tmp_path_factory) -> Path:
    """A groups file of 32 arithmetic questions (`train_helpers.write_arithmetic_groups`) for the tiny preset."""
    from train_helpers import write_arithmetic_groups

    path = tmp_path_factory.mktemp("data") / "groups.jsonl"
    write_arithmetic_groups(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a float32 HF checkpoint folder (built once per machine)."""
    from aft_jax.io.smollm2 import smollm2_checkpoint

    return smollm2_checkpoint()
