"""Micro-batching across clients: concurrent requests share one policy / target call.

A model call is synchronous and CPU/GPU bound, so it runs in a worker thread (one per batcher: the
policy of the next batch overlaps the target of this one) while the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["MicroBatcher"]


class MicroBatcher:
    """Collects items submitted by concurrent requests and runs ``fn`` on up to ``max_batch`` at once.

    Args:
        fn: ``fn(items) -> results``, one result per item, in order (e.g. ``policy.propose`` wrapped). When it
            raises on a batch of several, each item is run again on its own, so only the items that fail alone get
            the error (one bad request no longer fails the requests batched with it).
        max_batch: most items per call.
        max_wait: seconds the first item of a batch waits for more (0 = take what is queued now).
        name: thread name prefix, for logs.
        on_batch: called with the size of every batch that runs (metrics).

    A submitter that stops waiting (timeout, cancelled request) is skipped if its batch has not started;
    a started call runs to the end (threads cannot be interrupted) and its result is dropped.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        max_batch: int,
        max_wait: float,
        name: str,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.fn = fn
        self.on_batch = on_batch or (lambda n: None)
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.name = name
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop the worker; queued submitters get a RuntimeError."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError(f"{self.name} stopped"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in this batcher's worker thread, after the calls queued before it: other model work (e.g.
        the processor counting a reference's visual tokens) never blocks the event loop and never runs beside the
        batch calls on the same model or processor from another thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, item: Any) -> tuple[Any, float]:
        """Queue ``item``; returns ``(result, seconds of the call that computed it)``.

        Raises:
            whatever ``fn`` raised for this item (a batch that fails is run again item by item, so one bad request
            does not fail the ones batched with it; the seconds returned for a rerun item count from the failed
            batch's start); RuntimeError if the batcher is stopped.
        """
        if self._queue is None:
            raise RuntimeError(f"{self.name} is not started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    batch.append(
                        self._queue.get_nowait()
                        if timeout <= 0
                        else await asyncio.wait_for(self._queue.get(), timeout)
                    )
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            batch = [(item, fut) for item, fut in batch if not fut.done()]
            if not batch:
                continue
            self.on_batch(len(batch))
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name} returned {len(results)} results for {len(batch)} items")
            except Exception as err:  # noqa: BLE001 - one bad item must not fail the requests batched with it
                logger.warning("%s failed on a batch of %d: %s", self.name, len(batch), err)
                if len(batch) == 1:
                    batch[0][1].done() or batch[0][1].set_exception(err)
                    continue
                for item, fut in batch:  # each item again on its own: only the failing ones get the error
                    if fut.done():
                        continue
                    self.on_batch(1)
                    try:
                        (result,) = await loop.run_in_executor(self._executor, self.fn, [item])
                    except Exception as one:  # noqa: BLE001 - this item's own error, to its submitter
                        fut.done() or fut.set_exception(one)
                    else:  # the seconds it waited on: the failed batch and the reruns before its own
                        fut.done() or fut.set_result((result, time.perf_counter() - start))
                continue
            seconds = time.perf_counter() - start
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result((result, seconds))
