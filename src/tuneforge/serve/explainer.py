"""Explanations share the model with classification, never at its expense.

An occlusion explanation of an n-word text is n + 1 texts for the model. They go through the same
:class:`~tuneforge.serve.batcher.DynamicBatcher` as classification (one model thread: an explanation
never competes with a classification batch for the cores), but in chunks of at most ``chunk`` texts,
one chunk at a time, from at most ``in_flight`` explanations at once. A classification request that
arrives meanwhile joins the next batch beside at most one chunk, so an explanation adds a bounded
amount to classification latency however long its text and however many explanations are asked for.
Explanations beyond ``in_flight`` wait, up to ``waiting`` of them; more are refused at once
(:class:`ExplainBusyError`: the route answers 503 + Retry-After, as a full classification queue does).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from tuneforge.serve.batcher import DynamicBatcher, InferenceTimeoutError, QueueTimeoutError

# Texts of one explanation per model call: a classification batch carries at most this many of them.
EXPLAIN_CHUNK = 8
# Explanations in the model at once, and waiting for their turn: what 8 clients asking together need.
EXPLAIN_IN_FLIGHT = 1
EXPLAIN_WAITING = 8


class ExplainBusyError(Exception):
    """As many explanations as allowed are running or waiting; try again shortly."""


class ExplainLane:
    """Admits explanations, at most ``in_flight`` at a time in the model and ``waiting`` more in line."""

    def __init__(
        self, *, in_flight: int = EXPLAIN_IN_FLIGHT, waiting: int = EXPLAIN_WAITING, chunk: int = EXPLAIN_CHUNK
    ) -> None:
        if in_flight < 1 or waiting < 0 or chunk < 1:
            raise ValueError("in_flight and chunk must be >= 1 and waiting >= 0")
        self.in_flight = in_flight
        self.waiting = waiting
        self.chunk = chunk
        self._slots = asyncio.Semaphore(in_flight)
        self._admitted = 0  # running and waiting

    @property
    def admitted(self) -> int:
        return self._admitted

    async def probabilities(self, batcher: DynamicBatcher, texts: list[str], *, timeout_s: float) -> np.ndarray:
        """The model's probabilities for ``texts`` (rows in order), computed chunk by chunk.

        ``timeout_s``: the deadline for the whole explanation, its wait for a turn included; past it this
        raises the batcher's :class:`QueueTimeoutError` (still waiting) or ``InferenceTimeoutError``.
        """
        if self._admitted >= self.in_flight + self.waiting:
            raise ExplainBusyError(f"{self._admitted} explanations are running or waiting")
        self._admitted += 1
        deadline = time.monotonic() + timeout_s
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), timeout_s)
            except TimeoutError:
                raise QueueTimeoutError(f"waited {timeout_s:g} s for its turn to be explained") from None
            try:
                rows = []
                for start in range(0, len(texts), self.chunk):
                    remaining = max(deadline - time.monotonic(), 0.001)
                    answers = await batcher.submit(texts[start : start + self.chunk], timeout_s=remaining)
                    rows.append(_probabilities_of(answers))
            except QueueTimeoutError:
                # The batcher counts from the chunk; the client waited for the whole explanation.
                raise QueueTimeoutError(f"waited {timeout_s:g} s for its turn to be explained") from None
            except InferenceTimeoutError:
                raise InferenceTimeoutError(f"the model did not answer within {timeout_s:g} s") from None
            finally:
                self._slots.release()
        finally:
            self._admitted -= 1
        return np.concatenate(rows, axis=0)


def _probabilities_of(answers: Any) -> np.ndarray:
    # A model with an out-of-scope detector answers OpenSetAnswers; the trained labels' rows are in it.
    return np.asarray(getattr(answers, "probabilities", answers), dtype=np.float64)
