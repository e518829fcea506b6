"""The attention work the block-sparse packed kernel (`aft_jax/model/packed_attention.py`) skips, counted on real
GSM8K candidate groups, without a TPU: nothing here is timed.

    .venv/bin/python benchmarks/packed_attention_work.py [--questions 256] [--block 128]

Groups as in `group_step_layouts.py` (a GSM8K training question with the Alpaca prompt, its reference chain of
thought and six other questions' references, K = 7, lengths by SmolLM2's tokenizer), packed into rows of 1024,
2048 and 4096 tokens by the project's packer. For each row length it counts the `block x block` score tiles of
every row: all of them (what XLA's dense attention computes, with the `[T, T]` mask), those on or below the
diagonal (a causal flash kernel, such as splash attention with a causal mask), and those the kernel visits
(`packed_blocks.tile_visibility`, at least one visible pair), with the share of visible pairs (the floor for
any tile size). Then, for the attention of a 7B Llama (32 heads of 128; the same for Qwen2.5-7B's 28 x 128
within 15%), the matrix-product FLOPs per row and layer (forward: q k^T and p v, 4 T^2 H Dh dense; the backward
scales the same way), their share of a layer's forward FLOPs (with the projections, 2 FLOPs per weight and
token), and the bytes of float32 scores `[H, T, T]` per row and layer XLA materialises that the
kernel does not (it keeps a `[H, T]` log-sum-exp). Finally it turns those into the estimate of what the kernel
would free per device for the packed 7B rows of the memory plan (docs/models.md): rows per device and
micro-batch times one layer's scores, the floor of the attention temporaries of a step whose attention
products are recomputed (`dots_no_batch`). Writes benchmarks/results/packed_attention_work.json with the
machine (`machine.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import machine  # benchmarks/machine.py, beside this script

REPO = Path(__file__).resolve().parents[1]
ROW_LENGTHS = (1024, 2048, 4096)
HEADS, HEAD_DIM, LAYERS, HIDDEN, MLP = 32, 128, 32, 4096, 11008  # Llama-2 7B
PROJECTION_PARAMS = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP)  # the layers' matrices: 2 FLOPs each a token
# the packed 7B rows of the memory plan (benchmarks/results/memory_plan.json): slice, devices, micro-batches
PLAN_ROWS = (("v4-32", 16, 4), ("v5e-64", 64, 1), ("v5p-64", 32, 1))
PLAN_TOKENS_PER_STEP, PLAN_ROW_LENGTH = 106_496, 1024


def count(packed: dict, block: int) -> dict:
    import jax
    import jax.numpy as jnp

    from aft_jax.model.attention import packed_mask
    from aft_jax.model.packed_blocks import NO_WINDOW, tile_visibility

    ids = [jnp.asarray(packed[k]) for k in ("segment_ids", "branch_ids", "positions")]
    rows, t = ids[0].shape
    tiles = t // block
    visible = jax.jit(tile_visibility, static_argnums=(4, 5))(*ids, NO_WINDOW, block, block)
    pairs = sum(int(packed_mask(ids[0][r : r + 1], ids[1][r : r + 1]).sum()) for r in range(rows))
    dense = rows * tiles * tiles
    kernel = int(visible.sum())
    flops_dense = 4 * t * t * HEADS * HEAD_DIM
    flops_projections = 2 * PROJECTION_PARAMS * t / LAYERS  # per row and layer
    return {
        "rows": rows,
        "row_length": t,
        "real_tokens": int((packed["segment_ids"] > 0).sum()),
        "tiles_dense": dense,
        "tiles_causal": rows * tiles * (tiles + 1) // 2,
        "tiles_kernel": kernel,
        "share_kernel_of_dense": kernel / dense,
        "share_kernel_of_causal": kernel / (rows * tiles * (tiles + 1) // 2),
        "share_visible_pairs": pairs / (rows * t * t),
        "forward_gflop_per_row_layer_dense": flops_dense / 1e9,
        "forward_gflop_per_row_layer_kernel": flops_dense * kernel / dense / 1e9,
        "attention_share_of_layer_forward_dense": flops_dense / (flops_dense + flops_projections),
        "attention_share_of_layer_forward_kernel": flops_dense
        * kernel
        / dense
        / (flops_dense * kernel / dense + flops_projections),
        "score_mib_per_row_layer_dense": HEADS * t * t * 4 / 2**20,
        "lse_mib_per_row_layer_kernel": HEADS * t * 4 / 2**20,
    }


def plan_estimate(at_1024: dict) -> list[dict]:
    """What the kernel would free per device for the memory plan's packed 7B rows (an estimate)."""
    rows_per_step = PLAN_TOKENS_PER_STEP // PLAN_ROW_LENGTH
    out = []
    for slice_name, devices, micro_batches in PLAN_ROWS:
        rows = rows_per_step / devices / micro_batches
        freed = rows * (at_1024["score_mib_per_row_layer_dense"] - at_1024["lse_mib_per_row_layer_kernel"])
        out.append({"slice": slice_name, "rows_per_device_micro_batch": rows, "freed_mib_estimate": freed})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if not os.environ.get("AFT_DATA_DIR") and (REPO.parent / "shared" / "data").is_dir():
        os.environ["AFT_DATA_DIR"] = str(REPO.parent / "shared" / "data")  # as the tests find GSM8K
    from group_step_layouts import PAD_MULTIPLE, K, encoded_groups

    from aft_jax.data.batches import collate_packed
    from aft_jax.io.smollm2 import smollm2_checkpoint

    groups, pad_id = encoded_groups(str(smollm2_checkpoint()), args.questions)
    results = []
    for length in ROW_LENGTHS:
        packed = collate_packed(groups, K, tokens_per_row=length, pad_id=pad_id, pad_multiple=PAD_MULTIPLE)
        results.append(count(packed, args.block))
        r = results[-1]
        print(
            f"{length}-token rows ({r['rows']}): kernel {r['share_kernel_of_dense']:.1%} of dense tiles, "
            f"{r['share_kernel_of_causal']:.1%} of causal; visible pairs {r['share_visible_pairs']:.1%}",
            file=sys.stderr,
        )
    report = {
        "machine": machine.record(measure=False),
        "questions": args.questions,
        "group_size": K,
        "block": args.block,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "rows": results,
        "memory_plan_7b_packed": plan_estimate(results[0]),
    }
    out = Path(__file__).parent / "results" / "packed_attention_work.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "| row | rows | score tiles: dense | causal | kernel | kernel / dense | kernel / causal | visible pairs "
        "| fwd GFLOP per row and layer: dense | kernel | attention / layer FLOPs: dense | kernel "
        "| f32 scores per row and layer (not materialised) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['row_length']} | {r['rows']} | {r['tiles_dense']:,} | {r['tiles_causal']:,} | {r['tiles_kernel']:,} "
            f"| {r['share_kernel_of_dense']:.1%} | {r['share_kernel_of_causal']:.1%} | {r['share_visible_pairs']:.1%} "
            f"| {r['forward_gflop_per_row_layer_dense']:.1f} | {r['forward_gflop_per_row_layer_kernel']:.1f} "
            f"| {r['attention_share_of_layer_forward_dense']:.1%} | {r['attention_share_of_layer_forward_kernel']:.1%} "
            f"| {r['score_mib_per_row_layer_dense']:.0f} MiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
