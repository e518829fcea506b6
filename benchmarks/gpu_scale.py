"""The GPU measurements of issues 15 and 16, on one NVIDIA GPU with random weights, in one process:

1. `attention`: cuDNN's fused attention (`model.attention=cudnn`) against XLA's on real GSM8K candidate groups,
   packed and padded, SmolLM2-135M's shape: per-candidate mean log-probs and the gradient of the AFT-BC
   objective, each in bfloat16 against the float32 XLA reference.
2. `train`: the AFT-BC train step of a 1B-class Llama (Llama-3.2-1B's shape, float32 parameters and AdamW
   state, bfloat16 compute, remat `dots_no_batch`), `--train-questions` GSM8K groups of K = 7 (the Alpaca
   prompt, the reference and six other questions' references, at most 512 tokens each), packed
   (`data.tokens_per_row` 1024) and padded, with XLA's and cuDNN's attention: questions per second, tokens
   computed, XLA's temporary memory, and MFU: `aft_jax.stages.train.train_flops` of the tokens the layout
   computes (6 N per token plus the full T x T attention term, remat's recomputation not counted) over the
   step time and the bfloat16 peak (989 TFLOP/s dense on the H100 / H200, and the 8192^3 product measured
   here).
3. `sampling`: the continuous sampler (`JaxSampler.sample`'s loop) in bfloat16 at 256 to 4,096 rows, k = 6 samples
   of GSM8K training questions with the Alpaca prompt (two waves of questions), 256 new tokens at
   temperature 1, for SmolLM2-135M's and Llama-3.2-1B's shapes; generated tokens per second against the
   memory-bandwidth bound: a decode step must read every weight once (bfloat16) and the keys/values of
   every prompt once and of every row's own tokens (on average (N + 1) / 2 of N per row); at the read
   bandwidth measured here (a jitted sum over 8 GiB) that bounds the tokens per second. A step also
   multiplies every row through every weight (2 x params x rows FLOPs, plus attention's): at the bfloat16
   product rate measured here that is a second bound (the compute one), and the lower of the two is the
   roofline. With random weights EOS is rare, so nearly every sample runs all N steps.
4. `decode_parts`: where a decode step's time goes (`decode_parts`).

    PYTHONPATH=. python3 benchmarks/gpu_scale.py --assets gpu_assets --out DIR [--budget-s 450] [--smoke]
        [--cases FIRST_RUN | SECOND_RUN | name,name,...]

Cases are named `attention`, `train-LAYOUT-ATTENTION-QUESTIONS`, `sample-SHAPE-ROWS` and `decode-SHAPE-ROWS`
(SHAPE `llama_1b` or `smollm2`); `FIRST_RUN` and `SECOND_RUN` name the lists of the two H200 runs.

`--assets` holds `model/` (SmolLM2-135M-Instruct's config.json and tokenizer files, no weights),
`data/gsm8k/*.jsonl` and `wheels/` (`benchmarks/gpu_scale.sh` installs them); the tokenizer is SmolLM2's for
both shapes (Llama 3's tokenizer gives GSM8K text about the same number of tokens). Each case is wrapped
(`gpu_check.run_case`): a failure is recorded and the rest still run; DIR/gpu_scale.json is rewritten after
every case; cases not started once `--budget-s` is spent are marked skipped. `--smoke` shrinks every shape
so the whole script runs on a CPU in a few minutes (cuDNN cases are then skipped).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(Path(__file__).resolve().parent)) if p not in sys.path]

from gpu_check import PEAK_BF16_FLOPS, Report, log, run_case  # noqa: E402  (benchmarks/, beside this script)
from train_step_vs_torch import BETA  # noqa: E402

TOKENS_PER_ROW = 1024
LLAMA_1B = "meta-llama/Llama-3.2-1B"
# The cases of the first H200 run (benchmarks/results/gpu_scale_h200.json), in order of what the issues ask
# first, so that a spent budget skips the least needed; the second run's; a CPU smoke run's.
FIRST_RUN = (
    "attention,train-packed-xla-8,train-padded-xla-8,sample-llama_1b-1024,train-packed-cudnn-8,"
    "sample-llama_1b-4096,sample-smollm2-1024,train-padded-cudnn-8,sample-llama_1b-256,sample-smollm2-256,"
    "sample-smollm2-4096"
)
SECOND_RUN = (
    "train-packed-cudnn-32,train-packed-cudnn-16,train-padded-cudnn-16,decode-llama_1b-1024,sample-llama_1b-1024,"
    "train-packed-xla-32,sample-smollm2-1024,sample-llama_1b-4096,decode-smollm2-1024,sample-smollm2-4096"
)
SMOKE = "attention,train-packed-xla-2,train-padded-cudnn-2,decode-llama_1b-12,sample-llama_1b-12,sample-smollm2-12"


# ---------------------------------------------------------------------------------------------- shapes


def model_config(shape: str, assets: Path, smoke: bool, **overrides):
    """The ModelConfig of `smollm2` (from the assets' config.json) or `llama_1b` (`plan.KNOWN_MODELS`); in
    smoke mode two layers of 64 wide."""
    from aft_jax.io.hf_files import read_config
    from aft_jax.model.config import ModelConfig
    from aft_jax.model.families import config_from_hf
    from aft_jax.stages.plan import KNOWN_MODELS

    if shape == "smollm2":
        config = config_from_hf(read_config(assets / "model"), **overrides)
    else:
        config = ModelConfig(**KNOWN_MODELS[LLAMA_1B], **overrides)
    if smoke:
        config = config.replace(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=16)  # fmt: skip
    return config


def read_bandwidth(smoke: bool) -> float:
    """Bytes per second of a jitted sum over a large bfloat16 array (reads it once)."""
    import jax
    import jax.numpy as jnp
    import machine

    n = (1 << 22) if smoke else (4 << 30)  # elements: 8 GiB in bfloat16
    x = jnp.ones((n // 4096, 4096), jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    return 2 * n / machine.median_seconds(lambda: total(x).block_until_ready())


def bf16_peak(smoke: bool) -> float:
    import machine

    m = 512 if smoke else 8192
    return machine.jax_matmul_gflops(m, m, m, "bfloat16") * 1e9


# ---------------------------------------------------------------------------------------------- groups


def layouts(assets: Path, questions: int) -> dict:
    """Packed and padded batches of `questions` GSM8K training groups (`group_step_layouts.batches`: K = 7,
    at most 512 tokens each) and their token counts."""
    import group_step_layouts

    return group_step_layouts.batches(str(assets / "model"), questions, TOKENS_PER_ROW)


def loss_config():
    from aft_jax.config.defaults import default_config

    cfg = default_config()
    cfg.loss.update(method="aft", constraint="boundary", beta=BETA)
    return cfg


def attention_check(assets: Path, smoke: bool) -> dict:
    """Mean log-probs and objective gradients, XLA and cuDNN in bfloat16, against XLA in float32."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from aft_jax.method.objective import normalisers, objective
    from aft_jax.model.causal_lm import create_model

    batches = layouts(assets, 2 if smoke else 4)
    loss_cfg = loss_config().loss
    result: dict = {"tokens": batches["tokens"]}
    runs = {"xla_float32": ("xla", "float32"), "xla_bfloat16": ("xla", "bfloat16")}
    if jax.default_backend() == "gpu":
        runs["cudnn_bfloat16"] = ("cudnn", "bfloat16")
    for layout in ("packed", "padded"):
        batch = {k: jnp.asarray(v) for k, v in batches[layout].items()}
        norm = normalisers(batch, loss_cfg)
        outputs = {}
        for name, (impl, dtype) in runs.items():
            config = model_config("smollm2", assets, smoke, dtype=dtype, attention=impl)
            graphdef, params = nnx.split(create_model(config, seed=0))

            def loss(params, graphdef=graphdef):
                return objective(nnx.merge(graphdef, params), batch, norm, loss_cfg)[0]

            try:
                value, grads = jax.jit(jax.value_and_grad(loss))(params)
                scores = jax.jit(lambda p, g=graphdef: _scores(nnx.merge(g, p), batch, loss_cfg))(params)
            except Exception as err:  # noqa: BLE001 - recorded; the other runs still compare
                result[f"{layout}/{name}"] = {"error": f"{type(err).__name__}: {err}"[:3000]}
                log(f"  {layout} {name}: {result[f'{layout}/{name}']['error'][:500]}")
                continue
            outputs[name] = (float(value), np.asarray(scores), jax.tree.map(np.asarray, grads))
        reference = outputs["xla_float32"]
        ref_leaves = jax.tree.leaves(reference[2])
        valid = batches[layout]["valid"].astype(bool)
        for name, (value, scores, grads) in outputs.items():
            if name == "xla_float32":
                continue
            leaves = jax.tree.leaves(grads)
            diff = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(leaves, ref_leaves)))
            norm_ref = np.sqrt(sum(float(np.sum(b**2)) for b in ref_leaves))
            result[f"{layout}/{name}"] = {
                "loss": value,
                "loss_float32": reference[0],
                "max_abs_score_diff": float(np.max(np.abs(scores - reference[1])[valid])),
                "grad_rel_l2_diff": float(diff / norm_ref),
            }
            log(f"  {layout} {name}: {result[f'{layout}/{name}']}")
    return result


def _scores(model, batch, loss_cfg):
    import jax.numpy as jnp

    from aft_jax.method.scoring import candidate_logp_sums

    return candidate_logp_sums(model, batch, chunk_size=loss_cfg.logit_chunk) / jnp.maximum(
        batch["completion_tokens"], 1
    )


def train_case(assets: Path, args, layout: str, impl: str, questions: int, peaks: dict) -> dict:
    """The 1B-class AFT-BC step on `questions` groups in one layout with one attention: questions/s, memory,
    MFU."""
    import jax
    import numpy as np

    from aft_jax.model.causal_lm import create_model
    from aft_jax.parallel import sharding
    from aft_jax.stages.program import build_train_program
    from aft_jax.stages.train import train_flops

    config = model_config("llama_1b", assets, args.smoke, param_dtype="float32", dtype=args.train_dtype,
                          remat_policy=args.remat, attention=impl)  # fmt: skip
    mesh = sharding.single_device_mesh()
    cfg = loss_config()
    program = build_train_program(config, mesh, cfg.loss, cfg.optim, total_steps=100, grad_accum=1)
    state = program.init_state(create_model(config, mesh=mesh, seed=0), 0)
    batches = layouts(assets, questions)
    host_batch = batches[layout]
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in host_batch.items()}
    began = time.perf_counter()
    compiled = program.lower(state, batch).compile()
    compile_s = time.perf_counter() - began
    memory = compiled.memory_analysis()
    times, losses = [], []
    with sharding.use_mesh(mesh):
        for i in range(args.train_steps + 1):
            began = time.perf_counter()
            state, metrics = compiled(state, batch)
            losses.append(float(metrics["loss"]))
            if i:
                times.append(time.perf_counter() - began)
    step_s = float(np.median(times))
    flops = train_flops(config, host_batch)
    result = {
        "layout": layout,
        "attention": impl,
        "questions": questions,
        "remat": args.remat,
        "token_shape": list(host_batch["input_ids"].shape),
        "computed_tokens": int(np.prod(host_batch["input_ids"].shape)),
        "step_s": step_s,
        "step_times": times,
        "questions_per_s": questions / step_s,
        "losses": losses,
        "compile_s": compile_s,
        "temp_gb": getattr(memory, "temp_size_in_bytes", 0) / 1e9 if memory else None,
        "flops_per_step": flops,
        "mfu_datasheet": flops / step_s / PEAK_BF16_FLOPS,
        "mfu_measured_peak": flops / step_s / peaks["bf16_flops"],
    }
    log(f"  {layout} {impl} {questions}q: {result['questions_per_s']:.2f} questions/s, step {step_s:.4f}s, "
        f"MFU {result['mfu_datasheet']:.3f} ({result['mfu_measured_peak']:.3f} of measured), temp {result['temp_gb']} GB")  # fmt: skip
    del state, compiled
    return result


# ---------------------------------------------------------------------------------------------- sampling


def sampling_case(assets: Path, args, shape: str, rows: int, peaks: dict) -> dict:
    """Continuous sampling of two waves of GSM8K questions at `rows` rows, against the bandwidth bound."""
    import jax
    import numpy as np
    from transformers import AutoTokenizer

    from aft_jax.data.tasks import get_task
    from aft_jax.model.causal_lm import create_model
    from aft_jax.sampling import continuous
    from aft_jax.sampling.decode import decode_layers
    from aft_jax.sampling.sampler import left_pad, sampling_params
    from aft_jax.stages.train import matmul_params

    k, n = 6, args.new_tokens
    config = model_config(shape, assets, args.smoke, param_dtype="bfloat16", dtype="bfloat16")
    model = create_model(config, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(str(assets / "model"))
    per_slot, slots, _ = continuous.slot_shape(rows, k, 2 * (rows // k), None, None)
    questions = 2 * slots
    task = get_task("gsm8k")
    examples = task.load("train", limit=questions)
    encoded = [tokenizer(task.prompt(e, "alpaca"))["input_ids"] for e in examples]
    ids, mask = left_pad(encoded, len(encoded), tokenizer.pad_token_id or 0, 64)
    params = sampling_params(model, tokenizer, n, temperature=1.0)
    key = jax.random.key(0)
    layers = decode_layers(model)
    began = time.perf_counter()
    continuous.warm_up(model, ids, mask, params, key, k, rows=rows, layers=layers)
    compile_s = time.perf_counter() - began
    began = time.perf_counter()
    out = continuous.sample_continuous(model, ids, mask, params, key, k, rows=rows, layers=layers)
    seconds = time.perf_counter() - began
    tokens = int(out.lengths.sum())

    kv_bytes_per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    weight_bytes = 2 * matmul_params(config)
    busy_rows, prompt_mean = slots * per_slot, float(np.mean([len(e) for e in encoded]))
    prompt_tokens = prompt_mean * slots  # the prompts a step reads
    own_tokens = busy_rows * (n + 1) / 2  # on average over a sample's steps
    ideal_bytes = weight_bytes + kv_bytes_per_token * (prompt_tokens + own_tokens)
    read_bytes = weight_bytes + kv_bytes_per_token * (slots * ids.shape[1] + busy_rows * n)
    bound = busy_rows / (ideal_bytes / peaks["read_bytes_per_s"])
    attended = prompt_mean + (n + 1) / 2  # keys a row's query sees, on average
    flops = (
        2 * busy_rows * (matmul_params(config) + 2 * config.num_layers * config.num_heads * config.head_dim * attended)
    )
    compute_bound = busy_rows / (flops / peaks["bf16_flops"])
    result = {
        "shape": shape,
        "rows": rows,
        "busy_rows": busy_rows,
        "rows_per_prompt": per_slot,
        "questions": questions,
        "k": k,
        "max_new_tokens": n,
        "prompt_length_padded": int(ids.shape[1]),
        "prompt_length_mean": prompt_mean,
        "tokens": tokens,
        "share_full_length": float(np.mean(out.lengths == n)),
        "steps": out.steps,
        "seconds": seconds,
        "compile_s": compile_s,
        "tokens_per_s": tokens / seconds,
        "ms_per_step": 1e3 * seconds / out.steps,
        "weight_gb": weight_bytes / 1e9,
        "kv_gb_per_step_ideal": (ideal_bytes - weight_bytes) / 1e9,
        "kv_gb_per_step_read": (read_bytes - weight_bytes) / 1e9,
        "bound_tokens_per_s": bound,
        "fraction_of_bound": tokens / seconds / bound,
        "fraction_of_bound_at_bytes_read": tokens / seconds / (busy_rows / (read_bytes / peaks["read_bytes_per_s"])),
        "flops_per_step": flops,
        "compute_bound_tokens_per_s": compute_bound,
        "fraction_of_roofline": tokens / seconds / min(bound, compute_bound),
    }
    log(f"  {shape} rows {rows}: {result['tokens_per_s']:.0f} tokens/s, {result['ms_per_step']:.2f} ms/step, "
        f"{result['fraction_of_bound']:.2f} of the bound ({bound:.0f} tokens/s)")  # fmt: skip
    return result


def decode_parts(assets: Path, args, shape: str, rows: int, peaks: dict) -> dict:
    """Where a decode step's time goes at `rows` rows (k = 6 rows per prompt, bfloat16): one step (16 in a
    jitted loop, greedy) with the prompt cache (192 slots) and the own caches (N slots) at full size and shrunk
    to 8 slots, and the draw of the next token alone: this version's `sample_next` against the one before it
    (a softmax and one cumulative sum over the whole vocabulary)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from aft_jax.model.causal_lm import create_model
    from aft_jax.sampling.decode import DecodeCache, decode_layers, decode_step, unstack_layers
    from aft_jax.sampling.next_token import SamplingParams, sample_next

    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")  # the prompt cache's
    k, n_full, s_full, small, repeats = 6, args.new_tokens, 192, 8, 16
    config = model_config(shape, assets, args.smoke, param_dtype="bfloat16", dtype="bfloat16")
    model = create_model(config, seed=0)
    graphdef, state = nnx.split(model)
    layer_states = decode_layers(model)
    q = rows // k
    b, layers, g, hd = q * k, config.num_layers, config.num_kv_heads, config.head_dim

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def empty_cache(s, n):
        def zeros(*shape):
            return tuple(jnp.zeros(shape, jnp.bfloat16) for _ in range(layers))

        return DecodeCache(zeros(q, g, hd, s), zeros(q, g, s, hd), jnp.ones((q, s), bool), zeros(b, g, hd, n),
                           zeros(b, g, n, hd), jnp.ones((b, n), bool), jnp.full((b,), s, jnp.int32),
                           jnp.zeros((), jnp.int32))  # fmt: skip

    @functools.partial(jax.jit, donate_argnums=2)
    def steps(state, layer_states, cache):
        model = nnx.merge(graphdef, state)
        decoder = unstack_layers(model, layer_states)
        n = cache.valid_bn.shape[1]

        def body(i, carry):
            logits, cache = decode_step(model, decoder, carry[1], carry[0]._replace(step=i % n))
            return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

        return jax.lax.fori_loop(0, repeats, body, (cache, jnp.zeros((b,), jnp.int32)))[1]

    def timed(fn, make_args, calls=3):
        jax.block_until_ready(fn(*make_args()))
        times = []
        for _ in range(calls):
            arguments = jax.block_until_ready(make_args())
            began = time.perf_counter()
            jax.block_until_ready(fn(*arguments))
            times.append(time.perf_counter() - began)
        return float(np.median(times))

    result: dict = {"shape": shape, "rows": b, "rows_per_prompt": k, "repeats": repeats}
    for name, (s, n) in {"full": (s_full, n_full), "own_small": (s_full, small), "prompt_small": (small, n_full),
                         "both_small": (small, small)}.items():  # fmt: skip
        seconds = timed(steps, lambda s=s, n=n: (state, layer_states, empty_cache(s, n)))
        result[f"ms_per_step_{name}"] = 1e3 * seconds / repeats
    logits = jax.random.normal(jax.random.key(0), (b, config.vocab_size), jnp.float32)
    keys = jax.random.split(jax.random.key(1), b)
    params = SamplingParams(n_full, temperature=1.0)

    def before(logits_bv, keys_b):  # the draw of the previous version
        cdf_bv = jnp.cumsum(jax.nn.softmax(logits_bv, axis=-1), axis=-1)
        u_b1 = jax.vmap(jax.random.uniform)(keys_b)[:, None] * cdf_bv[:, -1:]
        return jnp.minimum(jnp.sum(cdf_bv <= u_b1, axis=-1), logits_bv.shape[-1] - 1)

    draws = {"draw_now": jax.jit(lambda l, k: sample_next(l, k, params)), "draw_before": jax.jit(before)}
    for name, fn in draws.items():
        result[f"ms_{name}"] = 1e3 * timed(fn, lambda: (logits, keys), calls=5)
    result["draws_agree"] = float(
        np.mean(np.asarray(draws["draw_now"](logits, keys) == draws["draw_before"](logits, keys)))
    )
    result["weight_gb"] = 2 * sum(x.size for x in jax.tree.leaves(state)) / 1e9
    log(f"  {shape} rows {b}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k.startswith("ms")))
    return result


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--train-dtype", default="bfloat16")
    parser.add_argument("--remat", default="dots_no_batch")
    parser.add_argument(
        "--cases", default="FIRST_RUN", help="comma-separated cases in order, or FIRST_RUN / SECOND_RUN"
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    if args.smoke:
        args.train_steps, args.train_dtype, args.new_tokens = 1, "float32", 8
        args.cases = SMOKE
    args.cases = {"FIRST_RUN": FIRST_RUN, "SECOND_RUN": SECOND_RUN}.get(args.cases, args.cases)
    os.environ["AFT_DATA_DIR"] = str(args.assets / "data")
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out)
    report.path = args.out / "gpu_scale.json"
    import jax

    import machine

    gpu = jax.default_backend() == "gpu"
    no_gpu = None if gpu or args.smoke else "JAX has no GPU backend"
    no_cudnn = None if gpu else "cuDNN needs an NVIDIA GPU"
    report.data["args"] = {k: str(v) for k, v in vars(args).items()}
    report.data["machine"] = machine.record(measure=False)
    peaks = {"read_bytes_per_s": read_bandwidth(args.smoke), "bf16_flops": bf16_peak(args.smoke)}
    report.data["peaks"] = peaks
    log(
        f"read bandwidth {peaks['read_bytes_per_s'] / 1e12:.2f} TB/s, bf16 product {peaks['bf16_flops'] / 1e12:.0f} TFLOP/s"
    )
    report.write()
    budget = args.budget_s
    no_cudnn = [no_cudnn]  # set once the attention check fails

    def run(name: str) -> None:
        kind, *spec = name.split("-")
        if kind == "attention":
            run_case(report, "attention", "cudnn_vs_xla", budget, lambda: attention_check(args.assets, args.smoke))
            if "error" in report.data["attention"]["cudnn_vs_xla"]:
                no_cudnn[0] = no_cudnn[0] or "the cuDNN attention check failed"
        elif kind == "train":  # train-LAYOUT-ATTENTION-QUESTIONS
            layout, impl, questions = spec[0], spec[1], int(spec[2])
            fn = functools.partial(train_case, args.assets, args, layout, impl, questions, peaks)
            skip = (no_cudnn[0] if impl == "cudnn" else None) or no_gpu
            run_case(report, "train", "_".join(spec), budget, fn, skip_reason=skip)
        elif kind in ("sample", "decode"):  # sample-SHAPE-ROWS, decode-SHAPE-ROWS
            shape, rows = spec[0], int(spec[1])
            fn = functools.partial(
                sampling_case if kind == "sample" else decode_parts, args.assets, args, shape, rows, peaks
            )
            section = "sampling" if kind == "sample" else "decode_parts"
            run_case(report, section, f"{shape}_rows{rows}", budget, fn, skip_reason=no_gpu)
        else:
            raise SystemExit(f"unknown case {name!r}; see --help")

    for name in args.cases.split(","):
        run(name)
    log("done")


if __name__ == "__main__":
    main()
