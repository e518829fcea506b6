"""The built-in demo (`make demo`): the whole AFT pipeline on the synthetic task, on CPU, in minutes.

A small Llama is trained from scratch with a tokenizer built for the task. VFT teaches it the task;
step 2 samples k chains of thought per training question with the VFT model; each alignment method
then continues from the VFT model (`pipeline.init_from = "vft"`, to fit the time budget) on those
groups; every model is evaluated on held-out questions.
"""

from aft_jax.train_config import default_config


def get_config():
    c = default_config()
    c.run_dir = "runs/demo"
    c.model.tokenizer = "build"
    c.model.random.update(
        hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32
    )
    c.model.remat_policy = "none"
    c.task.name = "synthetic"
    c.task.template = "plain"
    c.task.synthetic_train = 2000
    c.task.synthetic_test = 200
    c.sample.k = 4
    c.sample.max_new_tokens = 56
    c.sample.shard_size = 500
    c.sample.batch_size = 400
    c.eval.limit = 200
    c.eval.max_new_tokens = 56
    c.eval.sc_k = 4
    c.eval.group_questions = 100
    c.eval.batch_size = 400
    c.pipeline.methods = "aft_bc,rft"
    c.pipeline.init_from = "vft"
    c.pipeline.vft_epochs = 6
    c.pipeline.align_epochs = 1
    c.pipeline.align_lr = 1e-3
    c.data.max_length = 128
    c.data.group_size = 5
    c.data.pad_multiple = 32
    c.loss.logit_chunk = 128
    c.optim.lr = 3e-3
    c.optim.warmup_ratio = 0.03
    c.optim.weight_decay = 0.0
    c.train.batch_size = 32
    c.train.mesh = "single"
    c.train.tensorboard = False
    c.checkpoint.save_every = 100
    return c
