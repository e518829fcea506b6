"""A small byte-level BPE tokenizer trained on a task's own text (for models trained from scratch).

Digits are split one by one, so numbers of any size use the same ten symbols; byte-level pre-tokenization
makes decoding exact. The result is a `transformers.PreTrainedTokenizerFast` saved to a folder.
"""

from __future__ import annotations

from aft_jax.io.paths import Path, staged_dir

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
MIN_VOCAB_SIZE = 256 + len(SPECIAL)  # the byte alphabet and the special tokens


def train_task_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int):
    """Trains, saves to `out_dir` and returns the tokenizer of at most `vocab_size` tokens (exactly that many
    when the texts allow enough merges; deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id(SPECIAL["bos_token"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos_token']} $A", special_tokens=[(SPECIAL["bos_token"], bos)]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL)
    with staged_dir(out_dir) as local:
        wrapped.save_pretrained(local)
    return wrapped
