"""The model: the Llama configuration and its config.json mapping, layers, rotary embeddings, HF weight names."""
