"""Run directories given as `gs://` URIs stay URIs: files land in the bucket and read back. The bucket is a
local folder served through fsspec under the `gs` protocol (what gcsfs does against Cloud Storage);
Orbax and TensorStore reach real buckets themselves and are not exercised here."""

import json

import fsspec
import jax
import numpy as np
import pytest
from flax import nnx
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from hf_reference import save_tiny
from test_candidates import sample, tiny_setup  # noqa: F401  (fixture)

import aft_jax
from aft_jax.data.groups import read_groups
from aft_jax.io import paths
from aft_jax.io.metrics import MetricsWriter, read_metrics


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """`gs://bucket/...` stored under `<tmp>/store/bucket/...` (one store: epath caches the filesystem)."""
    root = tmp_path_factory.mktemp("store")

    class LocalBucket(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(root), fs=LocalFileSystem())

    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, LocalBucket, clobber=True)
    return root / "bucket"


def test_uris_are_kept_whole():
    assert str(paths.Path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert str(paths.for_orbax("gs://bucket/run/model/params")) == "gs://bucket/run/model/params"
    assert paths.is_remote("gs://bucket/run") and not paths.is_remote("runs/demo")


def test_metrics_in_a_bucket_resume_like_local_ones(bucket):
    writer = MetricsWriter("gs://bucket/metrics", tensorboard=False, upload_every_s=1e9)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    assert [m["step"] for m in read_metrics("gs://bucket/metrics")] == [1, 2, 3]
    assert (bucket / "metrics" / "metrics.jsonl").is_file()

    writer = MetricsWriter("gs://bucket/metrics", resume_step=2, tensorboard=False)  # restored from step 2
    writer.write(3, {"loss": 0.25})
    writer.close()
    assert [(m["step"], m["loss"]) for m in read_metrics("gs://bucket/metrics")] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_sampling_into_a_bucket_writes_the_same_groups(tmp_path, bucket, tiny_setup):  # noqa: F811
    config, model, tokenizer = tiny_setup
    local = sample(config, model, tokenizer, out_dir=tmp_path / "local")
    remote = sample(config, model, tokenizer, out_dir="gs://bucket/groups")
    assert str(remote) == "gs://bucket/groups"
    assert sorted(p.name for p in (bucket / "groups").iterdir()) == sorted(p.name for p in local.iterdir())
    assert [g.to_json() for g in read_groups(remote)] == [g.to_json() for g in read_groups(local)]
    assert json.loads((bucket / "groups" / "stats.json").read_text())["groups"] == 5


def test_hf_export_to_a_bucket_loads_back_identically(tmp_path, bucket):
    save_tiny("gqa_tied", tmp_path / "hf")
    model, tokenizer = aft_jax.from_pretrained(tmp_path / "hf")
    aft_jax.save_pretrained(model, tokenizer, "gs://bucket/export")
    assert (bucket / "export" / "model.safetensors").is_file() and (bucket / "export" / "config.json").is_file()
    loaded, _ = aft_jax.from_pretrained("gs://bucket/export")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
