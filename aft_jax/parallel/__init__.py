"""Parallelism: meshes, the logical-axis rules, shardings and processes."""
