"""The model: its configuration, the family registry (config.json both ways), layers, rotary embeddings, HF weight names."""
