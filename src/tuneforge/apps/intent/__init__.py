"""Customer-service intent engine: out-of-scope rejection, ambiguity, intents added from a few examples.

``fit_detector`` fits an out-of-scope detector on a trained run and writes it into the run directory
(``RUN/intent/``), where predict, evaluate, serve and the optimized variants read it
(:mod:`tuneforge.infer.openset`); ``add_intent``/``remove_intent`` change the intents it knows without
retraining; ``evaluate_open_set`` scores a labelled file that contains out-of-scope texts.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Loaded on first use: the CLI imports this package's ``commands`` to build its parser, and must not
# pay for torch and scikit-learn to print --help.
_EXPORTS = {
    "MIN_EXAMPLES": "added",
    "add_intent": "added",
    "remove_intent": "added",
    "DEFAULT_METHOD": "fit",
    "FitOptions": "fit",
    "fit_detector": "fit",
    "refit_like": "fit",
    "evaluate_open_set": "report",
    "open_set_metrics": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"tuneforge.apps.intent.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tuneforge.apps.intent' has no attribute {name!r}")
