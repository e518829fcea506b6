"""Files: Hugging Face folders, Orbax model folders and checkpoints, run-directory paths, metrics logs."""
