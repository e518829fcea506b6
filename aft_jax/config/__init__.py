"""The run configuration: defaults, loading and overrides, the paper's presets."""
