"""HTTP serving of a run directory: FastAPI app, dynamic batcher, metrics, playground page.

Never imports training code; the model is loaded through :mod:`tuneforge.infer`.
"""

from tuneforge.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> object:
    # Lazy: importing the package (e.g. for ServeSettings in the CLI) need not import FastAPI.
    if name == "create_app":
        from tuneforge.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'tuneforge.serve' has no attribute {name!r}")
