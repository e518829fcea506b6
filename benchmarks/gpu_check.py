"""One self-contained GPU check of aft_jax against PyTorch + transformers: sampling speed and train-step
speed / MFU on a SmolLM2-135M-shaped model with random weights, in one process, on one GPU.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --assets gpu_assets --out DIR [--budget-s 420] [--smoke]

`--assets` is a folder (ignored by git, carried to the device) holding:

    model/    config.json, generation_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja
              of SmolLM2-135M-Instruct (no weights)
    data/     gsm8k/test.jsonl (the first 64 test questions), laid out like the shared data folder
    wheels/   ml_collections (installed by benchmarks/gpu_check.sh; aft_jax.config.load needs it)

Parts, in order (each case is wrapped: a failure is recorded with its exception text and the rest still
run; results are rewritten to DIR/gpu_check.json after every case):

1. checkpoint: a random-weight HF checkpoint built from `model/config.json` (transformers
   `AutoModelForCausalLM.from_config`, torch seed 0, float32 safetensors) in a temporary folder, with the
   real tokenizer files copied in. Both sides load this one folder, so they hold the same weights.
2. sampling: for rows in (24, 96), i.e. 4 and 16 GSM8K questions x 6 samples, and for float32 and
   bfloat16 (parameters and activations in that dtype on both sides), `max_new_tokens` 256, temperature
   1.0, no top-k / top-p: `aft_jax.sampling.static.sample_token_ids` (prompts left-padded to a multiple of 64;
   one warm-up call that compiles, then timed calls with fresh keys) against transformers `generate` on
   CUDA (same prompts repeated 6 times, left-padded, `do_sample`, `top_k=0`, `top_p=1.0`, same EOS / pad
   ids; one short warm-up `generate`, then timed calls between `torch.cuda.synchronize()`). Generated
   tokens are counted as in benchmarks/sampling_vs_torch.py: EOS included, padding after it excluded.
   With random weights EOS is rare, so nearly every row runs the full `max_new_tokens`.
3. train: one AFT train step (1 group of K = 7 candidates x 512 tokens, AFT-BC + VFT, AdamW, grad-norm
   clipping) with bfloat16 compute and float32 parameters / optimizer state, for remat none and full,
   using `run_jax` / `run_torch` of benchmarks/train_step_vs_torch.py (torch: `torch.autocast` bfloat16,
   gradient checkpointing for remat full). Step time is the median over `--train-steps` steps after a
   first (compiling / warm-up) step.

   FLOPs of one step (model FLOPs, so remat's recomputation is not counted), with L layers, d hidden,
   H heads of size h (H * h = d = 576 for SmolLM2-135M), KV kv-heads, I the MLP width, V the vocabulary:

       N     = L * (d * h * (2 H + 2 KV) + 3 d I) + V d      (matmul weights; the tied embedding counted
                                                              once, as the LM head; norms left out)
       FLOPs = K * T * 6 N  +  12 * L * (H h) * T^2 * K      (K sequences of T tokens; the attention term
                                                              counts the full T x T score and value
                                                              matmuls, forward + backward, no causal
                                                              halving: the PaLM convention)

   This is `aft_jax.stages.train.train_flops`. MFU = FLOPs / step_s / peak, peak = 989e12 (H100 SXM dense
   bfloat16; also used for H200, which has the same compute) when the GPU's name contains H100 or H200,
   else MFU is null.

`--budget-s` (default 420) is a global time budget: once it is spent, the cases not yet started are
skipped and marked so (a case already running is not interrupted). `--smoke` shrinks everything (rows 6,
8 new tokens, K = 2 x 32 tokens, 1 timed step) so the whole check runs on a CPU in a few minutes; torch
then runs on the CPU when there is no CUDA device. Without `--smoke` (or `--allow-cpu`), the aft_jax
cases are skipped when JAX has no GPU backend, rather than crawl on the CPU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and torch share the GPU
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(Path(__file__).resolve().parent)) if p not in sys.path]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bfloat16 (H200: same compute)
BEGAN = time.monotonic()


def log(*parts) -> None:
    print(f"[{time.monotonic() - BEGAN:6.1f}s]", *parts, flush=True)


def elapsed() -> float:
    return time.monotonic() - BEGAN


class Report:
    """The JSON result, rewritten (atomically) after every case."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "gpu_check.json"
        self.data: dict = {}

    def write(self) -> None:
        self.data["elapsed_s"] = round(elapsed(), 2)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def run_case(report: Report, section: str, name: str, budget_s: float, fn, *, skip_reason: str | None = None):
    """Runs `fn()` as case `section/name`, recording its result dict, its exception, or why it was skipped."""
    cases = report.data.setdefault(section, {})
    if skip_reason is None and elapsed() > budget_s:
        skip_reason = f"time budget of {budget_s:.0f}s spent ({elapsed():.0f}s elapsed)"
    if skip_reason:
        cases[name] = {"skipped": skip_reason}
        log(f"{section}/{name}: skipped: {skip_reason}")
        report.write()
        return None
    log(f"{section}/{name}: start")
    began = time.monotonic()
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - recorded, and the other cases still run
        text = traceback.format_exc()
        print(text, flush=True)
        result = {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": text[-4000:]}
    result["case_s"] = round(time.monotonic() - began, 2)
    cases[name] = result
    log(f"{section}/{name}: {'error: ' + result['error'] if 'error' in result else 'done'} ({result['case_s']}s)")
    report.write()
    return result


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------------- environment


def environment() -> dict:
    env = {"python": platform.python_version(), "argv": sys.argv}
    import jax

    env["jax"] = jax.__version__
    env["jax_backend"] = jax.default_backend()
    env["jax_devices"] = [str(d) for d in jax.devices()]
    env["jax_device_kind"] = jax.devices()[0].device_kind
    for name in ("flax", "optax", "transformers", "torch", "ml_collections"):
        try:
            env[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001
            env[name] = f"unavailable: {type(err).__name__}: {err}"
    import torch

    env["torch_cuda"] = torch.cuda.is_available()
    env["torch_cuda_version"] = torch.version.cuda
    env["gpu_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    name = env["gpu_name"] or env["jax_device_kind"] or ""
    env["peak_flops"] = PEAK_BF16_FLOPS if ("H100" in name or "H200" in name) else None
    import machine

    env["machine"] = machine.record()  # CPU, GPU, versions, measured f32 and bf16 matmul peaks of both sides
    return env


# ---------------------------------------------------------------------------------------------- checkpoint


def build_checkpoint(model_assets: Path, target: Path) -> dict:
    """A random-weight (seed 0) float32 HF checkpoint of `model_assets/config.json` in `target`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_assets))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4; 5 always writes safetensors
    model.save_pretrained(str(target), **kwargs)
    for name in TOKENIZER_FILES:
        if (model_assets / name).is_file():
            shutil.copy(model_assets / name, target / name)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    files = sorted(p.name for p in target.iterdir())
    if not any(f.endswith(".safetensors") for f in files):
        raise RuntimeError(f"no safetensors written in {target}: {files}")
    return {"path": str(target), "files": files, "n_params": n_params, "model_type": config.model_type}


def matmul_params(cfg: dict) -> int:
    L, d, I, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    h = cfg.get("head_dim") or d // H
    return L * (d * h * (2 * H + 2 * KV) + 3 * d * I) + V * d


def train_step_flops(cfg: dict, k: int, length: int) -> float:
    """Model FLOPs of one train step on K sequences of `length` tokens (formula in the module docstring)."""
    H = cfg["num_attention_heads"]
    h = cfg.get("head_dim") or cfg["hidden_size"] // H
    attention = 12 * cfg["num_hidden_layers"] * H * h * length * length * k
    return float(6 * matmul_params(cfg) * k * length + attention)


# ---------------------------------------------------------------------------------------------- sampling


class SamplingModels:
    """aft_jax and transformers models of the checkpoint, loaded once per dtype."""

    def __init__(self, checkpoint: str, torch_device: str):
        self.checkpoint, self.torch_device = checkpoint, torch_device
        self.jax_models: dict = {}
        self.torch_models: dict = {}
        self.tokenizer = None

    def jax_model(self, dtype: str):
        if dtype not in self.jax_models:
            import aft_jax

            self.jax_models[dtype], self.tokenizer = aft_jax.from_pretrained(self.checkpoint, dtype=dtype)
        return self.jax_models[dtype]

    def torch_model(self, dtype: str):
        if dtype not in self.torch_models:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.checkpoint, dtype=getattr(torch, dtype))
            self.torch_models[dtype] = model.to(self.torch_device).eval()
        return self.torch_models[dtype]

    def get_tokenizer(self):
        if self.tokenizer is None:
            from aft_jax.io.hf import load_tokenizer

            self.tokenizer = load_tokenizer(Path(self.checkpoint))
        return self.tokenizer


def sample_jax(models: SamplingModels, prompts, k, dtype, max_new_tokens, temperature, repeats) -> dict:
    import jax

    from aft_jax.sampling.decode import decode_layers
    from aft_jax.sampling.sampler import left_pad, sampling_params
    from aft_jax.sampling.static import sample_token_ids

    model = models.jax_model(dtype)
    tokenizer = models.get_tokenizer()
    params = sampling_params(model, tokenizer, max_new_tokens, temperature)
    ids, mask = left_pad([tokenizer(p)["input_ids"] for p in prompts], len(prompts), params.pad_id, 64)
    began = time.perf_counter()
    sample_token_ids(model, ids, mask, params, jax.random.key(0), num_samples=k)  # compiles
    warmup_s = time.perf_counter() - began
    tokens, began = 0, time.perf_counter()
    layers = decode_layers(model)  # once for all batches, as the static loop's callers do
    for i in range(repeats):
        _, lengths = sample_token_ids(model, ids, mask, params, jax.random.key(1 + i), k, layers)
        tokens += int(lengths.sum())  # np.asarray inside: the call has finished
    seconds = time.perf_counter() - began
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "warmup_s": warmup_s,
        "prompt_len": int(ids.shape[1]),
        "eos_ids": list(params.eos_ids),
        "pad_id": params.pad_id,
    }


def sample_torch(models: SamplingModels, prompts, k, dtype, max_new_tokens, temperature, repeats) -> dict:
    import torch
    from sampling_vs_torch import count_generated

    model = models.torch_model(dtype)
    tokenizer = models.get_tokenizer()
    cfg = json.loads((Path(models.checkpoint) / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    # The same EOS / pad rule as aft_jax.sampling.sampler.sampling_params.
    eos_ids = sorted((set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}) - {None})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    tokenizer.padding_side = "left"
    encoded = tokenizer([p for p in prompts for _ in range(k)], return_tensors="pt", padding=True)
    encoded = {name: x.to(models.torch_device) for name, x in encoded.items()}
    cuda = models.torch_device.startswith("cuda")

    def generate(n):
        return model.generate(
            **encoded,
            max_new_tokens=n,
            do_sample=temperature > 0,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
        )

    torch.manual_seed(0)
    with torch.no_grad():
        began = time.perf_counter()
        generate(min(16, max_new_tokens))  # warm-up: CUDA context, kernels, allocator
        if cuda:
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - began
        tokens, seconds = 0, 0.0
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            began = time.perf_counter()
            out = generate(max_new_tokens)
            if cuda:
                torch.cuda.synchronize()
            seconds += time.perf_counter() - began
            tokens += count_generated(out[:, encoded["input_ids"].shape[1] :].cpu().numpy(), eos_ids)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "warmup_s": warmup_s,
        "prompt_len": int(encoded["input_ids"].shape[1]),
        "eos_ids": eos_ids,
        "pad_id": pad_id,
        "device": models.torch_device,
    }


def sampling_case(models, prompts, k, dtype, max_new_tokens, temperature, repeats, run_jax_side) -> dict:
    result: dict = {"rows": len(prompts) * k, "questions": len(prompts), "k": k, "dtype": dtype}
    result["max_new_tokens"], result["temperature"], result["repeats"] = max_new_tokens, temperature, repeats
    for side, fn in (("aft_jax", sample_jax), ("torch", sample_torch)):
        if side == "aft_jax" and run_jax_side is not True:
            result[side] = {"skipped": run_jax_side}
            continue
        try:
            result[side] = fn(models, prompts, k, dtype, max_new_tokens, temperature, repeats)
            log(f"  {side:8} {dtype:9} rows {result['rows']:3}: {result[side]['tokens_per_s']:9.1f} tokens/s")
        except Exception as err:  # noqa: BLE001 - the other side still runs
            text = traceback.format_exc()
            print(text, flush=True)
            result[side] = {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": text[-4000:]}
    if all("tokens_per_s" in result.get(s, {}) for s in ("aft_jax", "torch")):
        result["speed_ratio"] = result["aft_jax"]["tokens_per_s"] / result["torch"]["tokens_per_s"]
    return result


# ---------------------------------------------------------------------------------------------- train step


def train_case(checkpoint, cfg, args, remat, peak, run_jax_side, machine_record) -> dict:
    import machine
    import torch
    import train_step_vs_torch as ts

    ns = argparse.Namespace(
        steps=args.train_steps, k=args.train_k, length=args.train_length, remat=remat, dtype=args.train_dtype
    )
    ns.device = "auto"
    tokens = args.train_k * args.train_length
    flops = train_step_flops(cfg, args.train_k, args.train_length)
    result: dict = {
        "k": args.train_k,
        "length": args.train_length,
        "tokens": tokens,
        "remat": remat,
        "compute_dtype": args.train_dtype,
        "steps_timed": args.train_steps,
        "flops_per_step": flops,
        "peak_flops": peak,
    }
    for side in ("aft_jax", "torch"):
        if side == "aft_jax" and run_jax_side is not True:
            result[side] = {"skipped": run_jax_side}
            continue
        try:
            if side == "aft_jax":
                import jax

                r = ts.run_jax(ns, checkpoint)
                stats = jax.local_devices()[0].memory_stats() or {}
                r["device_peak_mb_process"] = stats.get("peak_bytes_in_use", 0) / 2**20 or None
            else:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                r = ts.run_torch(ns, checkpoint)
            r.pop("peak_rss_mb", None)  # one process for both sides here: not meaningful
            r["tokens_per_s"] = tokens / r["step_s"]
            r["mfu"] = flops / r["step_s"] / peak if peak else None
            library = "jax" if side == "aft_jax" else "torch"
            r["fraction_of_measured_peak"] = machine.fraction_of_peak(
                flops / r["step_s"], machine_record, library, args.train_dtype
            )
            result[side] = r
            mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
            log(f"  {side:8} remat {remat:5}: step {r['step_s']:.4f}s, {r['tokens_per_s']:.0f} tokens/s, MFU {mfu}")
        except Exception as err:  # noqa: BLE001 - the other side still runs
            text = traceback.format_exc()
            print(text, flush=True)
            result[side] = {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": text[-4000:]}
        free_memory()
    j, t = result.get("aft_jax", {}), result.get("torch", {})
    if "step_s" in j and "step_s" in t:
        result["speed_ratio"] = t["step_s"] / j["step_s"]
        result["first_loss_abs_diff"] = abs(j["losses"][0] - t["losses"][0])
    return result


def sampling_part(report, args, assets, checkpoint, torch_device, jax_ok, no_checkpoint, machine_record) -> None:
    """Each case also gets each side's share of its library's measured peak in the case's dtype, for
    2 N FLOPs per prompt token of each question and per row and step (random weights: every row runs
    all `max_new_tokens` steps)."""
    import machine

    from aft_jax.data.tasks import get_task

    rows_list = [int(r) for r in args.rows.split(",")]
    task = get_task("gsm8k")
    examples = task.load("test", data_dir=assets / "data", limit=max(rows_list) // args.k)
    prompts = [task.prompt(e, "alpaca") for e in examples]
    cfg = json.loads((assets / "model" / "config.json").read_text())
    models = SamplingModels(checkpoint, torch_device)
    for rows in rows_list:
        for dtype in args.dtypes.split(","):
            case = functools.partial(
                sampling_case,
                models,
                prompts[: rows // args.k],
                args.k,
                dtype,
                args.max_new_tokens,
                args.temperature,
                args.repeats,
                jax_ok,
            )
            result = run_case(report, "sampling", f"rows{rows}_{dtype}", args.budget_s, case, skip_reason=no_checkpoint)
            for side, library in (("aft_jax", "jax"), ("torch", "torch")):
                r = (result or {}).get(side, {})
                if "seconds" in r:
                    work = args.repeats * (rows // args.k * r["prompt_len"] + rows * args.max_new_tokens)
                    r["fraction_of_measured_peak"] = machine.fraction_of_peak(
                        2 * matmul_params(cfg) * work / r["seconds"], machine_record, library, dtype
                    )
            report.write()


def train_part(report, args, checkpoint, cfg, peak, jax_ok, no_checkpoint, machine_record) -> None:
    for remat in args.remat.split(","):
        name = f"K{args.train_k}x{args.train_length}_{args.train_dtype}_remat_{remat}"
        case = functools.partial(train_case, checkpoint, cfg, args, remat, peak, jax_ok, machine_record)
        run_case(report, "train", name, args.budget_s, case, skip_reason=no_checkpoint)


# ---------------------------------------------------------------------------------------------- table


def fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def status_of(case: dict, side: str | None = None) -> str:
    c = case.get(side, {}) if side else case
    return "skipped" if "skipped" in c else "ERROR" if "error" in c else ""


def print_table(data: dict) -> None:
    env = data.get("env", {}).get("info", {})
    print("\n==== gpu_check summary ====", flush=True)
    print(f"gpu: {env.get('gpu_name')}  jax {env.get('jax')} ({env.get('jax_backend')})  torch {env.get('torch')}")
    if "error" in env:
        print(f"environment: ERROR {env['error']}")
    ck = data.get("checkpoint", {}).get("build", {})
    if "error" in ck:
        print(f"checkpoint: ERROR {ck['error']}")
    print(f"\nsampling (tokens/s, EOS included)\n{'case':22} {'aft_jax':>10} {'torch':>10} {'ratio':>7}  notes")
    for name, c in data.get("sampling", {}).items():
        j, t = c.get("aft_jax", {}), c.get("torch", {})
        notes = " ".join(
            f"{s}:{status_of(c, s)}" for s in ("aft_jax", "torch") if status_of(c, s) and s in c
        ) or status_of(c)
        print(
            f"{name:22} {fmt(j.get('tokens_per_s'), '10.1f'):>10} {fmt(t.get('tokens_per_s'), '10.1f'):>10} "
            f"{fmt(c.get('speed_ratio'), '7.2f'):>7}  {notes}"
        )
    print(
        f"\ntrain step (median s, tokens/s, MFU)\n{'case':28} {'jax s':>8} {'torch s':>8} {'jax tok/s':>10} "
        f"{'torch tok/s':>11} {'jax MFU':>8} {'torch MFU':>9} {'ratio':>6}  notes"
    )
    for name, c in data.get("train", {}).items():
        j, t = c.get("aft_jax", {}), c.get("torch", {})
        notes = " ".join(
            f"{s}:{status_of(c, s)}" for s in ("aft_jax", "torch") if status_of(c, s) and s in c
        ) or status_of(c)
        if "first_loss_abs_diff" in c:
            notes += f" |loss diff| {c['first_loss_abs_diff']:.2e}"
        print(
            f"{name:28} {fmt(j.get('step_s'), '8.4f'):>8} {fmt(t.get('step_s'), '8.4f'):>8} "
            f"{fmt(j.get('tokens_per_s'), '10.0f'):>10} {fmt(t.get('tokens_per_s'), '11.0f'):>11} "
            f"{fmt(j.get('mfu'), '8.3f'):>8} {fmt(t.get('mfu'), '9.3f'):>9} {fmt(c.get('speed_ratio'), '6.2f'):>6}  "
            f"{notes}"
        )
    for error in data.get("errors", []):
        print(f"ERROR {error}")
    print(f"\nelapsed {data.get('elapsed_s')}s; ratio = aft_jax speed / torch speed", flush=True)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=REPO / "gpu_assets")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU")
    parser.add_argument("--allow-cpu", action="store_true", help="run the aft_jax cases without a JAX GPU")
    parser.add_argument("--parts", default="sampling,train", help="comma list, in order: sampling, train")
    parser.add_argument("--rows", default="24,96", help="sampling rows (questions x k), comma list")
    parser.add_argument("--k", type=int, default=6, help="samples per question")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="sampling dtypes, comma list")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=1, help="timed sampling calls per case and side")
    parser.add_argument("--train-k", type=int, default=7)
    parser.add_argument("--train-length", type=int, default=512)
    parser.add_argument("--train-dtype", default="bfloat16", help="train compute dtype")
    parser.add_argument("--remat", default="none,full", help="remat policies, comma list")
    parser.add_argument("--train-steps", type=int, default=5, help="timed steps (after a first one)")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.max_new_tokens = "6", 8
        args.train_k, args.train_length, args.train_steps = 2, 32, 1
        args.allow_cpu = True

    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out)
    report.data["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    assets = args.assets.resolve()
    os.environ.setdefault("AFT_DATA_DIR", str(assets / "data"))

    env = run_case(report, "env", "info", float("inf"), environment)
    for key, value in env.items():
        log(f"{key}: {value}")
    peak = env.get("peak_flops")
    jax_ok: bool | str = True
    if env.get("jax_backend") not in (None, "gpu", "cuda") and not args.allow_cpu:
        jax_ok = f"JAX backend is {env.get('jax_backend')!r}, not gpu (pass --allow-cpu to run anyway)"
        log("WARNING:", jax_ok)
    torch_device = "cuda" if env.get("torch_cuda") else "cpu"

    tmp = Path(tempfile.mkdtemp(prefix="aft_gpu_check_"))
    try:
        checkpoint = str(tmp / "smollm2-135m-random")
        built = run_case(
            report, "checkpoint", "build", float("inf"), lambda: build_checkpoint(assets / "model", Path(checkpoint))
        )
        no_checkpoint = "no checkpoint: its build failed" if "error" in built else None
        cfg = json.loads((assets / "model" / "config.json").read_text())
        report.data["checkpoint"]["flops"] = {
            "matmul_params": matmul_params(cfg),
            "train_step_flops": train_step_flops(cfg, args.train_k, args.train_length),
        }
        free_memory()

        for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
            try:
                if part == "sampling":
                    sampling_part(
                        report, args, assets, checkpoint, torch_device, jax_ok, no_checkpoint, env.get("machine", {})
                    )
                elif part == "train":
                    train_part(report, args, checkpoint, cfg, peak, jax_ok, no_checkpoint, env.get("machine", {}))
                else:
                    raise ValueError(f"unknown part {part!r}")
            except Exception as err:  # noqa: BLE001 - recorded, and the other parts still run
                print(traceback.format_exc(), flush=True)
                report.data.setdefault("errors", []).append(f"{part}: {type(err).__name__}: {err}"[:2000])
                report.write()
            free_memory()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        report.write()
        print_table(report.data)
        log(f"wrote {report.path}")


if __name__ == "__main__":
    main()
