"""Step 2 of AFT: sample k chains of thought per training question, drop duplicates, label them, add
the reference, score every candidate with the sampling model, and write the groups file in shards.

Shard `i` holds questions `[i * shard_size, (i + 1) * shard_size)` and is sampled with its own seed, so
it depends on nothing else: each is written to a temporary file and renamed when complete, and an
interrupted run restarts at the first missing shard, never duplicating or losing a group. With several
processes, process `p` samples shards `p, p + P, ...` with its own model copy (on its own devices) into
the shared output folder; the groups file is the shards read in order, the same as with one process.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import jax
import numpy as np
from tqdm import tqdm

from aft_jax.data.groups import Candidate, Group, read_groups
from aft_jax.data.tasks import Example, Task
from aft_jax.io.paths import Path, write_atomically
from aft_jax.parallel.sharding import is_main_process, sync
from aft_jax.sampling.sampler import Sampler
from aft_jax.stages.score import Scorer

if TYPE_CHECKING:
    from aft_jax.config.spec import SampleSection


def normalise(text: str) -> str:
    return " ".join(text.split())


def label_group(task: Task, example: Example, prompt: str, samples: list[str]) -> tuple[Group, int]:
    """The reference first (a positive; none when the example has no reference, `target` ""), then each
    distinct sample labelled; returns the group and the number of samples dropped as duplicates (of the
    reference or of each other)."""
    seen, candidates = set(), []
    if example.target:
        seen.add(normalise(example.target))
        candidates.append(
            Candidate(example.target, correct=True, level=task.level(example.target, example), reference=True)
        )
    duplicates = 0
    for text in samples:
        key = normalise(text)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        candidates.append(
            Candidate(text, correct=task.is_correct(text, example.answer), level=task.level(text, example))
        )
    return Group(example.id, prompt, example.answer, tuple(candidates)), duplicates


def accepted_references(groups: list[Group]) -> tuple[list[Group], list[str]]:
    """STaR-style VFT data for a task without references: for each group, its first sampled candidate that
    the answer checker accepted, as the group's one (reference) candidate; and the ids of the groups with
    none, which are dropped."""
    kept, dropped = [], []
    for group in groups:
        accepted = next((c for c in group.candidates if c.correct and not c.reference), None)
        if accepted is None:
            dropped.append(group.id)
            continue
        reference = Candidate(accepted.text, correct=True, level=accepted.level, reference=True)
        kept.append(Group(group.id, group.prompt, group.answer, (reference,)))
    return kept, dropped


def group_statistics(groups: list[Group], duplicates: int, samples: int) -> dict:
    positives = [sum(c.correct for c in g.candidates) for g in groups]
    negatives = [sum(not c.correct for c in g.candidates) for g in groups]
    sampled = [c for g in groups for c in g.candidates if not c.reference]
    return {
        "groups": len(groups),
        "positives_per_group": float(np.mean(positives)) if groups else 0.0,
        "negatives_per_group": float(np.mean(negatives)) if groups else 0.0,
        "groups_with_both": float(np.mean([p > 0 and n > 0 for p, n in zip(positives, negatives)])) if groups else 0.0,
        "groups_without_signal": (
            float(np.mean([len({c.level for c in g.candidates}) < 2 for g in groups])) if groups else 0.0
        ),  # every candidate at one level: no pair to rank
        "sample_accuracy": float(np.mean([c.correct for c in sampled])) if sampled else 0.0,
        "duplicate_rate": duplicates / samples if samples else 0.0,
    }


def sample_candidates(
    sampler: Sampler,
    scorer: Scorer,
    task: Task,
    examples: list[Example],
    out_dir: str | Path,
    *,
    settings: SampleSection,
    template: str,
    seed: int,
    stop_after_shards: int | None = None,
) -> Path:
    """Writes `<out_dir>/shard-NNNNN.jsonl` (with a `.meta.json` of its counts and timing) for every shard
    of `examples` (questions of `task`) not yet complete, then `stats.json`; returns `out_dir`.
    `sampler` generates the candidates and `scorer` scores them (its tokenizer formats the prompts, in
    `template`); `settings` is the `sample` section (k, temperature, top_k, top_p, max_new_tokens,
    shard_size), and shard `i` is sampled with seed `seed * 1_000_003 + i`. `stop_after_shards` ends the
    run early (as an interruption would) after that many new shards. With several processes each samples
    its share of the shards (`sampler` and `scorer` are its own, on local devices) and process 0 writes
    `stats.json` once every shard is there."""
    tokenizer, s = scorer.tokenizer, settings
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_count = -(-len(examples) // s.shard_size)
    written = 0
    mine = range(jax.process_index(), shard_count, jax.process_count())
    bar = tqdm(total=len(mine), desc=f"sampling {task.name} (k={s.k})", unit="shard", disable=not is_main_process())
    for shard in mine:
        path = out_dir / f"shard-{shard:05d}.jsonl"
        if path.exists():
            bar.update(1)
            continue
        if stop_after_shards is not None and written >= stop_after_shards:
            break
        chunk = examples[shard * s.shard_size : (shard + 1) * s.shard_size]
        prompts = [task.prompt(e, template, tokenizer) for e in chunk]
        began = time.perf_counter()
        samples = sampler.sample(
            prompts,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            num_samples=s.k,
            seed=seed * 1_000_003 + shard,
        )
        seconds = time.perf_counter() - began
        tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for row in samples for t in row)
        labelled = [label_group(task, e, p, row) for e, p, row in zip(chunk, prompts, samples)]
        groups = scorer.score([g for g, _ in labelled])
        meta = {
            "duplicates": sum(d for _, d in labelled),
            "samples": len(chunk) * s.k,
            "generated_tokens": tokens,
            "seconds": seconds,
            "process": jax.process_index(),
        }
        write_atomically(path.with_suffix(".meta.json"), json.dumps(meta) + "\n")  # before its shard
        write_atomically(path, "".join(g.to_json() + "\n" for g in groups))
        written += 1
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / seconds:,.0f}")
    bar.close()
    sync("sampled")
    if is_main_process() and all((out_dir / f"shard-{i:05d}.jsonl").exists() for i in range(shard_count)):
        write_statistics(out_dir)
    sync("sampling statistics")
    return out_dir


def write_statistics(out_dir: Path) -> dict:
    """Positives per group, share of groups with both labels, duplicate rate, sampling tokens/s."""
    groups = read_groups(out_dir)
    progress = {p.name: json.loads(p.read_text()) for p in sorted(out_dir.glob("shard-*.meta.json"))}
    duplicates = sum(p["duplicates"] for p in progress.values())
    samples = sum(p["samples"] for p in progress.values())
    stats = group_statistics(groups, duplicates, samples)
    seconds = sum(p["seconds"] for p in progress.values())
    stats["generated_tokens_per_s"] = (
        sum(p["generated_tokens"] for p in progress.values()) / seconds if seconds else 0.0
    )
    write_atomically(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")  # marks sampling complete
    print("groups: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
    return stats
