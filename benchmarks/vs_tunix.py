"""aft_jax against Google's Tunix (google-tunix 0.1.7) on SmolLM2-135M-Instruct (float32, the folder of
`aft_jax.io.smollm2.smollm2_checkpoint()`, which both libraries load), the same inputs on both sides, in one run.

    .venv/bin/python benchmarks/vs_tunix.py [--repeats 3] [--questions 4] [--new-tokens 96]
        [--only {sampling,dpo,groups}] [--tunix-python ../tunix-venv/bin/python] [--remat full]
        [--layouts padded,packed,planned] [--tokens-per-row 1024] [--micro-pairs 2] [--lr 1e-6]
        [--out FILE]

Tunix lives in a venv of its own, never in the project's (its pins would move the project's transformers,
tokenizers and huggingface_hub):

    python3.11 -m venv ../tunix-venv && ../tunix-venv/bin/pip install google-tunix==0.1.7 jax==0.10.2

`--tunix-python` (default `$TUNIX_PYTHON`, else ../tunix-venv/bin/python beside the checkout) runs `benchmarks/tunix_side.py`,
which does not import aft_jax; this script builds every input once (token ids, in a temporary `work.json`)
and runs each side, one process per part and layout, so that each peak RSS (`ru_maxrss`, loading included;
`timed_steps_peak_rss_mb`: the peak during the timed steps alone, Linux `VmHWM` reset before each) is its
own. Train steps rematerialise every layer on both sides by default (`--remat full`: aft_jax
`remat_policy=full`, Tunix `RematConfig.DECODER`); without it aft_jax's padded K = 7 step over 2 questions
already needs about 17 GB here. Times are medians of `--repeats` runs after a warm-up (compiling) run; a
later run during which XLA compiled anything (Tunix's DPO train step compiles again on its second call) is
left out of the times and listed (`runs_that_compiled`, `steps_that_compiled`), another run made in its place.

Parity first: the same token ids (two real sequences: a DPO pair's prompt + chosen, a sampling prompt) through
both models give logits within 1e-3 (max abs difference reported; the script stops above it), and the
difference without the rope_theta fix below is reported too.

a. Sampling: 8 GSM8K test prompts (Alpaca, `task.prompt(example, "alpaca")`) x 6 samples, `--new-tokens` new
   tokens, temperature 1.0, no top-k / top-p filtering (the full vocabulary on both sides; the draws differ,
   the distribution is the same), prompts left-padded to the same multiple of 64. Two variants: fixed length
   (no EOS: both do identical work) and stopping at EOS (work depends on where samples stop; both report
   their decode steps). aft_jax: its static loop (`sampling.static`, the 8 prompts x 6 in one batch of 48
   rows, each prompt prefilled once) and its continuous loop (`sampling.continuous`, 48 rows, 6 per prompt
   slot); each call copies the decode weights (`decode_layers`) as `JaxSampler` does. Tunix: `Sampler`, 48
   rows (each prompt repeated 6 times: it has no samples per prompt; every row prefilled), its `__call__`
   (text decoding included). tokens/s counts tokens up to and including EOS; ms per step is the call's time
   over its decode steps (prefill included); `decode_ms_per_step` leaves the prefill out: the call's time
   less that of the same loop generating one token (`first_token_only`), over the further steps.
b. DPO on 4 pairs (prompt + chosen = a GSM8K training question's reference chain, rejected = another
   question's reference; `group_step_layouts.encoded_groups`, at most 512 tokens), beta 0.1, the same
   optimizer (clip at norm 1, AdamW at `--lr`, no warmup, cosine decay over 100 steps, no weight decay) and
   the losses of the first 4 steps on both sides (default lr 1e-6: at the project's 2e-5 these easy pairs
   are separated within two steps, losses 0.69, 0.046, 0.002, 0.0002, which leaves little to compare).
   Tunix: `DPOTrainer` with a reference model, its train loop's body timed in two pieces: `_prepare_inputs`
   (masks and the reference forward, every step) and the jitted train step; prompts and responses padded to
   the exact longest. aft_jax: `loss.method=dpo` on K = 2 groups whose reference log-probs (`logp_sum`) are
   computed once beforehand (timed apart: `reference_once_s`, not in the step), in the padded, the packed
   (`--tokens-per-row`) and the cost-planned layout (`collate_planned`, `layout_cost`). Ratios against
   Tunix's whole step and against its train step alone.
c. AFT's data: K = 7 candidates per question (the reference as positive, six other questions' references as
   negatives). Tunix must express them as the 6 (reference, negative) pairs DPO takes (prompt repeated in
   each, a reference forward per step), `--micro-pairs` pairs per micro-batch, the micro-batches' gradients
   averaged into one update by its `gradient_accumulation_steps` (default 2 pairs: one question's 6 pairs in
   one micro-batch ran out of this machine's 24 GB at 2 questions). aft_jax: its AFT-BC step
   (`loss.method=aft`, `constraint=boundary`, beta 0.1) over the same candidates, all `--questions` in one
   batch, padded, packed and planned. Questions/s and peak memory for `--questions` questions per step.

Tunix 0.1.7 traps handled on its side (listed in the result under "tunix_traps", see tunix_side.py): its Llama
`apply_rope` ignores `rope_theta` (1e6 always; patched to SmolLM2's 1e5), its sampler prepends a BOS, treats
every token equal to the pad id as padding (SmolLM2's pad is its EOS `<|im_end|>`: a pad id in no prompt and no
EOS is used), keeps its first call's EOS ids (a sampler per EOS setting), and samples only when top_p is given.

Writes `--out` (default benchmarks/results/vs_tunix.json: machine, settings, every number, the parity check,
the traps) and prints a Markdown table of ratios aft_jax / Tunix (throughputs and peak memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import (  # benchmarks/, beside this script
    COMPILED,
    count_compiles,
    median_sampling_run,
    peak_rss_mb,
    reset_peak,
    vm_hwm_mb,
)

REPO = Path(__file__).resolve().parents[1]
if not os.environ.get("AFT_DATA_DIR") and (REPO.parent / "shared" / "data").is_dir():
    os.environ["AFT_DATA_DIR"] = str(REPO.parent / "shared" / "data")  # as the tests find GSM8K

PROMPTS, SAMPLES, TEMPERATURE = 8, 6, 1.0
DPO_PAIRS, BETA, TOTAL_STEPS, MAX_LENGTH, PAD_MULTIPLE = 4, 0.1, 100, 512, 64
PARITY_TOLERANCE = 1e-3
LAYOUTS = ("padded", "packed", "planned")
PARTS = ("sampling", "dpo", "groups")
VARIANTS = ("fixed_length", "stop_at_eos")  # of sampling


def padded_length(lengths) -> int:
    return -(-max(lengths) // PAD_MULTIPLE) * PAD_MULTIPLE


# ---------------------------------------------------------------------------------------------------------
# The inputs, built once (token ids) for both sides.


def group_json(group) -> dict:
    return {
        "tokens": [list(map(int, t)) for t in group.tokens],
        "prompt_lengths": list(map(int, group.prompt_lengths)),
        "candidates": [dataclasses.asdict(c) for c in group.candidates],
    }


def group_of(data: dict):
    from aft_jax.data.batches import EncodedGroup
    from aft_jax.data.groups import Candidate

    return EncodedGroup(data["tokens"], data["prompt_lengths"], [Candidate(**c) for c in data["candidates"]])


def pairs_of(groups: list[dict]) -> list[dict]:
    """Each group's (reference, other candidate) pairs: what DPO takes."""
    pairs = []
    for g in groups:
        n = g["prompt_lengths"][0]
        chosen = g["tokens"][0]
        for rejected in g["tokens"][1:]:
            pairs.append({"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]})
    return pairs


def build_work(args, checkpoint: str) -> dict:
    from group_step_layouts import K, encoded_groups  # benchmarks/, beside this script
    from transformers import AutoTokenizer

    from aft_jax.data.tasks import get_task
    from aft_jax.io.hf_files import read_config
    from aft_jax.model.families import config_from_hf

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    task = get_task("gsm8k")
    prompts = [task.prompt(e, "alpaca") for e in task.load("test", limit=PROMPTS)]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    config = config_from_hf(read_config(Path(checkpoint)))
    eos_ids = sorted(set(config.eos_token_ids) | ({tokenizer.eos_token_id} - {None}))  # as `sampling_params`
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    used = {t for ids in prompt_ids for t in ids} | set(eos_ids)
    tunix_pad = next(i for i in range(3, config.vocab_size) if i not in used)  # a special token in no prompt

    dpo_groups, _ = encoded_groups(checkpoint, DPO_PAIRS)
    dpo = [group_json(g) for g in dpo_groups]
    dpo = [{k: v[:2] for k, v in g.items()} for g in dpo]  # (reference, one other question's reference)
    groups, _ = encoded_groups(checkpoint, args.questions)
    groups = [group_json(g) for g in groups]
    optim = {
        "lr": args.lr, "total_steps": TOTAL_STEPS, "min_lr_ratio": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
        "weight_decay": 0.0, "clip_norm": 1.0,
    }  # fmt: skip
    return {
        "checkpoint": checkpoint,
        "pad_id": int(pad_id),
        "optim": optim,
        "parity": {"sequences": [dpo[0]["tokens"][0], prompt_ids[0]]},
        "sampling": {
            "prompts": prompts,
            "prompt_ids": prompt_ids,
            "prompt_length": padded_length([len(p) for p in prompt_ids]),
            "samples": SAMPLES,
            "new_tokens": args.new_tokens,
            "temperature": TEMPERATURE,
            "eos_ids": eos_ids,
            "pad_id": int(tunix_pad),
            "project_pad_id": int(pad_id),
        },
        "dpo": {"groups": dpo, "k": 2, "pairs": pairs_of(dpo), "pairs_per_question": 1, "beta": BETA},
        "groups": {"groups": groups, "k": K, "pairs": pairs_of(groups), "pairs_per_question": K - 1, "beta": BETA},
    }


# ---------------------------------------------------------------------------------------------------------
# The aft_jax side (run in its own process: `--side PART[:LAYOUT]`).


def jax_parity(work: dict, out: Path) -> dict:
    import jax.numpy as jnp

    import aft_jax

    model, _ = aft_jax.from_pretrained(work["checkpoint"])
    logits = [np.asarray(model(jnp.asarray([ids], jnp.int32)))[0] for ids in work["parity"]["sequences"]]
    np.savez(out / "parity_aft_jax.npz", *logits)
    return {"rope_theta": model.config.rope_theta, "peak_rss_mb": peak_rss_mb()}


def jax_sampling(work: dict, repeats: int) -> dict:
    import jax

    import aft_jax
    from aft_jax.sampling import continuous
    from aft_jax.sampling.next_token import SamplingParams
    from aft_jax.sampling.sampler import left_pad
    from aft_jax.sampling.static import sample_token_ids

    s = work["sampling"]
    model, _ = aft_jax.from_pretrained(work["checkpoint"])
    ids, mask = left_pad(s["prompt_ids"], len(s["prompt_ids"]), s["project_pad_id"], PAD_MULTIPLE)
    assert ids.shape[1] == s["prompt_length"], (ids.shape, s["prompt_length"])
    k, n, key = s["samples"], s["new_tokens"], jax.random.key(0)
    rows = len(ids) * k
    result = {"rows": rows, "prompt_length": int(ids.shape[1])}
    variants = (("fixed_length", (), n), ("stop_at_eos", tuple(s["eos_ids"]), n), ("first_token_only", (), 1))
    for variant, eos, new_tokens in variants:  # first_token_only: the prefill's cost
        params = SamplingParams(new_tokens, s["temperature"], 0, 1.0, eos, s["project_pad_id"])

        def static(params=params):
            _, lengths = sample_token_ids(model, ids, mask, params, key, k)
            return lengths, lengths.max()

        def continuous_loop(params=params):
            out = continuous.sample_continuous(model, ids, mask, params, key, k, rows=rows)
            return out.lengths, out.steps

        result[variant] = {
            "static": median_sampling_run(static, repeats),
            "continuous": median_sampling_run(continuous_loop, repeats),
        }
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def jax_train(work: dict, part: str, layout: str, args) -> dict:
    """DPO (part "dpo": K = 2 groups, reference log-probs computed once first) or AFT-BC (part "groups")."""
    import jax
    from flax import nnx

    import aft_jax
    from aft_jax.config.defaults import default_config
    from aft_jax.data.batches import collate, collate_packed, collate_planned
    from aft_jax.data.layout_cost import layout_cost
    from aft_jax.method.scoring import candidate_logp_sums
    from aft_jax.model.attention import resolve_impl
    from aft_jax.parallel import sharding
    from aft_jax.stages.program import build_train_program
    from aft_jax.stages.train import shard_batch

    w, pad_id = work[part], work["pad_id"]
    k = w["k"]
    groups = [group_of(g) for g in w["groups"]]
    mesh = sharding.single_device_mesh()
    model, _ = aft_jax.from_pretrained(work["checkpoint"], mesh=mesh, remat_policy=args.remat)
    m = model.config
    length = padded_length([len(t) for g in groups for t in g.tokens])
    result = {}
    if part == "dpo":  # the reference log-probs the groups carry (`logp_sum`), computed once, before training
        graphdef, state = nnx.split(model)
        score = jax.jit(lambda state, batch: candidate_logp_sums(nnx.merge(graphdef, state), batch))
        batch = shard_batch(collate(groups, k, length, pad_id), mesh)
        with sharding.use_mesh(mesh):
            logp = np.asarray(score(state, batch))  # compiles
            seconds = []
            for _ in range(args.repeats):
                began = time.perf_counter()
                jax.block_until_ready(score(state, batch))
                seconds.append(time.perf_counter() - began)
        result["reference_once_s"] = float(np.median(seconds))
        groups = [
            dataclasses.replace(
                g, candidates=[dataclasses.replace(c, logp_sum=float(v)) for c, v in zip(g.candidates, r)]
            )
            for g, r in zip(groups, logp)
        ]
        result["reference_logp_sum"] = logp.tolist()
    if layout == "padded":
        batch = collate(groups, k, length, pad_id)
    elif layout == "packed":
        batch = collate_packed(groups, k, tokens_per_row=args.tokens_per_row, pad_id=pad_id, pad_multiple=PAD_MULTIPLE)
    else:
        attention = resolve_impl(m.attention, m.dtype, m.head_dim, packed=True)
        cost = layout_cost(m, jax.default_backend(), attention)
        batch = collate_planned(
            groups, k, cost=cost, tokens_per_row=args.tokens_per_row, max_length=MAX_LENGTH, pad_id=pad_id
        )
        result["planned_as"] = "packed" if "slot_ids" in batch else "padded"
    result["token_shape"] = list(batch["input_ids"].shape)
    result["tokens_computed"] = int(np.prod(batch["input_ids"].shape))
    cfg = default_config()
    if part == "dpo":
        cfg.loss.update(method="dpo", constraint="none", beta_dpo=w["beta"])
    else:
        cfg.loss.update(method="aft", constraint="boundary", beta=w["beta"])
    o = work["optim"]
    cfg.optim.update(
        lr=o["lr"], warmup_ratio=0.0, min_lr_ratio=o["min_lr_ratio"], weight_decay=o["weight_decay"], b1=o["b1"],
        b2=o["b2"], eps=o["eps"], clip_norm=o["clip_norm"],
    )  # fmt: skip
    program = build_train_program(m, mesh, cfg.loss, cfg.optim, total_steps=o["total_steps"], grad_accum=1)
    state = program.init_state(model, 0)
    del model
    batch = shard_batch(batch, mesh)
    times, losses, compiled, step, timed_peak = [], [], [], 0, 0.0
    state, metrics = program(state, batch)  # the first step compiles
    losses.append(float(metrics["loss"]))
    while len(times) < args.repeats or (part == "dpo" and len(losses) < 4):  # DPO: 4 losses compared
        step += 1
        reset = reset_peak()  # each step's own peak
        began, before = time.perf_counter(), len(COMPILED)
        state, metrics = program(state, batch)
        losses.append(float(metrics["loss"]))
        if len(COMPILED) > before:  # left out of the times
            compiled.append({"step": step, "compiled": COMPILED[before:], "s": time.perf_counter() - began})
        elif len(times) < args.repeats:
            times.append(time.perf_counter() - began)
            timed_peak = max(timed_peak, vm_hwm_mb()) if reset else None
        if step >= args.repeats + 4:
            break
    if not times:  # every step compiled: time them anyway (listed in steps_that_compiled)
        times = [c["s"] for c in compiled]
    return result | {
        "step_s": float(np.median(times)),
        "step_s_each": times,
        "losses": losses,
        "steps_that_compiled": compiled,
        "peak_rss_mb": peak_rss_mb(),
        "timed_steps_peak_rss_mb": timed_peak,
    }


def run_jax_side(args) -> None:
    count_compiles()
    work = json.loads((args.work / "work.json").read_text())
    part, _, layout = args.side.partition(":")
    if part == "parity":
        result = jax_parity(work, args.work)
    elif part == "sampling":
        result = jax_sampling(work, args.repeats)
    else:
        result = jax_train(work, part, layout, args)
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------------------
# The orchestrator.


def run(cmd: list[str], label: str) -> dict:
    """One side's process (stderr passes through): its result, the last JSON line of its stdout, or `{"error"}`
    where it failed (exit -9: killed, out of memory as a rule), so that the other measurements go on."""
    print(f"--- {label}", file=sys.stderr, flush=True)
    began = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    if out.returncode:
        print(f"--- {label} FAILED (exit {out.returncode})", file=sys.stderr, flush=True)
        return {"error": f"exit {out.returncode}", "command": " ".join(cmd)}
    line = next(line for line in reversed(out.stdout.splitlines()) if line.strip())
    result = json.loads(line.removeprefix("RESULT "))
    result["process_wall_s"] = time.perf_counter() - began
    print(f"--- {label}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return result


def parity_check(work_dir: Path) -> dict:
    ours = np.load(work_dir / "parity_aft_jax.npz")
    theirs = np.load(work_dir / "parity_tunix.npz")
    unpatched = np.load(work_dir / "parity_tunix_unpatched.npz")
    diff = [float(np.max(np.abs(ours[f] - theirs[f]))) for f in ours.files]
    diff_unpatched = [float(np.max(np.abs(ours[f] - unpatched[f]))) for f in ours.files]
    same_argmax = [float(np.mean(ours[f].argmax(-1) == theirs[f].argmax(-1))) for f in ours.files]
    return {
        "sequence_lengths": [int(ours[f].shape[0]) for f in ours.files],
        "max_abs_logit_diff": max(diff),
        "max_abs_logit_diff_each": diff,
        "max_abs_logit_diff_without_rope_theta_patch": max(diff_unpatched),
        "same_argmax_share": same_argmax,
        "tolerance": PARITY_TOLERANCE,
        "max_abs_logit": max(float(np.max(np.abs(ours[f]))) for f in ours.files),
    }


def add_decode_rates(runs: dict, prefill: dict) -> None:
    """Each run's time less that of its loop generating one token (`first_token_only`: the prefill and one draw),
    per further decode step: the decode step alone, whatever the prefill costs."""
    for run in runs.values():
        decode = run["seconds"] - prefill["seconds"]
        run["prefill_s"] = prefill["seconds"]
        run["decode_ms_per_step"] = 1e3 * decode / (run["decode_steps"] - 1) if run["decode_steps"] > 1 else None


def failed(*sides) -> bool:
    return any("error" in side for side in sides)


def ratio(ours, theirs):
    return ours / theirs if ours is not None and theirs else None


def summarise(results: dict, args) -> list[tuple[str, float | None, float | None, str]]:
    """Table rows: (what, aft_jax, Tunix, unit); the ratio is aft_jax / Tunix."""
    rows = []
    if "sampling" in results and not failed(results["sampling"]["aft_jax"], results["sampling"]["tunix"]):
        s, t = results["sampling"]["aft_jax"], results["sampling"]["tunix"]
        for variant in VARIANTS:
            for loop in ("static", "continuous"):
                ours, theirs = s[variant][loop], t[variant]
                name = f"sampling {variant.replace('_', ' ')}, {loop}"
                rows.append((name, ours["tokens_per_s"], theirs["tokens_per_s"], "tokens/s"))
                for key, what in (("ms_per_step", "prefill included"), ("decode_ms_per_step", "prefill excluded")):
                    if ours[key] and theirs[key]:
                        rows.append((f"{name}: steps/s, {what}", 1e3 / ours[key], 1e3 / theirs[key], "steps/s"))
        for loop in ("static", "continuous"):
            ours, theirs = s["first_token_only"][loop]["seconds"], t["first_token_only"]["seconds"]
            rows.append((f"sampling prefill (+ first token), {loop}", 1 / ours, 1 / theirs, "calls/s"))
        rows.append(("sampling peak RSS", s["peak_rss_mb"], t["peak_rss_mb"], "MB"))
    for part, unit, per_step in (("dpo", "steps/s", 1), ("groups", "questions/s", args.questions)):
        if part not in results:
            continue
        t = results[part]["tunix"]
        name = "DPO, 4 pairs" if part == "dpo" else "K=7 groups (AFT-BC; Tunix: DPO on 6 pairs each)"
        for layout in args.layouts:
            r = results[part]["aft_jax"][layout]
            if failed(r, t):
                rows.append((f"{name}, {layout}: failed, see the results file", None, None, ""))
                continue
            ours = per_step / r["step_s"]
            rows.append((f"{name}, {layout}: vs Tunix whole step", ours, per_step / t["step_s"], unit))
            rows.append((f"{name}, {layout}: vs Tunix train step alone", ours, per_step / t["train_step_s"], unit))
            rows.append((f"{name}, {layout}: peak RSS", r["peak_rss_mb"], t["peak_rss_mb"], "MB"))
            ours, theirs = r["timed_steps_peak_rss_mb"], t["timed_steps_peak_rss_mb"]
            rows.append((f"{name}, {layout}: peak RSS of the timed steps", ours, theirs, "MB"))
    return rows


def markdown(rows) -> str:
    lines = ["| measure | aft_jax | Tunix | unit | aft_jax / Tunix |", "|---|---:|---:|---|---:|"]
    for name, ours, theirs, unit in rows:
        r = ratio(ours, theirs)
        lines.append(
            f"| {name} | {ours:.4g} | {theirs:.4g} | {unit} | {r:.2f} |" if r else f"| {name} | | | {unit} | |"
        )
    return "\n".join(lines)


def report(args, checkpoint: str, work: dict, results: dict, tunix_traps: dict, parity_failed: bool, began: float):
    """Derived numbers (decode rates, loss agreement), the results file and the printed table."""
    parts = [args.only] if args.only else list(PARTS)
    parity = results["parity"]
    tunix_versions = parity["tunix"].get("versions")
    if "sampling" in results and not failed(results["sampling"]["aft_jax"], results["sampling"]["tunix"]):
        s = results["sampling"]
        for loop in ("static", "continuous"):
            add_decode_rates({v: s["aft_jax"][v][loop] for v in VARIANTS}, s["aft_jax"]["first_token_only"][loop])
        add_decode_rates({v: s["tunix"][v] for v in VARIANTS}, s["tunix"]["first_token_only"])
    if "dpo" in results and not failed(results["dpo"]["tunix"]):
        d = results["dpo"]
        t_losses = d["tunix"]["losses"][:4]
        ok = [layout for layout in args.layouts if not failed(d["aft_jax"][layout])]
        pairs = {layout: list(zip(d["aft_jax"][layout]["losses"][:4], t_losses)) for layout in ok}
        d["loss_agreement"] = {layout: max(abs(a - b) for a, b in p) for layout, p in pairs.items()}
        d["loss_agreement_relative"] = {layout: max(abs(a - b) / abs(b) for a, b in p) for layout, p in pairs.items()}
    import machine  # benchmarks/, beside this script

    rows = summarise(results, args)
    summary = {
        "machine": machine.record(measure=False),
        "tunix_versions": tunix_versions,
        "settings": {
            "model": "SmolLM2-135M-Instruct, float32 weights and compute",
            "checkpoint": checkpoint,
            "repeats": args.repeats,
            "remat": args.remat,
            "sampling": {
                "prompts": PROMPTS,
                "samples_per_prompt": SAMPLES,
                "new_tokens": args.new_tokens,
                "temperature": TEMPERATURE,
                "top_k": "off",
                "top_p": "off (1.0)",
                "prompt_length": work["sampling"]["prompt_length"],
                "eos_ids": work["sampling"]["eos_ids"],
                "tunix_pad_id": work["sampling"]["pad_id"],
                "fixed_length": "no EOS on either side: every row generates new_tokens tokens",
            },
            "dpo": {"pairs": DPO_PAIRS, "beta": BETA, "optimizer": work["optim"], "steps_for_losses": 4},
            "groups": {
                "questions": args.questions,
                "k": 7,
                "pairs_per_question": 6,
                "aft_loss": "aft, boundary, beta 0.1",
                "tunix_pairs_per_micro_batch": args.micro_pairs,
            },
            "tokens_per_row": args.tokens_per_row,
            "layouts": args.layouts,
            "max_length": MAX_LENGTH,
            "parts": parts,
        },
        "tunix_traps": tunix_traps,
        **results,
        "ratios": [
            {"measure": n, "aft_jax": a, "tunix": b, "unit": u, "aft_jax_over_tunix": ratio(a, b)}
            for n, a, b, u in rows
        ],
        "wall_s": time.perf_counter() - began,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if parity_failed:
        raise SystemExit(
            f"parity check failed: max |logit diff| {parity['max_abs_logit_diff']:.3g} > {PARITY_TOLERANCE} "
            f"(results so far in {args.out})"
        )
    print(
        f"parity: max |logit diff| {parity['max_abs_logit_diff']:.2e} (tolerance {PARITY_TOLERANCE}); "
        f"without Tunix's rope_theta fixed {parity['max_abs_logit_diff_without_rope_theta_patch']:.2f}"
    )
    if "sampling" in results and not failed(results["sampling"]["tunix"]):
        t = results["sampling"]["tunix"]
        print(
            f"Tunix sampler: prompt ids the same as the project's: {t['prompt_ids_identical']}; generated tokens "
            f"equal to its pad id (masked by it): {[t[v]['generated_pad_tokens'] for v in VARIANTS]}"
        )
    if "loss_agreement" in results.get("dpo", {}):
        d = results["dpo"]
        print(f"DPO losses, first 4 steps: Tunix {[round(x, 6) for x in d['tunix']['losses'][:4]]}")
        for layout in d["loss_agreement"]:
            print(
                f"  aft_jax {layout}: {[round(x, 6) for x in d['aft_jax'][layout]['losses'][:4]]} "
                f"(max |diff| {d['loss_agreement'][layout]:.2e}, relative {d['loss_agreement_relative'][layout]:.2e})"
            )
    if "dpo" in results and not failed(results["dpo"]["tunix"]):
        once = [r["reference_once_s"] for r in results["dpo"]["aft_jax"].values() if not failed(r)] or [float("nan")]
        print(
            f"DPO reference log-probs: aft_jax computes them once ({once[0]:.1f} s, not in its step); "
            f"Tunix's _prepare_inputs (the reference forward, masks) takes "
            f"{results['dpo']['tunix']['reference_and_inputs_s']:.1f} s of every step"
        )
    for part in ("dpo", "groups"):
        if part in results and not failed(results[part]["tunix"]):
            t = results[part]["tunix"]
            ours = {layout: r["tokens_computed"] for layout, r in results[part]["aft_jax"].items() if not failed(r)}
            print(
                f"{part}: token positions through the model per step: aft_jax {ours}; Tunix {t['tokens_per_step']} "
                f"(2 x {t['pairs_per_micro_batch'] * t['micro_batches']} pairs x (prompt {t['prompt_length']} + "
                f"response {t['response_length']})), and as many again in its reference forward"
            )
    print(markdown(rows))
    print(f"on {machine.describe(summary['machine'])}; {summary['wall_s']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; medians reported")
    parser.add_argument("--questions", type=int, default=4, help="part groups: questions (K = 7) per step")
    parser.add_argument("--new-tokens", type=int, default=96, help="part sampling: new tokens per sample")
    parser.add_argument("--only", choices=PARTS, help="run one part (the parity check always runs)")
    parser.add_argument(
        "--tunix-python", default=os.environ.get("TUNIX_PYTHON", str(REPO.parent / "tunix-venv" / "bin" / "python")),
        help="python of the venv holding google-tunix (default: $TUNIX_PYTHON, else ../tunix-venv/bin/python)",
    )  # fmt: skip
    parser.add_argument(
        "--remat", default="full", choices=["none", "full"],
        help="train steps, both sides: aft_jax remat_policy, Tunix RematConfig DECODER (full) or NONE",
    )  # fmt: skip
    parser.add_argument("--tokens-per-row", type=int, default=1024, help="aft_jax packed and planned layouts")
    parser.add_argument(
        "--layouts", default=",".join(LAYOUTS), type=lambda v: [x for x in v.split(",") if x],
        help="aft_jax train layouts, comma-separated (default: padded,packed,planned)",
    )  # fmt: skip
    parser.add_argument(
        "--micro-pairs", type=int, default=2, help="part groups: Tunix's pairs per micro-batch (a divisor of 6)"
    )
    parser.add_argument(
        "--lr", type=float, default=1e-6,
        help="both sides' peak rate (the project's 2e-5 separates the 4 easy DPO pairs within two steps, its losses "
        "0.69, 0.046, 0.002, 0.0002 leaving little to compare)",
    )  # fmt: skip
    parser.add_argument("--checkpoint", help="HF folder (default: aft_jax.io.smollm2.smollm2_checkpoint())")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vs_tunix.json")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_jax_side(args)
        return
    if (6 * args.questions) % args.micro_pairs:
        parser.error("--micro-pairs must divide the 6 x --questions pairs")
    if not args.layouts or set(args.layouts) - set(LAYOUTS):
        parser.error(f"--layouts: a comma-separated subset of {','.join(LAYOUTS)}")

    from aft_jax.io.smollm2 import smollm2_checkpoint

    began = time.perf_counter()
    checkpoint = str(args.checkpoint or smollm2_checkpoint())
    parts = [args.only] if args.only else list(PARTS)
    here = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="vs_tunix_") as tmp:
        work_dir = Path(tmp)
        work = build_work(args, checkpoint)
        (work_dir / "work.json").write_text(json.dumps(work))
        common = ["--work", str(work_dir), "--repeats", str(args.repeats), "--remat", args.remat]
        ours = [sys.executable, str(here), *common, "--tokens-per-row", str(args.tokens_per_row)]
        theirs = [args.tunix_python, str(here.parent / "tunix_side.py"), *common]
        theirs += ["--micro-pairs", str(args.micro_pairs)]

        results = {"parity": {"aft_jax": run([*ours, "--side", "parity"], "aft_jax parity")}}
        results["parity"]["tunix"] = run([*theirs, "--part", "parity"], "Tunix parity")
        for side in ("aft_jax", "tunix"):
            if "error" in results["parity"][side]:
                raise SystemExit(f"the {side} side of the parity check failed: {results['parity'][side]}")
        results["parity"] |= parity_check(work_dir)
        tunix_traps = results["parity"]["tunix"].pop("traps")
        parity = results["parity"]
        print(
            f"parity: max |logit diff| {parity['max_abs_logit_diff']:.2e} over {parity['sequence_lengths']} tokens "
            f"(without the rope_theta patch: {parity['max_abs_logit_diff_without_rope_theta_patch']:.2f})",
            file=sys.stderr,
        )
        parity_failed = parity["max_abs_logit_diff"] > PARITY_TOLERANCE
        if not parity_failed:
            for part in parts:
                if part == "sampling":
                    results[part] = {"aft_jax": run([*ours, "--side", part], f"aft_jax {part}")}
                else:
                    results[part] = {"aft_jax": {}}
                    for layout in args.layouts:
                        side = run([*ours, "--side", f"{part}:{layout}"], f"aft_jax {part} {layout}")
                        results[part]["aft_jax"][layout] = side
                results[part]["tunix"] = run([*theirs, "--part", part], f"Tunix {part}")
                results[part]["tunix"].pop("traps", None)

    report(args, checkpoint, work, results, tunix_traps, parity_failed, began)


if __name__ == "__main__":
    main()
