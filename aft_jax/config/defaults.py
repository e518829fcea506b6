"""The run configuration's defaults as an (unlocked) ConfigDict, for presets to override.

Every section and key, its type, default and meaning is declared once, in the section dataclasses of
`aft_jax.config.spec` (`RunConfig`); this is the same as a ConfigDict (its keys' types are those of the
defaults: ml_collections rejects a preset's value of another type).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from aft_jax.config.spec import RunConfig


def default_config() -> ml_collections.ConfigDict:
    """`RunConfig()`'s defaults as a ConfigDict: `c.model.path`, `c.loss.beta`, ..."""
    return ml_collections.ConfigDict(dataclasses.asdict(RunConfig()))
