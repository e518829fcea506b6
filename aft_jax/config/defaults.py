"""The run configuration's defaults: every section and key, with its meaning."""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/default"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF folder, aft_jax model folder or hub name; empty with `random` set: random init
    c.model.tokenizer = ""  # for a random model: a folder, "smollm2" (built in), or "build" (trained on the task)
    c.model.build_vocab_size = 384  # tokenizer "build": at most this many tokens (fewer if merges run out)
    c.model.dtype = "float32"  # parameter dtype
    c.model.compute_dtype = "float32"
    c.model.remat_policy = "none"  # none | full | dots | dots_no_batch
    c.model.attention = "auto"  # auto (cudnn where it applies) | xla | cudnn: see aft_jax.model.attention
    c.model.random = ml_collections.ConfigDict(
        {"hidden_size": 0, "intermediate_size": 0, "num_layers": 0, "num_heads": 0, "num_kv_heads": 0, "head_dim": 0}
    )

    c.task = ml_collections.ConfigDict()
    c.task.name = "gsm8k"  # gsm8k | gsm8k_rank | aqua_rat | ecqa | synthetic
    c.task.data_dir = ""  # the benchmark data folder; empty: $AFT_DATA_DIR
    c.task.template = "alpaca"  # alpaca | plain | chat
    c.task.train_split = "train"
    c.task.eval_split = "test"
    c.task.validation_split = "validation"  # for choices (beta, lr, epochs); see eval.validation_limit
    c.task.limit = -1  # > 0: use only the first N training questions
    c.task.synthetic_train = 2000  # sizes of the generated synthetic splits
    c.task.synthetic_validation = 500
    c.task.synthetic_test = 200

    c.sample = ml_collections.ConfigDict()
    c.sample.k = 6  # samples per training question
    c.sample.temperature = 1.0
    c.sample.top_k = 0
    c.sample.top_p = 1.0
    c.sample.max_new_tokens = 256
    c.sample.batch_size = 32  # rows (question x sample) decoding together
    c.sample.rows_per_prompt = 0  # rows per prompt slot, sampling and evaluation; 0: k if questions <= rows, else 1
    c.sample.shard_size = 256  # questions per groups shard
    c.sample.out_dir = ""  # empty: <run_dir>/groups
    c.sample.mesh = "fsdp"  # over each process's own devices (it samples its own shards)

    c.eval = ml_collections.ConfigDict()
    c.eval.limit = 200  # test questions for accuracy and self-consistency (<= 0: all)
    c.eval.max_new_tokens = 256
    c.eval.sc_k = 8  # samples per question for self-consistency
    c.eval.sc_temperature = 0.7
    c.eval.validation_limit = 0  # > 0: also greedy accuracy on the first N questions of task.validation_split
    c.eval.group_questions = 100  # test questions whose sampled groups measure assessment accuracy
    c.eval.batch_size = 64

    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.methods = "aft_bc,aft_dc,rft"  # alignment runs after VFT; see aft_jax.method.registry.PRESETS
    c.pipeline.init_from = "base"  # base | vft: where each alignment run starts
    c.pipeline.vft_epochs = 3
    c.pipeline.align_epochs = 3
    c.pipeline.align_lr = -1.0  # peak learning rate of the alignment runs; negative: optim.lr

    c.study = ml_collections.ConfigDict()
    c.study.seeds = "0"  # `aft-jax study`: one pipeline run per seed, in <run_dir>/seed-<n>
    c.study.betas = ""  # e.g. "0.05,0.1,0.3,1.0": also AFT-BC once per beta (claim 7)
    c.study.lrs = ""  # e.g. "1e-3,3e-4,1e-4": also AFT-BC once per alignment learning rate

    c.data = ml_collections.ConfigDict()
    c.data.train_file = ""  # groups (file or folder of shards) or VFT pairs; empty for VFT: the task's train split
    c.data.max_length = 512
    c.data.group_size = 8  # K: candidate slots per group (6 samples + reference + room)
    c.data.truncation = "completion"  # completion | drop
    c.data.pad_multiple = 64
    c.data.layout = "packed"  # packed: each prompt once, groups in rows of tokens_per_row | padded: [B, K, T]
    c.data.tokens_per_row = 1024  # packed rows' token budget (>= max_length); a longer group is split over rows
    c.data.shuffle = True

    c.loss = ml_collections.ConfigDict()
    c.loss.method = "aft"  # aft_jax.method.registry.METHODS: vft | aft | rft | rrhf | pro | dpo
    c.loss.constraint = "boundary"  # none | detach | boundary
    c.loss.beta = 0.1  # boundary margin
    c.loss.beta_dpo = 0.1
    c.loss.lam = 1.0  # lambda: weight of the alignment term
    c.loss.vft_weight = -1.0  # weight of the NLL term; negative: method default (0 for dpo, else 1)
    c.loss.vft_targets = "reference"  # reference | positives
    c.loss.use_levels = False  # rank by `level` (GSM8K-RANK) instead of correct / incorrect
    c.loss.logit_chunk = 128  # positions per chunk of the vocabulary projection

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-5
    c.optim.warmup_ratio = 0.03
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # question groups per optimizer step (global)
    c.train.grad_accum = 1  # micro-batches per step
    c.train.num_epochs = 3
    c.train.max_steps = -1  # > 0 overrides num_epochs
    c.train.log_every = 1
    c.train.mesh = "fsdp"  # preset name (aft_jax.sharding.MESH_PRESETS) or "data,fsdp,tensor" sizes
    c.train.tensorboard = True

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 500
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    c.checkpoint.export_hf = False  # also write the final model as a HF folder
    return c
