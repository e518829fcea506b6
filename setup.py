from setuptools import find_packages, setup

GGUF = ["torch==2.13.0", "gguf>=0.10", "accelerate>=1.0"]
VERIFY = ["math-verify[antlr4_13_2]>=0.9,<0.10"]  # task.checker=math_verify
LM_EVAL = ["lm-eval>=0.4.9,<0.5"]  # `lm_eval --model aft_jax`
WANDB = ["wandb>=0.19"]  # log.wandb

setup(
    name="aft_jax",
    version="0.1.0",
    description="Alignment Fine-Tuning (AFT, arXiv 2309.02144) for Llama-family models in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["aft_jax", "aft_jax.*"]),
    install_requires=[
        "jax>=0.10,<0.12",
        "flax>=0.12,<0.14",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.0,<2",
        "numpy>=1.26",
        "ml_dtypes>=0.4",
        "safetensors>=0.4",
        "transformers>=4.46,<6",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "huggingface_hub>=0.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        "gguf": GGUF,
        "verify": VERIFY,
        "lm_eval": LM_EVAL,
        "wandb": WANDB,
        "test": GGUF + VERIFY + LM_EVAL + WANDB + ["pytest>=8", "pytest-xdist>=3.5", "peft>=0.18", "qwix==0.1.8"],
    },
    entry_points={"console_scripts": ["aft-jax=aft_jax.cli:main"]},
)
