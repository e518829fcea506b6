"""`aft-jax demo`: port the real SmolLM2-135M and let it score correct vs. corrupted GSM8K solutions.

For each question the reference solution and a copy whose final answer is off by one are scored with
`s(c)`, the mean completion log-probability; the demo reports how often the correct one ranks higher
(the pairwise assessment accuracy of AFT_METHOD section 6).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

_CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")


def _corrupt(solution: str) -> str:
    body, answer = solution.rsplit("#### ", 1)
    wrong = str(int(answer.strip().replace(",", "")) + 1)
    return f"{body}#### {wrong}"


def _encode(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, len(prompt_ids)


def run_demo(data_dir: str | None, num_questions: int = 8, batch_size: int = 4) -> dict:
    import aft_jax
    from aft_jax.scoring import sequence_scores
    from aft_jax.smollm2 import smollm2_checkpoint

    data_dir = Path(data_dir or os.environ.get("AFT_DATA_DIR", "data"))
    test_file = data_dir / "gsm8k" / "test.jsonl"
    if not test_file.is_file():
        raise SystemExit(f"{test_file}: not found; pass --data-dir or set AFT_DATA_DIR to the benchmark data folder")
    with test_file.open() as f:
        records = [json.loads(line) for _, line in zip(range(num_questions), f)]

    print(f"devices: {jax.devices()}")
    started = time.perf_counter()
    checkpoint = smollm2_checkpoint()
    model, tokenizer = aft_jax.from_pretrained(checkpoint)
    print(f"loaded SmolLM2-135M from {checkpoint} in {time.perf_counter() - started:.1f}s")

    sequences = []
    for record in records:
        prompt = f"Question: {record['question']}\nAnswer: "
        reference = _CALCULATOR_NOTE.sub("", record["answer"])
        sequences += [_encode(tokenizer, prompt, reference), _encode(tokenizer, prompt, _corrupt(reference))]
    width = max(len(ids) for ids, _ in sequences)
    ids = np.full((len(sequences), width), tokenizer.pad_token_id or 0, np.int32)
    attention = np.zeros_like(ids)
    completion = np.zeros_like(ids)
    for row, (tokens, prompt_len) in enumerate(sequences):
        ids[row, : len(tokens)] = tokens
        attention[row, : len(tokens)] = 1
        completion[row, prompt_len: len(tokens)] = 1

    score = jax.jit(lambda i, a, c: sequence_scores(model, i, a, c)[0])
    scores, started = [], time.perf_counter()
    for start in tqdm(range(0, len(sequences), batch_size), desc="scoring", unit="batch"):
        rows = slice(start, start + batch_size)
        scores.append(np.asarray(score(ids[rows], attention[rows], completion[rows])))
    elapsed = time.perf_counter() - started
    scores_pair = np.concatenate(scores).reshape(-1, 2)
    print(f"\n{'question':>8}  {'s(correct)':>10}  {'s(wrong)':>9}  ranked right")
    for k, (good, bad) in enumerate(scores_pair):
        print(f"{k:>8}  {good:>10.4f}  {bad:>9.4f}  {'yes' if good > bad else 'no'}")
    accuracy = float(np.mean(scores_pair[:, 0] > scores_pair[:, 1]))
    print(f"\nassessment accuracy {accuracy:.2%} over {len(records)} pairs; "
          f"{int(attention.sum()) / elapsed:,.0f} tokens/s scored (first batch includes compilation)")
    return {"assessment_accuracy": accuracy, "scores": scores_pair.tolist()}
