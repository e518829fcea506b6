"""Evaluation with outside harnesses: `aft_jax.evals.lm_eval` runs a model of any stage as an `lm-eval` model."""
