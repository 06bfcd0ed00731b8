"""Dynamic batching: texts from concurrent requests share one model call.

A request's texts wait in a bounded queue. One collector task takes the oldest request and, until
``max_batch_size`` texts are gathered or the oldest has waited ``max_wait``, adds later requests;
the batch then runs in a single model thread, so the event loop keeps accepting and answering while
the model works, and requests that arrive meanwhile form the next batch. Under load that is where
batches come from: the oldest text has waited long enough by the time the model is free, so nothing
waits on purpose; ``max_wait`` only holds back a text that finds the model idle, to gather a burst.
A full queue refuses new work at once (the caller answers 503 + Retry-After) instead of letting
latency grow without bound. Closing stops new work and finishes everything already accepted.

One request's texts never fail another's: when a batch raises, its requests are run again one by
one, so that only the request that caused the error gets it. A request has a deadline: past it, a
request still queued is withdrawn (:class:`QueueTimeoutError`) and one in the model is answered
without waiting further (:class:`InferenceTimeoutError`); a model call that takes far longer than
any deadline shows in :attr:`DynamicBatcher.busy_for`, which readiness checks.

A model call answers a whole batch with one object of per-text answers that is cut by request with a
slice: an array of probabilities (one row per text), or anything else with ``len`` and slicing (the
app's :class:`tuneforge.serve.model.OpenSetAnswers`, which adds each text's out-of-scope decision).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneforge.serve.metrics import ServeMetrics

logger = logging.getLogger("tuneforge.serve")

# Rows of probabilities (a list of lists becomes an array), or a model's own sliceable per-batch answers.
InferFn = Callable[[list[str]], Any]


class QueueFullError(Exception):
    """The queue holds ``max_queue`` texts already; try again shortly."""


class BatcherClosedError(Exception):
    """The server is shutting down and accepts no new work."""


class QueueTimeoutError(Exception):
    """The request waited its whole deadline in the queue; the model never saw it."""


class InferenceTimeoutError(Exception):
    """The request's batch was still in the model at its deadline."""


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False  # taken into a batch: the model has (or is about to have) its texts


class DynamicBatcher:
    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        metrics: ServeMetrics | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_s >= 0")
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._queued_texts = 0
        self._closing = False
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._busy_since: float | None = None  # when the model call in progress started
        # One thread: the model already uses every core it was given; two calls at once would only
        # fight over them. A thread (not the loop) so that the loop stays responsive.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneforge-model")

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def busy_for(self) -> float:
        """Seconds the model call in progress has taken so far; 0 when the model is idle."""
        return 0.0 if self._busy_since is None else time.monotonic() - self._busy_since

    def start(self) -> None:
        """Start the collector on the running event loop."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="tuneforge-batcher")

    async def submit(self, texts: list[str], *, timeout_s: float | None = None) -> Any:
        """The model's answers for ``texts`` (probabilities: one row each), once their batch has run.

        ``timeout_s``: the deadline, queueing and inference together; past it this raises
        :class:`QueueTimeoutError` or :class:`InferenceTimeoutError`.
        """
        if self._closing:
            raise BatcherClosedError("shutting down")
        if self._task is None or self._wakeup is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if self._queued_texts + len(texts) > self.max_queue:
            raise QueueFullError(f"{self._queued_texts} texts are waiting (limit {self.max_queue})")
        pending = _Pending(list(texts), asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._set_depth(self._queued_texts + len(texts))
        self._wakeup.set()
        # A caller that is cancelled (client gone) or out of time cancels only its own future (wait_for
        # does that); its texts leave the queue, and a batch it was part of still answers everyone else.
        try:
            return await asyncio.wait_for(pending.future, timeout_s)
        except TimeoutError:
            if pending.started:
                raise InferenceTimeoutError(f"the model did not answer within {timeout_s:g} s") from None
            self._withdraw(pending)
            raise QueueTimeoutError(f"waited {timeout_s:g} s in the queue") from None
        except asyncio.CancelledError:
            self._withdraw(pending)
            raise

    def _withdraw(self, pending: _Pending) -> None:
        """Take a request nobody waits for out of the queue (if it is still there)."""
        if pending.started:
            return
        try:
            self._queue.remove(pending)
        except ValueError:
            return
        self._set_depth(self._queued_texts - len(pending.texts))

    async def close(self, timeout_s: float | None = None) -> None:
        """Refuse new work, finish all accepted work (up to ``timeout_s``), then stop."""
        self._closing = True
        if self._task is not None and self._wakeup is not None:
            self._wakeup.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                self._task.cancel()
                self._fail_all(BatcherClosedError("shutdown timed out"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _set_depth(self, value: int) -> None:
        self._queued_texts = value
        if self._metrics is not None:
            self._metrics.queue_depth.set(value)

    def _fail_all(self, error: Exception) -> None:
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(error)
        self._set_depth(0)

    async def _collect(self) -> None:
        try:
            await self._collect_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave callers waiting forever
            logger.exception("batcher stopped")
            self._closing = True
            self._fail_all(exc)

    async def _collect_forever(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # The wait is counted from the oldest request's arrival: when the model was busy it has
            # waited already, and the queue then usually holds a full batch anyway.
            deadline = self._queue[0].enqueued + self.max_wait_s
            while self._queued_texts < self.max_batch_size and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._run(loop, batch)

    def _take(self) -> list[_Pending]:
        """Whole requests, oldest first, up to max_batch_size texts (at least one request)."""
        batch: list[_Pending] = []
        size = 0
        taken = 0
        while self._queue:
            head = self._queue[0]
            if batch and size + len(head.texts) > self.max_batch_size:
                break
            self._queue.popleft()
            taken += len(head.texts)
            if head.future.done():  # its caller was cancelled; nobody wants the answer
                continue
            head.started = True
            batch.append(head)
            size += len(head.texts)
        self._set_depth(self._queued_texts - taken)
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        try:
            results = await self._call(loop, [text for pending in batch for text in pending.texts])
        except Exception as exc:
            if len(batch) == 1:
                self._answer(batch[0], exc)
                return
            # One bad text must not fail the other requests of its batch: find it by running each alone.
            logger.warning("a batch of %d requests failed (%s); running them one by one", len(batch), exc)
            for pending in batch:
                if pending.future.done():
                    continue
                try:
                    self._answer(pending, await self._call(loop, pending.texts))
                except Exception as single:
                    self._answer(pending, single)
            return
        offset = 0
        for pending in batch:
            self._answer(pending, results[offset : offset + len(pending.texts)])
            offset += len(pending.texts)

    async def _call(self, loop: asyncio.AbstractEventLoop, texts: list[str]) -> Any:
        """One model call in the model thread: its answers, one per text, to be sliced by request."""
        started = time.perf_counter()
        self._busy_since = time.monotonic()
        try:
            answers = await loop.run_in_executor(self._executor, self._infer, texts)
        finally:
            self._busy_since = None
        if isinstance(answers, np.ndarray | Sequence):  # rows of probabilities (a list of lists too)
            answers = np.asarray(answers)
            if answers.ndim != 2 or answers.shape[0] != len(texts):
                raise RuntimeError(f"model returned shape {answers.shape} for {len(texts)} texts")
        elif len(answers) != len(texts):
            raise RuntimeError(f"model returned {len(answers)} answers for {len(texts)} texts")
        if self._metrics is not None:
            self._metrics.batch_seconds.observe(time.perf_counter() - started)
            self._metrics.batch_size.observe(len(texts))
            self._metrics.texts.inc(len(texts))
        return answers

    @staticmethod
    def _answer(pending: _Pending, result: Any) -> None:
        if pending.future.done():  # its caller has gone or timed out
            return
        if isinstance(result, Exception):
            pending.future.set_exception(result)
        else:
            pending.future.set_result(result)
