"""`aft-jax study`: the pipeline per seed, statistics over seeds and questions, the paper's claims."""
