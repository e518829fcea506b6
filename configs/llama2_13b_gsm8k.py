"""Llama-2-13B on GSM8K with the paper's settings (AFT_METHOD section 7): AdamW, lr 2e-5, warmup 3%,
cosine decay, 3 epochs, 128 questions per step, 512 tokens. Meant for a TPU pod (see launch/tpu_run.sh)
or a multi-GPU host; `aft-jax plan` checks the memory first.
"""

from aft_jax.train_config import default_config


def get_config():
    c = default_config()
    c.run_dir = "runs/llama2_13b_gsm8k"
    c.model.path = "meta-llama/Llama-2-13b-hf"
    c.model.dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.model.remat_policy = "dots_no_batch"
    c.data.max_length = 512
    c.data.group_size = 8
    c.optim.lr = 2e-5
    c.optim.warmup_ratio = 0.03
    c.train.batch_size = 128
    c.train.grad_accum = 8
    c.train.num_epochs = 3
    c.train.mesh = "fsdp"
    c.checkpoint.save_every = 100
    c.checkpoint.export_hf = True
    return c
