"""What a batch of candidate groups costs to compute in each layout, so that the packer can choose its rows'
length, and whether to pack at all (`packing.plan_rows`).

The estimate counts forward FLOPs: `per_token` for each token through the layers' projections and the LM
head (2 FLOPs a weight), `per_pair` for each query-key pair attention computes (q k^T and p v: 4 FLOPs per
head dimension, per head and layer), the latter weighted by what an attention FLOP costs on the backend
against a projection FLOP (`ATTENTION_FLOP_COST`). Dense attention (XLA's, cuDNN's) computes every pair of a
row, `rows x length^2`; the packed kernel (`model.attention = pallas`) only pairs within a piece, about the
sum of the pieces' squared lengths. The backward pass scales the same way, so it does not change the choice.
"""

from __future__ import annotations

from typing import NamedTuple

# An attention FLOP's cost in projection FLOPs. CPU: 4.6, measured by benchmarks/layout_cost.py on SmolLM2-135M's
# shapes on machine F (benchmarks/results/layout_cost_cpu.json; runs beside other load gave 4.1 to 5.2): XLA's
# attention is einsums, a masked float32 softmax and its gradient over [B, H, T, T], far below the matrix-product
# rate. GPU and TPU: 1, assumed (fused attention runs near the matrix-product rate), not measured.
ATTENTION_FLOP_COST = {"cpu": 4.6, "gpu": 1.0, "tpu": 1.0}


class LayoutCost(NamedTuple):
    """Forward FLOPs of one token through the projections and LM head (`per_token`) and of one attention pair
    (`per_pair`, backend-weighted); `sparse`: attention computes pairs within pieces only, not whole rows."""

    per_token: float
    per_pair: float
    sparse: bool = False


def layout_cost(config, backend: str, attention: str = "xla") -> LayoutCost:
    """The `LayoutCost` of a model (`aft_jax.model.config.ModelConfig`) on `backend` (`cpu`, `gpu`, `tpu`)
    whose packed rows' attention is `attention` (resolved: `xla`, `cudnn` or `pallas`)."""
    c = config
    attention_width = c.num_heads * c.head_dim
    per_layer = c.hidden_size * (2 * attention_width + 2 * c.num_kv_heads * c.head_dim) + 3 * c.hidden_size * (
        c.intermediate_size
    )
    per_token = 2.0 * (c.num_layers * per_layer + c.hidden_size * c.vocab_size)
    per_pair = 4.0 * attention_width * c.num_layers * ATTENTION_FLOP_COST.get(backend, 1.0)
    return LayoutCost(per_token, per_pair, sparse=attention == "pallas")


def packed_cost(cost: LayoutCost, rows: int, length: int, piece_lengths) -> float:
    """Packed rows `[rows, length]` holding pieces of `piece_lengths` tokens."""
    pairs = sum(n * n for n in piece_lengths) if cost.sparse else rows * length * length
    return cost.per_token * rows * length + cost.per_pair * pairs


def padded_cost(cost: LayoutCost, sequences: int, length: int) -> float:
    """The padded layout: `sequences` (B x K) sequences of `length` tokens."""
    return cost.per_token * sequences * length + cost.per_pair * sequences * length * length
