"""The method: completion scores, every loss, and the training objective over candidate groups."""
