"""Applications built on the pipeline's stages (they use the stages; no stage imports them)."""
