"""A tiny random Llama with the real SmolLM2 tokenizer: for tests and smoke runs on CPU in seconds."""

from aft_jax.train_config import default_config


def get_config():
    c = default_config()
    c.run_dir = "runs/tiny"
    c.model.tokenizer = "smollm2"
    c.model.random.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    c.data.max_length = 64
    c.data.group_size = 4
    c.data.pad_multiple = 16
    c.loss.logit_chunk = 32
    c.optim.lr = 3e-3
    c.optim.warmup_ratio = 0.0
    c.train.batch_size = 8
    c.train.max_steps = 8
    c.train.tensorboard = False
    c.checkpoint.save_every = 2
    c.checkpoint.keep = 2
    return c
