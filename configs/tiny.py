"""A tiny random Llama on the synthetic task: for tests and smoke runs of every command on CPU in seconds.

Like `configs/demo.py` it trains its own tokenizer on the task's text (`<run_dir>/tokenizer`, 320 tokens in
every seed, so that seeds share their compiled programs): with SmolLM2's 49,152-token vocabulary the output
projection would be ~98% of this model's work.
"""

from aft_jax.config.defaults import default_config


def get_config():
    c = default_config()
    c.run_dir = "runs/tiny"
    c.model.tokenizer = "build"
    c.model.build_vocab_size = 320  # fewer than its 32 questions allow: every seed's model has the same shapes
    c.model.random.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    c.task.name = "synthetic"
    c.task.template = "plain"
    c.task.limit = 32
    c.task.synthetic_test = 16
    c.sample.k = 3
    c.sample.max_new_tokens = 40
    c.sample.shard_size = 16
    c.sample.batch_size = 48
    c.eval.limit = 16
    c.eval.max_new_tokens = 40
    c.eval.sc_k = 2
    c.eval.group_questions = 8
    c.eval.batch_size = 32
    c.pipeline.methods = "aft_bc,rft"
    c.pipeline.vft_epochs = 1
    c.pipeline.align_epochs = 1
    c.data.max_length = 128
    c.data.group_size = 4
    c.data.pad_multiple = 256  # packed rows of 256, 512, 768 or 1024 tokens: few batch shapes (a compile each)
    c.loss.logit_chunk = 64
    c.optim.lr = 3e-3
    c.optim.warmup_ratio = 0.0
    c.train.batch_size = 8
    c.train.max_steps = -1
    c.train.num_epochs = 1
    c.train.tensorboard = False
    c.checkpoint.save_every = 2
    c.checkpoint.keep = 2
    return c
