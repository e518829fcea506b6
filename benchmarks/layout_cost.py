"""The CPU constant of the packer's cost model (`aft_jax/data/layout_cost.py:ATTENTION_FLOP_COST`): what one
forward FLOP of XLA's dense attention costs against one of the projections, on this machine.

    .venv/bin/python benchmarks/layout_cost.py [--layers 4] [--tokens 3072] [--repeats 5]

A model with SmolLM2-135M's shapes (hidden 576, 9 heads of 64, 3 key/value heads, MLP 1536, vocabulary
49,152; fewer layers) runs forward and backward (the gradient of the mean log-sum-exp of the logits) over
packed rows of the same `--tokens` tokens cut into rows of 192, 384, 768 and 1536: the projections' work is
the same in each, the attention pairs grow with the row. The row lengths take turns in each repeat, so that
other load on the machine falls on all alike. A least-squares fit of the median times,
`t = a * projection FLOPs + b * attention FLOPs` (`layout_cost.layout_cost`'s counts with a weight of 1; the
projections' FLOPs are the same in every row length, so `b` is the slope over the attention FLOPs and `a` what
is left of the time), gives the weight `b / a`. Writes benchmarks/results/layout_cost_cpu.json with the machine (`machine.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import machine  # benchmarks/machine.py, beside this script

ROW_LENGTHS = (192, 384, 768, 1536)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import aft_jax
    from aft_jax.data.layout_cost import layout_cost

    config = aft_jax.ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=args.layers, num_heads=9,
        num_kv_heads=3, head_dim=64, tie_word_embeddings=True, attention="xla",
    )  # fmt: skip
    model = aft_jax.create_model(config)
    graphdef, params = nnx.split(model)
    unit = layout_cost(config, "cpu")
    per_pair = 4.0 * config.num_heads * config.head_dim * config.num_layers  # unweighted

    def loss(params, ids, positions, segments, branches):
        m = nnx.merge(graphdef, params)
        logits = m.logits(m.packed_hidden_states(ids, positions, segments, branches))
        return jax.nn.logsumexp(logits, axis=-1).mean()

    step = jax.jit(jax.value_and_grad(loss))
    inputs = {}
    for length in ROW_LENGTHS:
        rows = args.tokens // length
        ids = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (rows, length)), jnp.int32)
        positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), (rows, 1))
        ones = jnp.ones((rows, length), jnp.int32)
        inputs[length] = (params, ids, positions, ones, jnp.zeros_like(ones))  # one causal sequence per row
        jax.block_until_ready(step(*inputs[length]))  # compiles
    times = {length: [] for length in ROW_LENGTHS}
    for _ in range(args.repeats):  # interleaved, so that a load on the machine falls on every row length alike
        for length in ROW_LENGTHS:
            start = time.perf_counter()
            jax.block_until_ready(step(*inputs[length]))
            times[length].append(time.perf_counter() - start)
    rows_out = [
        {
            "row_length": length,
            "rows": args.tokens // length,
            "median_s": float(np.median(times[length])),
            "seconds": times[length],
            "projection_gflop": unit.per_token * args.tokens / 1e9,
            "attention_gflop": per_pair * args.tokens * length / 1e9,
        }
        for length in ROW_LENGTHS
    ]
    for row in rows_out:
        print(row, file=sys.stderr)
    design = np.array([[r["projection_gflop"], r["attention_gflop"]] for r in rows_out])
    times = np.array([r["median_s"] for r in rows_out])
    (a, b), *_ = np.linalg.lstsq(design, times, rcond=None)
    report = {
        "machine": machine.record(measure=False),
        "layers": args.layers,
        "tokens": args.tokens,
        "rows": rows_out,
        "seconds_per_projection_gflop": a,
        "seconds_per_attention_gflop": b,
        "attention_flop_cost": b / a,
    }
    out = Path(__file__).parent / "results" / "layout_cost_cpu.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"attention FLOP cost on this CPU: {b / a:.2f} projection FLOPs")


if __name__ == "__main__":
    main()
