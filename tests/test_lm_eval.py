"""aft_jax as an lm-eval model (`aft_jax.evals.lm_eval`) against lm-eval's transformers backend (`--model hf`,
float32 on the CPU) on one tiny random Llama over SmolLM2's real tokenizer, saved as a local HF folder, and
the local tasks of tests/data/lm_eval (GSM8K generation with gsm8k's filters, ECQA multiple choice, rolling
perplexity), offline."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytest.importorskip("lm_eval")

TASK_DIR = REPO / "tests" / "data" / "lm_eval"
TASKS = ["aft_tiny_gsm8k", "aft_tiny_ecqa", "aft_tiny_rolling"]
LIMIT = 4
MAX_LL_DIFF = 1e-4  # a (context, continuation) pair's summed log-prob
MAX_ROLLING_REL_DIFF = 1e-6  # a text's summed log-prob over hundreds of tokens, relative to its size


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_dir):
    """A 2-layer random Llama over SmolLM2's tokenizer (49,152 tokens; 128 positions, so the rolling texts take
    several windows), saved with the tokenizer as a HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("lm_eval") / "tiny"
    LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tiny_folder):
    """`(hf, ours)`: lm-eval's transformers backend and `AftJaxLM` on the tiny folder."""
    from lm_eval.models.huggingface import HFLM

    from aft_jax.evals.lm_eval import AftJaxLM

    hf = HFLM(pretrained=str(tiny_folder), dtype="float32", device="cpu", batch_size=4)
    return hf, AftJaxLM(path=str(tiny_folder), mesh="single", batch_size=4)


@pytest.fixture(scope="module")
def command(tiny_folder, tmp_path_factory):
    """`aft-jax lm-eval --model aft_jax ...` on the multiple-choice task (`--limit 2`), started
    at once in the background (most of its time is imports and lm-eval indexing its own tasks): `(process,
    output folder)`."""
    out = tmp_path_factory.mktemp("lm_eval_command")
    argv = [
        sys.executable, "-m", "aft_jax.cli", "lm-eval", "--model", "aft_jax",
        "--model_args", f"path={tiny_folder},mesh=single", "--tasks", "aft_tiny_ecqa",
        "--include_path", str(TASK_DIR), "--limit", "2", "--batch_size", "4", "--output_path", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process, out
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def evaluations(command, models, tiny_folder):
    """`lm_eval.simple_evaluate` of both backends on the local tasks (`LIMIT` documents each, samples logged);
    aft_jax by its registered name."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from aft_jax.evals.lm_eval import register

    register()
    tasks = TaskManager(include_path=str(TASK_DIR), include_defaults=False)  # lm-eval's own tasks: 10 s to index
    run = dict(tasks=TASKS, task_manager=tasks, limit=LIMIT, batch_size=4, log_samples=True, bootstrap_iters=0)
    with contextlib.chdir(REPO):  # the task files name their data relative to the repository root
        hf = lm_eval.simple_evaluate(model=models[0], **run)
        ours = lm_eval.simple_evaluate(model="aft_jax", model_args=f"path={tiny_folder},mesh=single", **run)
    return hf, ours


def _max_diffs(hf_samples, our_samples):
    """The largest |log-prob difference| and relative difference over the samples' responses; greedy flags
    (loglikelihood) must agree."""
    diff = rel = 0.0
    for a, b in zip(hf_samples, our_samples, strict=True):
        assert a["arguments"] == b["arguments"]
        for x, y in zip(a["resps"], b["resps"], strict=True):
            x, y = x[0], y[0]
            if isinstance(x, (list, tuple)):  # (log-prob, greedy)
                assert x[1] == y[1], (a["arguments"], x, y)
                x, y = x[0], y[0]
            diff, rel = max(diff, abs(x - y)), max(rel, abs(x - y) / max(1.0, abs(x)))
    return diff, rel


def test_greedy_generations_and_scores_equal_the_transformers_backend(evaluations):
    """Greedy GSM8K generations (the raw texts, cut at the stop strings, and both filters' answers) and the
    exact-match scores are identical."""
    hf, ours = evaluations
    task = "aft_tiny_gsm8k"
    assert len({s["doc_id"] for s in ours["samples"][task]}) == LIMIT
    for a, b in zip(hf["samples"][task], ours["samples"][task], strict=True):
        assert a["arguments"] == b["arguments"]
        assert a["resps"] == b["resps"] and a["filtered_resps"] == b["filtered_resps"]
        assert b["resps"][0][0].strip(), "an empty generation compares nothing"
    assert hf["results"][task] == ours["results"][task]
    assert ours["config"]["model"] == "aft_jax"


def test_log_likelihoods_agree_with_the_transformers_backend(evaluations, models):
    """Multiple choice: every option's log-prob within `MAX_LL_DIFF`, the same greedy flags, the same accuracy;
    rolling log-likelihoods of texts longer than the model's window within `MAX_ROLLING_REL_DIFF`."""
    hf, ours = evaluations
    diff, _ = _max_diffs(hf["samples"]["aft_tiny_ecqa"], ours["samples"]["aft_tiny_ecqa"])
    print(f"max |log-likelihood difference|, multiple choice: {diff:.3g}")
    assert diff <= MAX_LL_DIFF
    for metric in ("acc,none", "acc_norm,none"):
        assert hf["results"]["aft_tiny_ecqa"][metric] == ours["results"]["aft_tiny_ecqa"][metric]
    rolling_diff, rolling_rel = _max_diffs(hf["samples"]["aft_tiny_rolling"], ours["samples"]["aft_tiny_rolling"])
    print(f"rolling: max |difference| {rolling_diff:.3g}, relative {rolling_rel:.3g}")
    assert rolling_rel <= MAX_ROLLING_REL_DIFF
    lengths = [len(models[1].tok_encode(s["arguments"][0][0])) for s in ours["samples"]["aft_tiny_rolling"]]
    assert max(lengths) > 2 * models[1].max_length, "no text took several windows"


def _requests(kind, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in arguments]


def test_stop_strings_cut_the_text_as_the_transformers_backend_does(models, evaluations):
    """A stop string from the middle of a greedy GSM8K generation cuts it where the transformers backend does."""
    hf, ours = models
    samples = {s["doc_id"]: s for s in evaluations[1]["samples"]["aft_tiny_gsm8k"]}
    contexts = [samples[i]["arguments"][0][0] for i in sorted(samples)]
    greedy, full = samples[0]["arguments"][0][1], [samples[i]["resps"][0][0] for i in sorted(samples)]
    stop = full[0][len(full[0]) // 2 :][:3]
    cut = {**greedy, "until": [*greedy["until"], stop]}
    got = ours.generate_until(_requests("generate_until", [(c, cut) for c in contexts]))
    assert got == hf.generate_until(_requests("generate_until", [(c, cut) for c in contexts]))
    assert got[0] == full[0].split(stop)[0] and len(got[0]) < len(full[0])


def test_requests_pick_greedy_decoding_or_sampling(models, monkeypatch):
    """Greedy unless `do_sample` is true or (unset) the temperature is above 0, as lm-eval's backends read
    gen_kwargs; requests with the same settings are decoded together."""
    ours, calls = models[1], []

    def record(prompts, max_new_tokens, temperature, top_k, top_p, progress):
        calls.append((len(prompts), max_new_tokens, temperature, top_k, top_p))
        return ["an answer. Question: more"] * len(prompts)

    monkeypatch.setattr(ours, "_sample", record)
    settings = [
        {"until": ["Question:"], "do_sample": False, "temperature": 0.7, "max_gen_toks": 8},
        {"until": "Question:", "temperature": 0.0, "max_gen_toks": 8},
        {"until": ["Question:"], "temperature": 0.7, "top_p": 0.9, "max_gen_toks": 5},
        {"until": ["Question:"], "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_gen_toks": 5},
    ]
    assert ours.generate_until(_requests("generate_until", [("a", k) for k in settings])) == ["an answer. "] * 4
    assert sorted(calls) == [(2, 5, 0.7, 0, 0.9), (2, 8, 0.0, 0, 1.0)]


def test_model_folders_of_every_stage(models, tiny_folder, tmp_path):
    """An aft_jax model folder (Orbax, on an 8-device fsdp mesh) scores as its HF folder does; a PEFT LoRA
    adapter folder (base from its config, merged) scores as transformers with peft does."""
    import peft
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from aft_jax import cli
    from aft_jax.evals.lm_eval import AftJaxLM

    pairs = [("Question: Where do fish live?\nAnswer:", " in the sea"), ("The sky is", " blue"), ("", "Hello there")]
    hf, ours = models
    reference = ours.loglikelihood(_requests("loglikelihood", pairs))
    cli.main(["convert", "--to", "orbax", str(tiny_folder), str(tmp_path / "orbax")])
    orbax = AftJaxLM(path=str(tmp_path / "orbax"), mesh="1x-1x1", batch_size=4)
    assert orbax.mesh.devices.size == 8
    got = orbax.loglikelihood(_requests("loglikelihood", pairs))
    assert [g for _, g in got] == [g for _, g in reference]
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, reference)) <= 1e-5

    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_folder)
    peft.get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    adapter = AftJaxLM(path=str(tmp_path / "adapter"), mesh="single", batch_size=4)
    expected = HFLM(
        pretrained=str(tiny_folder), peft=str(tmp_path / "adapter"), dtype="float32", device="cpu", batch_size=4
    ).loglikelihood(_requests("loglikelihood", pairs))
    got = adapter.loglikelihood(_requests("loglikelihood", pairs))
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, expected)) <= MAX_LL_DIFF
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, reference)) > 1e-3, "the adapter changed nothing"


def test_the_command_registers_the_model(command):
    """`aft-jax lm-eval` (the same as `python -m aft_jax.evals.lm_eval`) is lm-eval's command line with `--model aft_jax` known."""
    process, out = command
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "aft_tiny_ecqa" in stdout and "acc" in stdout
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["config"]["model"] == "aft_jax" and results["results"]["aft_tiny_ecqa"]["acc,none"] >= 0
