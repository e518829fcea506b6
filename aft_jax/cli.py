"""The `aft-jax` command."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path


def _convert(args) -> None:
    import aft_jax
    from aft_jax.errors import SettingError
    from aft_jax.io import checkpoint
    from aft_jax.io.peft import is_adapter_dir, read_adapter, read_adapter_config, save_adapter

    dst = args.dst
    if not is_adapter_dir(args.src):
        if args.to == "peft":
            raise SettingError(
                f"convert --to peft: {args.src} is a full model, which has no adapters; the source of --to peft "
                "is a PEFT adapter folder (adapter_config.json)"
            )
        if args.base:
            raise SettingError(
                f"convert --base={args.base!r}: --base names an adapter's base; {args.src} is no adapter"
            )
        model, tokenizer = aft_jax.from_pretrained(args.src, dtype=args.dtype, allow_pickle=args.allow_pickle)
        if args.to == "hf":
            aft_jax.save_pretrained(model, tokenizer, dst)
        else:
            checkpoint.save_model_folder(model, tokenizer, dst)
        print(f"wrote {args.to} model to {dst}")
        return
    if args.to == "orbax":
        raise SettingError(
            f"convert --to orbax: {args.src} is a PEFT adapter folder; convert it --to hf (the merged full model) "
            "or --to peft (the adapter)"
        )
    from aft_jax.io.hf import TOKENIZER_FILES, load_tokenizer
    from aft_jax.model.adapters import with_adapters

    base = args.base or read_adapter_config(args.src)[1]
    if not base:
        raise SettingError(
            f"convert: the adapter {args.src} names no base model (base_model_name_or_path); give --base"
        )
    from aft_jax.build import resolve_model_path

    model, tokenizer = aft_jax.from_pretrained(
        resolve_model_path(base), dtype=args.dtype, allow_pickle=args.allow_pickle
    )
    lora, adapters = read_adapter(args.src, model.config)
    model = with_adapters(model, lora, adapters=adapters)
    if any((Path(args.src) / name).exists() for name in TOKENIZER_FILES):
        tokenizer = load_tokenizer(Path(args.src))  # the adapter's own (a LoRA run's output has one)
    if args.to == "hf":
        aft_jax.save_pretrained(model, tokenizer, dst)
        print(f"wrote the merged hf model (base {base} + adapter {args.src}) to {dst}")
    else:
        save_adapter(model, dst, base_name=str(base), tokenizer=tokenizer)
        print(f"wrote the peft adapter (base {base}) to {dst}")


def _load(args):
    from aft_jax.config.load import load_config
    from aft_jax.io.wandb_log import wandb_module

    config = load_config(args.config, args.overrides, command=args.command)
    if config.log.wandb:
        wandb_module()  # not installed: the error now, not after the first stage
    return config


def _train(args) -> None:
    from aft_jax.build import Context, base_model_name
    from aft_jax.stages.train import TrainSettings, run_training

    config = _load(args)
    ctx = Context.of(config)
    train_file = config.data.train_file
    if args.command == "vft" and not train_file and not ctx.task.has_references:
        from aft_jax.io.paths import Path as RunPath
        from aft_jax.pipeline import sample_references, vft_source

        if vft_source(ctx) == "sampled":  # "skip" is refused by ctx.batcher: there is nothing to train on
            train_file = str(sample_references(ctx, RunPath(config.run_dir) / "groups"))
    model = ctx.model()
    batcher = ctx.batcher(train_file, config.loss.method, model.config)
    out = run_training(
        model, ctx.tokenizer, batcher, TrainSettings.of(config), config.run_dir, mesh=ctx.mesh,
        base_name=base_model_name(config.model),
    )  # fmt: skip
    print(f"exported the final model to {out}")


def _sample(args) -> None:
    from aft_jax.build import Context, sampler_and_scorer
    from aft_jax.io import paths
    from aft_jax.stages.sample import sample_candidates

    config = _load(args)
    ctx = Context.of(config)
    model = ctx.model(mesh=ctx.sampling_mesh)
    out_dir = sample_candidates(
        *sampler_and_scorer(model, ctx.tokenizer, config, config.sample.batch_size),
        ctx.task,
        ctx.examples(config.task.train_split),
        config.sample.out_dir or paths.Path(config.run_dir) / "groups",
        settings=config.sample,
        template=config.task.template,
        seed=config.seed,
    )
    print(f"groups written to {out_dir}")


def _pipeline(args) -> None:
    from aft_jax.pipeline import run_pipeline

    run_pipeline(_load(args))


def _study(args) -> None:
    from aft_jax.config.spec import RunConfigError
    from aft_jax.study.runner import run_study, study_plan

    config = _load(args)
    try:
        study_plan(config)
    except ValueError as err:
        raise RunConfigError(str(err)) from None
    run_study(config)


def _restudy(args) -> None:
    from aft_jax.study.runner import restudy

    restudy(args.run_dir)


def _plan(args) -> None:
    from aft_jax.config.spec import RunConfigError
    from aft_jax.parallel.sharding import parse_mesh_shape
    from aft_jax.stages.plan import HBM_GB, plan_memory, recommend, request_host_devices

    config = _load(args)
    sizes = parse_mesh_shape(config.train.mesh)
    devices = args.devices or (math.prod(sizes) if -1 not in sizes else 0)
    if not devices:
        raise RunConfigError(
            f"train.mesh={config.train.mesh!r} leaves the device count open: give --devices N (or a mesh of "
            "explicit sizes, e.g. --config.train.mesh=1,16,1)"
        )
    request_host_devices(devices)
    plan = plan_memory(config, args.batch_size, args.seq_len, args.prompt_len or None)
    hbm = args.hbm_gb or HBM_GB[args.chip]
    print(
        f"mesh {plan.mesh}; per device: parameters {plan.params_gb:.2f} GB, optimizer state "
        f"{plan.optimizer_gb:.2f} GB, activations and temporaries {plan.temporaries_gb:.2f} GB, total "
        f"{plan.total_gb:.2f} GB (compiled in {plan.compile_s:.0f}s); {plan.layout} layout, "
        f"{plan.computed_tokens:,} tokens per step"
    )
    print(recommend(plan, hbm, config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aft-jax", description="Alignment Fine-Tuning for Llama-family models in JAX."
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error (also: AFT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser(
        "convert",
        help="convert a model between Hugging Face, Orbax and PEFT adapter formats",
        description="HF folder (or hub name) -> aft_jax Orbax model folder, or back; a PEFT LoRA adapter "
        "folder (a LoRA run's output) -> its base with the adapter merged in (--to hf) or the adapter "
        "(--to peft).",
    )
    convert.add_argument(
        "--to",
        choices=["orbax", "hf", "peft"],
        required=True,
        help="target format: orbax, hf (an adapter source: the merged full model), or peft (an adapter source only)",
    )
    convert.add_argument(
        "src", help="source: HF checkpoint folder, hub name, aft_jax model folder, or PEFT adapter folder"
    )
    convert.add_argument("dst", help="destination folder")
    convert.add_argument("--dtype", default="float32", help="parameter dtype (float32 or bfloat16)")
    convert.add_argument(
        "--base",
        default="",
        help="an adapter source's base model: HF folder, hub name, or aft_jax model folder "
        "(default: the adapter's base_model_name_or_path)",
    )
    convert.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow loading pickled *.bin weights (runs code from the file: trusted files only)",
    )
    convert.set_defaults(run=_convert)

    for name, text, run in (
        ("vft", "step 1: vanilla fine-tuning on (question, reference) pairs", _train),
        ("sample", "step 2: sample, label and score candidate groups with the VFT model", _sample),
        ("aft", "step 3: alignment fine-tuning on candidate groups (or a baseline: loss.method)", _train),
        ("pipeline", "all three steps, then evaluation and a comparison report, in one run directory", _pipeline),
        (
            "study",
            "the pipeline once per seed (study.seeds), then intervals, paired tests and the paper's claims",
            _study,
        ),
    ):
        command = sub.add_parser(
            name, help=text, description=f"{text}. Override any config key with --config.KEY=VALUE."
        )
        command.add_argument("--config", required=True, help="preset file, e.g. configs/tiny.py")
        command.set_defaults(run=run)

    restudy = sub.add_parser(
        "restudy",
        help="recompute a study's statistics, claims and plots from its stored evaluations (no training)",
        description="Reads RUN_DIR/study.json (seeds, models, sweeps, protocol) and every "
        "RUN_DIR/seed-<s>/eval/<model>.json, then rewrites study.json, study.md and plots/ as `study` does.",
    )
    restudy.add_argument("run_dir", help="a study's run directory (the one holding study.json)")
    restudy.set_defaults(run=_restudy)
    sub.add_parser(  # run by `main` before parsing: every argument after it is lm-eval's
        "lm-eval",
        help="lm-eval's command line with aft_jax registered as a model: aft-jax lm-eval --model aft_jax "
        "--model_args path=FOLDER --tasks gsm8k (see docs/usage.md)",
        add_help=False,
    )

    plan = sub.add_parser(
        "plan",
        help="per-device memory of the train step, from an ahead-of-time compilation",
        description="Compiles the train step on simulated devices with abstract shapes (no "
        "weights) and reports XLA's per-device memory, with a recommendation.",
    )
    plan.add_argument("--config", required=True)
    plan.add_argument("--devices", type=int, default=0, help="devices to simulate (default: the mesh's sizes)")
    plan.add_argument(
        "--chip",
        choices=["v4", "v5e", "v5p", "h100", "h200", "l4", "cpu"],  # aft_jax.stages.plan.HBM_GB
        default="cpu",
        help="accelerator whose HBM the plan is compared with (l4: any 24 GB GPU)",
    )
    plan.add_argument("--hbm-gb", type=float, default=0.0, help="HBM per device, overriding --chip")
    plan.add_argument("--batch-size", type=int, default=0, help="groups per step (default: train.batch_size)")
    plan.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: data.max_length)")
    plan.add_argument(
        "--prompt-len", type=int, default=0, help="of them, the prompt's (packed layout; default: half of --seq-len)"
    )
    plan.set_defaults(run=_plan)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # lm-eval's own command line, with aft_jax registered as a model
        from aft_jax.evals.lm_eval import main as lm_eval_main

        return lm_eval_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a[len("--config.") :] for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown or (overrides and not hasattr(args, "config")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    args.overrides = overrides
    debug = args.debug or os.environ.get("AFT_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if args.command != "plan":  # plan simulates its own devices
        from aft_jax.parallel.sharding import initialize_distributed

        initialize_distributed()
    from aft_jax.errors import UserError

    try:
        args.run(args)
    except (UserError, FileNotFoundError, FileExistsError) as err:
        if debug:
            raise
        message = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
        print(f"aft-jax {args.command}: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
