"""``tuneforge explain``: word-level attributions from the command line."""
