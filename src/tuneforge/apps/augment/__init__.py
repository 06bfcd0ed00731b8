"""``tuneforge augment``: the command line over :mod:`tuneforge.augment` (which training uses inline too)."""
