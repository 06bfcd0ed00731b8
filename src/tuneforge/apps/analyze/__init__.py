"""Error analysis and label errors: ``tuneforge analyze RUN --data FILE`` (issue 17)."""

from tuneforge.apps.analyze.analysis import Analysis, AnalyzeOptions, analyze

__all__ = ["Analysis", "AnalyzeOptions", "analyze"]
