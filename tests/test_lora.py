"""LoRA adapters and QLoRA's quantized base (`aft_jax.model.lora`, `aft_jax.model.adapters`) on tiny models
of every family (the configs of tests/hf_reference.py, weights drawn in NumPy): a new adapter leaves the logits bit-identical; an adapter's
forward (padded rows, packed rows, greedy decoding) equals that of its merged weights; the adapter
projection against NumPy; int8 and NF4 codes against NumPy transcriptions of their definitions (and NF4
against qwix where installed); QLoRA's logits against the float base. Training with adapters is in
test_lora_training."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import FAMILY_CONFIGS, TINY_CONFIGS, padded_batch

import aft_jax
from aft_jax.data.batches import EncodedGroup, collate_packed
from aft_jax.data.groups import Candidate
from aft_jax.model import families
from aft_jax.model import lora as lora_lib
from aft_jax.model.adapters import adapter_arrays, merge_adapters, with_adapters
from aft_jax.model.causal_lm import abstract_model
from aft_jax.model.config import LORA_TARGETS, LoraConfig
from aft_jax.parallel import sharding

VOCAB = 97  # hf_reference's tiny models
LORA = LoraConfig(rank=4, alpha=8.0)  # scale 2, so a scale dropped or inverted shows
NEW_TOKENS = 8
# target -> (module, weight, number of input axes), written out here rather than read from the code under test
WEIGHTS = {"q": ("attn", "q_proj", 1), "k": ("attn", "k_proj", 1), "v": ("attn", "v_proj", 1),
           "o": ("attn", "o_proj", 2), "gate": ("mlp", "gate_proj", 1), "up": ("mlp", "up_proj", 1),
           "down": ("mlp", "down_proj", 1)}  # fmt: skip
# bitsandbytes' NF4 table (QLoRA, appendix E), as published; checked below against its construction
NF4_TABLE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    np.float32,
)  # fmt: skip


def numpy_model(config, seed=0):
    """A model of `config` on one device with weights drawn in NumPy (no compiled initialiser): N(0, 0.2), the
    norms' scales U(0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    graphdef, abstract = nnx.split(abstract_model(config))
    shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, sharding.single_device_mesh()))

    def draw(path, leaf):
        norm = path[-1].key == "scale"
        value = rng.uniform(0.5, 1.5, leaf.shape) if norm else rng.normal(0, 0.2, leaf.shape)
        return value.astype(leaf.dtype)

    values = jax.tree.map_with_path(draw, nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, jax.device_put(values, shardings))
    return nnx.merge(graphdef, abstract)


def family_model(name, seed=0):
    """The tiny model of a family of tests/hf_reference.py (its config as `config_from_hf` reads it: 3 layers,
    hidden 32, head_dim 16 for Qwen3, windows, Qwen2's biases, Qwen3's q/k norms), without adapters."""
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, rms_norm_eps=1e-5,
                  max_position_embeddings=128)  # fmt: skip
    return numpy_model(families.config_from_hf({"model_type": "llama", **fields, **TINY_CONFIGS[name]}), seed)


@pytest.fixture(scope="module", params=FAMILY_CONFIGS)
def base(request):
    return family_model(request.param)


@nnx.jit
def logits_of(model, ids, mask):
    return model(ids, mask)


@nnx.jit
def packed_hidden_of(model, rows):
    return model.packed_hidden_states(*(rows[k] for k in ("input_ids", "positions", "segment_ids", "branch_ids")))


def base_weight(model, target) -> np.ndarray:
    module, name, _ = WEIGHTS[target]
    return np.asarray(getattr(getattr(model.layers, module), name)[...])


def random_adapters(model, lora, seed, b_std=0.05) -> dict:
    """`{target: (A [L, *in, r], B [L, r, *out])}` drawn in NumPy, B non-zero."""
    rng = np.random.default_rng(seed)
    out = {}
    for target in lora.targets:
        w = base_weight(model, target)
        n_in = WEIGHTS[target][2]
        ins, outs = w.shape[1 : 1 + n_in], w.shape[1 + n_in :]
        a = rng.uniform(-0.3, 0.3, (w.shape[0], *ins, lora.rank)).astype(np.float32)
        b = rng.normal(0, b_std, (w.shape[0], lora.rank, *outs)).astype(np.float32)
        out[target] = (jnp.asarray(a), jnp.asarray(b))
    return out


def prompts(seed, new_tokens=0):
    """Left-padded prompts of 11, 6, 9 and 3 tokens, followed by `new_tokens` masked columns."""
    ids, mask = padded_batch(np.random.default_rng(seed), VOCAB, [11, 6, 9, 3], "left")
    room = np.zeros((len(ids), new_tokens), ids.dtype)
    return np.concatenate([ids, room], axis=1), np.concatenate([mask, room], axis=1)


def packed_rows(seed, groups=4, group_size=3):
    """Packed rows (`collate_packed`) of random candidate groups: shared prompts and branches."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(groups):
        prompt = list(rng.integers(3, VOCAB, size=int(rng.integers(3, 8))))
        tokens = [prompt + list(rng.integers(3, VOCAB, size=int(rng.integers(2, 9)))) for _ in range(group_size)]
        encoded.append(EncodedGroup(tokens, [len(prompt)] * group_size, [Candidate("", True, 1)] * group_size))
    return collate_packed(encoded, group_size, tokens_per_row=32, pad_id=0, pad_multiple=16)


def greedy_by_forward(model, ids, mask, prompt_length, eos_ids):
    """Greedy continuations by the full forward (no cache): each new token is the argmax of the logits at
    the last filled column, written into the next masked one; `(tokens, lengths)`, stopped at EOS."""
    ids, mask = ids.copy(), mask.copy()
    for column in range(prompt_length, ids.shape[1]):
        ids[:, column] = np.argmax(np.asarray(logits_of(model, ids, mask))[:, column - 1], axis=-1)
        mask[:, column] = 1
    tokens = ids[:, prompt_length:]
    stops = [[i for i, t in enumerate(row) if t in eos_ids] for row in tokens]
    return tokens, np.array([s[0] + 1 if s else tokens.shape[1] for s in stops])


def assert_greedy_decoding_equals(model, merged, ids, mask):
    """`model`'s greedy tokens through the sampler (`JaxSampler.sample_ids`: the prefill, then the KV cache)
    equal `greedy_by_forward` of `merged`; returns the latter."""
    prompt_length = ids.shape[1] - NEW_TOKENS
    tokenizer = types.SimpleNamespace(eos_token_id=None, pad_token_id=0)  # the sampler reads only these
    sampler = aft_jax.JaxSampler(model, tokenizer)
    tokens, lengths = sampler.sample_ids(ids[:, :prompt_length], mask[:, :prompt_length], max_new_tokens=NEW_TOKENS)
    eos_ids = sampler.params(NEW_TOKENS).eos_ids
    want_tokens, want_lengths = greedy_by_forward(merged, ids, mask, prompt_length, eos_ids)
    np.testing.assert_array_equal(lengths, want_lengths)
    for row, n in enumerate(want_lengths):
        np.testing.assert_array_equal(np.asarray(tokens)[row, :n], want_tokens[row, :n])
    return want_tokens


# ------------------------------------------------------------------------------------------ forward


def test_a_new_adapter_leaves_the_logits_bit_identical(base):
    ids, mask = prompts(0, new_tokens=NEW_TOKENS)
    model = with_adapters(base, LORA, seed=3)
    arrays = adapter_arrays(model)
    assert sorted(arrays) == sorted(LORA_TARGETS)
    for target, (a, b) in arrays.items():
        assert not np.any(np.asarray(b)), target  # B = 0 ...
        assert np.all(np.asarray(a) != 0), target  # ... and A drawn
        np.testing.assert_array_equal(base_weight(model, target), base_weight(base, target))
    assert np.array_equal(np.asarray(logits_of(model, ids, mask)), np.asarray(logits_of(base, ids, mask)))


def test_the_adapter_forward_equals_the_merged_weights(base):
    """Padded rows, packed rows and greedy decoding: the model with adapters (non-zero B) against
    `merge_adapters`' model, whose projections are checked against `W + scale A B` in NumPy. The decoding
    is the sampler's (`JaxSampler.sample_ids`: prefill, then the KV cache), the reference the merged
    model's full forward, one token at a time."""
    adapters = random_adapters(base, LORA, seed=1)
    model = with_adapters(base, LORA, adapters=adapters)
    merged = merge_adapters(model)
    assert merged.config.lora is None and merged.config == base.config
    for target, (a, b) in adapters.items():
        w, n_layers = base_weight(base, target).astype(np.float64), len(a)
        delta = np.einsum("lir,lro->lio", np.asarray(a, np.float64).reshape(n_layers, -1, LORA.rank),
                          np.asarray(b, np.float64).reshape(n_layers, LORA.rank, -1))  # fmt: skip
        want = w + LORA.alpha / LORA.rank * delta.reshape(w.shape)
        np.testing.assert_allclose(base_weight(merged, target), want, rtol=0, atol=1e-6, err_msg=target)

    ids, mask = prompts(2, new_tokens=NEW_TOKENS)
    real = mask.astype(bool)
    logits = np.asarray(logits_of(model, ids, mask))
    assert np.abs(logits - np.asarray(logits_of(base, ids, mask)))[real].max() > 0.3, "the adapters change the logits"
    np.testing.assert_allclose(logits[real], np.asarray(logits_of(merged, ids, mask))[real], rtol=0, atol=1e-5)

    rows = packed_rows(3)
    used = rows["segment_ids"] > 0
    assert rows["branch_ids"].max() > 1, "rows hold several branches"
    got = np.asarray(packed_hidden_of(model, rows))[used]
    np.testing.assert_allclose(got, np.asarray(packed_hidden_of(merged, rows))[used], rtol=0, atol=1e-5)

    want_tokens = assert_greedy_decoding_equals(model, merged, ids, mask)
    base_tokens, _ = greedy_by_forward(base, ids, mask, ids.shape[1] - NEW_TOKENS, ())
    assert not np.array_equal(want_tokens, base_tokens), "the adapters change the greedy tokens"


def one_layer(model, layer):
    """Layer `layer` of the scanned stack as its own `Block` (no `layers` axis), as the scan's body sees it."""
    block_def, block_state = nnx.split(model.layers)
    return nnx.merge(block_def, jax.tree.map(lambda w: w[layer], block_state))


@nnx.jit
def projections(block, xs):
    """`project` of each target's input in `xs` through one layer's `block`."""
    return {t: lora_lib.project(getattr(block, WEIGHTS[t][0]), t, x, jnp.float32) for t, x in xs.items()}


@pytest.mark.parametrize("quantize", ["none", "int8", "nf4"])
def test_a_layer_equals_numpy(quantize):
    """The base `with_adapters` stores (int8, NF4: codes and scales as their NumPy transcriptions below give,
    each projection along its own input axes, o_proj's heads and head_dim), and `project` of each of the
    seven projections of one layer against `y = x W + (alpha / r) (x A) B` in NumPy (float64) from the
    arrays, W the NumPy-dequantized base. Head_dim 16 where hidden / heads is 8, intermediate 128 (two
    NF4 blocks along down_proj's input)."""
    cfg = aft_jax.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16)  # fmt: skip
    float_base = numpy_model(cfg, seed=5)
    lora = LoraConfig(rank=3, alpha=12.0, quantize=quantize)
    adapters = random_adapters(float_base, lora, seed=6, b_std=0.2)
    model = with_adapters(float_base, lora, adapters=adapters)
    layer, rng = 1, np.random.default_rng(7)
    xs, want = {}, {}
    for target, (module, name, n_in) in WEIGHTS.items():
        w = base_weight(float_base, target)
        group = getattr(model.layers, module)
        in_axes = tuple(range(1, 1 + n_in))
        if quantize != "none":
            reference = int8_reference(w, in_axes) if quantize == "int8" else nf4_reference(w, in_axes[-1])
            codes, scale, w = reference
            assert isinstance(getattr(group, name), lora_lib.QuantizedParam), target
            np.testing.assert_array_equal(np.asarray(getattr(group, name)[...]), codes, err_msg=target)
            np.testing.assert_array_max_ulp(np.asarray(getattr(group, name + "_scale")[...]), scale, maxulp=1)
        w = w[layer].astype(np.float64)
        a, b = (np.asarray(x[layer], np.float64) for x in adapters[target])
        x = rng.normal(size=(2, 5, *w.shape[:n_in])).astype(np.float32)
        x_flat = x.reshape(10, -1).astype(np.float64)
        y = x_flat @ w.reshape(x_flat.shape[1], -1)
        y += lora.alpha / lora.rank * (x_flat @ a.reshape(x_flat.shape[1], -1)) @ b.reshape(lora.rank, -1)
        xs[target], want[target] = jnp.asarray(x), y.reshape(2, 5, *w.shape[n_in:])
    got = projections(one_layer(model, layer), xs)
    for target in WEIGHTS:
        scale = np.abs(want[target]).max()
        np.testing.assert_allclose(got[target], want[target], rtol=0, atol=2e-6 * scale, err_msg=target)


# ------------------------------------------------------------------------------------------ quantization


def int8_reference(w, in_axes):
    """int8 per output channel: scale = absmax over the input axes / 127, codes = clip(round(w / scale))."""
    absmax = np.abs(w).max(axis=in_axes, keepdims=True)
    scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1))
    codes = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return codes, scale, codes.astype(np.float32) * scale


def nf4_block(n):
    """The largest power of two up to 64 that divides `n`."""
    return max(b for b in (1, 2, 4, 8, 16, 32, 64) if n % b == 0)


def nf4_reference(w, axis):
    """NF4 along input axis `axis`: blocks of the largest power of two <= 64 dividing its length, scale = the
    block's absmax, each weight the nearest table value of w / scale; codes packed two per byte along
    `axis`, the even position in the low nibble. `(packed codes, scales, dequantized weight)`."""
    v = np.moveaxis(w.astype(np.float32), axis, -1)
    n = v.shape[-1]
    block = nf4_block(n)
    blocks = v.reshape(*v.shape[:-1], n // block, block)
    absmax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = np.where(absmax > 0, absmax, np.float32(1))
    codes = np.abs((blocks / scale)[..., None] - NF4_TABLE).argmin(axis=-1)
    dequantized = (NF4_TABLE[codes] * scale).reshape(v.shape)
    codes = codes.reshape(v.shape)
    packed = (codes[..., 0::2] + 16 * codes[..., 1::2]).astype(np.uint8)
    return np.moveaxis(packed, -1, axis), np.moveaxis(scale[..., 0], -1, axis), np.moveaxis(dequantized, -1, axis)


# (shape, input axes): stacked layers first; a last input axis of 128 (two NF4 blocks of 64), of 96 (three
# of 32), and an `o_proj`-like weight with two input axes, the last of 8 (one block of 8)
SHAPES = [((2, 128, 6), (1,)), ((2, 96, 5), (1,)), ((2, 4, 8, 6), (1, 2))]
quantize_jit = jax.jit(lora_lib.quantize, static_argnums=(1, 2))
dequantize_jit = jax.jit(lora_lib.dequantize, static_argnums=(2, 3))


def weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=shape) * 0.05).astype(np.float32)  # heavy tails: scales vary across blocks
    w[0, ..., 0] = 0  # a zero output channel (and zero NF4 blocks)
    return w


@pytest.mark.parametrize("shape,in_axes", SHAPES)
def test_int8_equals_its_numpy_transcription(shape, in_axes):
    """Codes exactly; the scales to one unit in the last place: XLA divides by the constant 127 as a
    multiplication by its float32 reciprocal. Dequantized: codes times the stored scales, exactly, within
    half a step of the weight."""
    w = weights(shape)
    codes, scale = quantize_jit(jnp.asarray(w), in_axes, "int8")
    want_codes, want_scale, _ = int8_reference(w, in_axes)
    assert codes.dtype == jnp.int8 and np.abs(want_codes).max() == 127
    np.testing.assert_array_equal(np.asarray(codes), want_codes)
    scale = np.asarray(scale)
    np.testing.assert_array_max_ulp(scale, want_scale, maxulp=1)
    got_w = np.asarray(dequantize_jit(codes, jnp.asarray(scale), in_axes, jnp.float32))
    np.testing.assert_array_equal(got_w, want_codes.astype(np.float32) * scale)
    assert np.all(np.abs(got_w - w) <= 0.5 * scale * (1 + 1e-6))


def test_the_nf4_table_is_normal_quantiles():
    """NF4 (QLoRA, appendix E): 8 positive and 7 negative quantiles of N(0, 1) and an exact 0, scaled to
    [-1, 1]; the published float32 table equals the construction to float32 rounding."""
    from scipy.stats import norm

    offset = 0.9677083  # (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(NF4_TABLE, values / np.abs(values).max(), rtol=0, atol=2e-7)
    np.testing.assert_array_equal(lora_lib.NF4_CODE, NF4_TABLE)


@pytest.mark.parametrize("shape,in_axes", SHAPES)
def test_nf4_equals_its_numpy_transcription(shape, in_axes):
    w = weights(shape)
    axis = in_axes[-1]
    codes, scale = quantize_jit(jnp.asarray(w), in_axes, "nf4")
    want_codes, want_scale, want_w = nf4_reference(w, axis)
    assert codes.dtype == jnp.uint8 and codes.shape[axis] == shape[axis] // 2
    assert scale.shape[axis] == shape[axis] // nf4_block(shape[axis])
    np.testing.assert_array_equal(np.asarray(codes), want_codes)
    np.testing.assert_array_equal(np.asarray(scale), want_scale)
    assert set(np.unique(want_codes & 15)) > {0, 7, 15}, "codes span the table"
    np.testing.assert_array_equal(np.asarray(dequantize_jit(codes, scale, in_axes, jnp.float32)), want_w)


@pytest.mark.parametrize("shape,in_axes", SHAPES)
def test_nf4_equals_qwix(shape, in_axes):
    """qwix's NF4 (`qwix.quantize(w, "nf4")`: absmax scales per tile, nearest table value), tiles of the
    same size along the same axis, every other axis its own channel."""
    qwix = pytest.importorskip("qwix")
    w = weights(shape, seed=11)
    axis = in_axes[-1]
    channels = tuple(i for i in range(len(shape)) if i != axis)

    @jax.jit
    def by_qwix(w):
        return qwix.dequantize(
            qwix.quantize(w, "nf4", channelwise_axes=channels, tiled_axes={axis: nf4_block(shape[axis])})
        )

    got = np.asarray(dequantize_jit(*quantize_jit(jnp.asarray(w), in_axes, "nf4"), in_axes, jnp.float32))
    assert np.abs(got - w).max() > 1e-3, "a lossy quantization"
    np.testing.assert_array_equal(got, np.asarray(by_qwix(jnp.asarray(w))))


def test_qlora_logits_are_near_the_float_base_and_equal_its_dequantized_merge():
    """What quantizing the base costs, as the RMS logit error over the logits' standard deviation. Measured
    on the tiny models (3 layers, hidden 32, weights of std 0.2), 3 families x 3 seeds: 0.019 to 0.035 for
    int8 and 0.29 to 0.45 for NF4 (16 levels against 255: each weight's error is some 15 times larger),
    while an unrelated model of the same family is at 1.25 to 1.46. The bounds, 0.06 and 0.6, are about 1.5
    times the worst measured and well below an unrelated model's (a scale or a code in the wrong place);
    int8 must be at least 5 times closer (measured: 11 to 17). And with new adapters (B = 0) the QLoRA model
    computes its dequantized base, `merge_adapters`' model, to float32 rounding (1e-5)."""
    base = family_model("mistral_window")
    ids, mask = prompts(4, new_tokens=NEW_TOKENS)
    real = mask.astype(bool)
    want = np.asarray(logits_of(base, ids, mask))[real]
    errors = {}
    for quantize, bound in (("int8", 0.06), ("nf4", 0.6)):
        model = with_adapters(base, LoraConfig(rank=4, quantize=quantize), seed=0)
        got = np.asarray(logits_of(model, ids, mask))[real]
        errors[quantize] = np.sqrt(np.mean((got - want) ** 2)) / want.std()
        assert 0 < errors[quantize] <= bound, (quantize, errors[quantize])
        merged = np.asarray(logits_of(merge_adapters(model), ids, mask))[real]
        np.testing.assert_allclose(got, merged, rtol=0, atol=1e-5)
    assert 5 * errors["int8"] < errors["nf4"], errors


def test_greedy_decoding_of_a_qlora_model_equals_its_merged_forward():
    """A QLoRA model is sampled unmerged (`sampler_and_scorer` merges only a float base): the decode loop's
    per-layer copies of the NF4 codes and scales, and the adapters (B non-zero), against the merged model's
    full forward."""
    base = family_model("mistral_window")
    lora = LoraConfig(rank=4, alpha=8.0, quantize="nf4")
    model = with_adapters(base, lora, adapters=random_adapters(base, lora, seed=1))
    ids, mask = prompts(5, new_tokens=NEW_TOKENS)
    assert_greedy_decoding_equals(model, merge_adapters(model), ids, mask)
