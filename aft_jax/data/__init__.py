"""Data: tasks (benchmarks, prompts, answer checking), candidate-group files, training batches."""
