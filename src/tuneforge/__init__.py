"""tuneforge: from a labelled text file to a fast, deployed transformer classifier."""

__version__ = "0.1.0"
