"""The built-in demo (`make demo`): the whole AFT pipeline on the synthetic task, on CPU, in minutes.

A small Llama is trained from scratch with a tokenizer built for the task. VFT teaches it the task;
step 2 samples k chains of thought per training question with the VFT model; each alignment method
then continues from the VFT model (`pipeline.init_from = "vft"`, to fit the time budget) on those
groups; every model is evaluated on 1,000 held-out test questions (standard error of an accuracy near
30%: 1.5 points). A study that makes choices (such as beta) adds `--config.eval.validation_limit=300`:
greedy accuracy on 300 validation questions.
"""

from aft_jax.config.defaults import default_config


def get_config():
    c = default_config()
    c.run_dir = "runs/demo"
    c.model.tokenizer = "build"
    c.model.random.update(hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=24)
    c.model.remat_policy = "none"
    c.task.name = "synthetic"
    c.task.template = "plain"
    c.task.synthetic_train = 1000
    c.task.synthetic_validation = 300
    c.task.synthetic_test = 1000
    c.sample.k = 4
    c.sample.max_new_tokens = 48
    c.sample.shard_size = 500
    c.sample.batch_size = 500
    c.eval.limit = 1000
    c.eval.max_new_tokens = 48
    c.eval.sc_k = 2
    c.eval.group_questions = 200
    c.eval.batch_size = 500
    c.pipeline.methods = "aft_bc,aft_none,rft"
    c.pipeline.init_from = "vft"
    c.pipeline.vft_epochs = 10
    c.pipeline.align_epochs = 1
    c.pipeline.align_lr = 1e-3
    c.data.max_length = 96
    c.data.group_size = 5
    c.data.pad_multiple = 16
    c.data.tokens_per_row = 192  # at most; each batch's rows by estimated cost (data.rows_by_cost)
    c.loss.logit_chunk = 96
    c.optim.lr = 3e-3
    c.optim.warmup_ratio = 0.03
    c.optim.weight_decay = 0.0
    c.train.batch_size = 32
    c.train.mesh = "single"
    c.train.tensorboard = False
    c.checkpoint.save_every = 100
    return c
