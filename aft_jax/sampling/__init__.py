"""Sampling: the jitted KV-cache sampler."""
