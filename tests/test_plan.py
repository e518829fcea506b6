"""`aft-jax plan`: memory from an ahead-of-time compilation grows with batch and sequence length."""

import pytest
from conftest import REPO

from aft_jax.config.load import load_config
from aft_jax.stages.plan import plan_memory, recommend


@pytest.fixture(scope="module")
def config():
    # small logit chunks, so activations rather than one chunk of vocabulary logits dominate
    return load_config(REPO / "configs" / "tiny.py", ["train.mesh=1,4,2", "loss.method=aft", "loss.logit_chunk=16"])


def test_memory_grows_with_batch_and_sequence(config):
    small = plan_memory(config, batch_size=8, seq_len=128)
    longer = plan_memory(config, batch_size=8, seq_len=256)
    bigger = plan_memory(config, batch_size=16, seq_len=128)
    assert small.devices == 8 and "fsdp=4" in small.mesh
    assert longer.temporaries_gb > 1.3 * small.temporaries_gb
    assert bigger.temporaries_gb > 1.3 * small.temporaries_gb
    assert small.params_gb == longer.params_gb == bigger.params_gb > 0
    # Adam keeps two moments per parameter, sharded like the parameters
    assert small.optimizer_gb == pytest.approx(2 * small.params_gb, rel=0.01)
    assert recommend(small, 80.0, config).startswith("fits")
    assert recommend(small, small.total_gb / 2, config).startswith("does not fit")
