"""LoRA adapters as Hugging Face PEFT folders, against `peft` and `transformers` (torch, float32) on tiny random
checkpoints of each family: aft_jax's adapter loads in `peft.PeftModel` with the same logits, PEFT's own
folder loads in aft_jax with them, the merged export loads in transformers with them (also through
`aft-jax convert`), and a folder aft_jax cannot read is refused naming the file and the key or tensor."""

import json
import re

import numpy as np
import peft
import pytest
import torch
from hf_reference import FAMILY_CONFIGS, hf_logits, padded_batch, save_tiny
from safetensors.numpy import load_file, save_file

import aft_jax
from aft_jax import cli
from aft_jax.io.hf_files import CheckpointError
from aft_jax.io.peft import CONFIG_FILE, HF_MODULES, WEIGHTS_FILE, read_adapter, save_adapter, tensor_names
from aft_jax.model.adapters import with_adapters
from aft_jax.model.config import LORA_TARGETS, LoraConfig
from aft_jax.model.lora import PROJECTIONS

FAMILIES = ["llama3_rope", *FAMILY_CONFIGS]  # llama, qwen2, qwen3, mistral
SUBSET = ("q", "v")


def _modules(targets) -> list[str]:
    return [HF_MODULES[t].split(".")[-1] for t in targets]


def _batch():
    return padded_batch(np.random.default_rng(3), 97, [9, 6, 4], "left")


def _max_error(got, expected, mask) -> float:
    real = mask.astype(bool)
    return float(np.max(np.abs(np.asarray(got)[real] - expected[real])))


def _random_lora(base, targets, seed: int = 0):
    """`base` with rank-4 adapters on `targets` whose `A` and `B` are random (non-zero `B`: not a no-op)."""
    lora = LoraConfig(rank=4, alpha=8.0, targets=tuple(targets))
    rng = np.random.default_rng(seed)
    adapters = {}
    for target in targets:
        module, name, n_in, _ = PROJECTIONS[target]
        w = getattr(getattr(base.layers, module), name)[...].shape  # [L, *in, *out]
        shapes = (*w[: 1 + n_in], lora.rank), (w[0], lora.rank, *w[1 + n_in :])
        adapters[target] = tuple(rng.normal(0.0, 0.2, shape).astype(np.float32) for shape in shapes)
    return with_adapters(base, lora, adapters=adapters)


def _peft_folder(hf_model, folder, targets, seed: int = 1):
    """A PEFT folder of `hf_model` (wrapped in place) with random rank-4 adapters on `targets`; the PeftModel."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=_modules(targets), init_lora_weights=False)
    peft_model = peft.get_peft_model(hf_model, config).eval()
    peft_model.save_pretrained(folder)
    return peft_model


@pytest.mark.parametrize("targets", [LORA_TARGETS, SUBSET], ids=["all", "q_v"])
@pytest.mark.parametrize("name", FAMILIES)
def test_exported_adapter_loads_in_peft(tmp_path, name, targets):
    hf_model = save_tiny(name, tmp_path / "base")
    base, _ = aft_jax.from_pretrained(tmp_path / "base")
    model = _random_lora(base, targets)
    save_adapter(model, tmp_path / "adapter", base_name=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    ids, mask = _batch()
    expected = hf_logits(peft_model, ids, mask)
    assert _max_error(base(ids, mask), expected, mask) > 0.1, "the adapters change the logits"
    assert _max_error(model(ids, mask), expected, mask) <= 1e-4


@pytest.mark.parametrize("targets", [LORA_TARGETS, SUBSET], ids=["all", "q_v"])
@pytest.mark.parametrize("name", FAMILIES)
def test_peft_adapter_loads_in_aft_jax(tmp_path, name, targets):
    peft_model = _peft_folder(save_tiny(name, tmp_path / "base"), tmp_path / "adapter", targets)
    base, _ = aft_jax.from_pretrained(tmp_path / "base")
    lora, adapters = read_adapter(tmp_path / "adapter", base.config)
    assert lora == LoraConfig(rank=4, alpha=8.0, targets=tuple(targets)) and sorted(adapters) == sorted(targets)
    model = with_adapters(base, lora, adapters=adapters)
    ids, mask = _batch()
    expected = hf_logits(peft_model, ids, mask)
    assert _max_error(base(ids, mask), expected, mask) > 0.1, "the adapters change the logits"
    assert _max_error(model(ids, mask), expected, mask) <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_export_loads_in_transformers(tmp_path, name):
    from transformers import AutoModelForCausalLM

    hf_model = save_tiny(name, tmp_path / "base")
    base, _ = aft_jax.from_pretrained(tmp_path / "base")
    model = _random_lora(base, LORA_TARGETS, seed=2)
    save_adapter(model, tmp_path / "adapter")
    aft_jax.save_pretrained(model, None, tmp_path / "merged")
    assert not (tmp_path / "merged" / CONFIG_FILE).exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    ids, mask = _batch()
    assert _max_error(hf_logits(merged, ids, mask), hf_logits(peft_model, ids, mask), mask) <= 1e-4


def test_convert_cli_merges_an_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    peft_model = _peft_folder(save_tiny("qwen2_window", tmp_path / "base"), tmp_path / "adapter", LORA_TARGETS)
    cli.main(
        ["convert", "--to", "hf", "--base", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "hf")]
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not (tmp_path / "hf" / CONFIG_FILE).exists() and not (tmp_path / "hf" / WEIGHTS_FILE).exists()
    ids, mask = _batch()
    assert _max_error(hf_logits(merged, ids, mask), hf_logits(peft_model, ids, mask), mask) <= 1e-4


def test_convert_cli_copies_an_adapter_with_its_base(tmp_path):
    """`--to peft` reads the adapter's base from its config when no --base is given; the copy is the same."""
    save_tiny("mistral_window", tmp_path / "base")
    base, _ = aft_jax.from_pretrained(tmp_path / "base")
    save_adapter(_random_lora(base, SUBSET), tmp_path / "adapter", base_name=str(tmp_path / "base"))
    cli.main(["convert", "--to", "peft", str(tmp_path / "adapter"), str(tmp_path / "copy")])
    src, out = load_file(tmp_path / "adapter" / WEIGHTS_FILE), load_file(tmp_path / "copy" / WEIGHTS_FILE)
    assert sorted(src) == sorted(out)
    for key in src:
        np.testing.assert_array_equal(src[key], out[key], err_msg=key)
    assert json.loads((tmp_path / "copy" / CONFIG_FILE).read_text()) == json.loads(
        (tmp_path / "adapter" / CONFIG_FILE).read_text()
    )


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--to", "peft", "{base}", "{out}"], r"--to peft: .*base is a full model, which has no adapters"),
        (["--to", "orbax", "{adapter}", "{out}"], r"--to orbax: .*adapter is a PEFT adapter folder; .*--to hf"),
        (["--to", "hf", "--base", "{adapter}", "{base}", "{out}"], r"--base=.*: --base names an adapter's base"),
    ],
    ids=["peft_from_full_model", "orbax_from_adapter", "base_without_adapter"],
)
def test_convert_cli_refuses_a_mismatched_source(tmp_path, capsys, args, pattern):
    save_tiny("gqa_tied", tmp_path / "base")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / CONFIG_FILE).write_text("{}")
    folders = {"base": tmp_path / "base", "adapter": tmp_path / "adapter", "out": tmp_path / "out"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", *(a.format(**folders) for a in args)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def peft_adapter(tmp_path):
    """A PEFT folder (rank 4 on q, v) and the aft_jax config of its base."""
    _peft_folder(save_tiny("gqa_tied", tmp_path / "base"), tmp_path / "adapter", SUBSET)
    base, _ = aft_jax.from_pretrained(tmp_path / "base")
    return tmp_path / "adapter", base.config


@pytest.mark.parametrize("key", ["use_dora", "lora_bias"])
def test_a_lora_variant_is_refused(peft_adapter, key):
    folder, config = peft_adapter
    raw = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps(raw | {key: True}))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(folder / CONFIG_FILE))}: {key}=True is not supported"):
        read_adapter(folder, config)


def test_a_tensor_of_no_adapter_is_refused(peft_adapter):
    """A folder whose config hides a variant (here LoRA biases) is caught by its extra tensors."""
    folder, config = peft_adapter
    tensors = load_file(folder / WEIGHTS_FILE)
    name = tensor_names("q", 0)[1].replace(".weight", ".bias")
    save_file(tensors | {name: np.ones(32, np.float32)}, folder / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(folder / WEIGHTS_FILE))}: tensor '{re.escape(name)}'"):
        read_adapter(folder, config)


def test_tensor_of_the_wrong_rank_is_refused(peft_adapter):
    folder, config = peft_adapter
    tensors = load_file(folder / WEIGHTS_FILE)
    name = tensor_names("v", 1)[1]
    tensors[name] = tensors[name][:, :3].copy()  # lora_B [out, 3] in a rank-4 adapter
    save_file(tensors, folder / WEIGHTS_FILE)
    with pytest.raises(CheckpointError) as err:
        read_adapter(folder, config)
    message = str(err.value)
    assert message.startswith(f"{folder / WEIGHTS_FILE}: tensor {name!r} has shape"), message
    assert "[16, 3]" in message and "[16, 4]" in message, message
