"""The KServe server's batching (serving/kserve_server.py): requests of one model, from any
number of clients, gathered into batches that run one at a time on the model's own thread.

A batch takes whole requests up to the batch size, waiting at most the batch delay after the
first (the task registry's defaults, TorchServe's). When a batch fails as a whole it reruns item
by item, so one input that trips the model fails only its own request. At most max_waiting
requests wait; one more is Overloaded at once (503) with a Retry-After of the seconds the
requests waiting now need at the last batch's pace (1 to 60).
"""
from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor

from pixtok.inference.validate import RequestError

log = logging.getLogger("pixtok.kserve")


class Overloaded(RequestError):
    """A model's queue is full: 503 at once, with Retry-After (whole seconds) as a hint of when
    the requests waiting now will have run."""

    def __init__(self, model: str, waiting: int, retry_after: int):
        super().__init__(503, "ServiceUnavailableException",
                         f"model {model!r} is overloaded: {waiting} requests are waiting, "
                         f"the most it queues (PIXTOK_QUEUE_SIZE); retry after {retry_after} s")
        self.retry_after = retry_after

    @property
    def headers(self) -> dict:
        return {"Retry-After": str(self.retry_after)}


class Batcher:
    """Requests of one model -> batches: a request is a list of items; a batch takes whole
    requests up to `size` items, waiting at most `delay_s` after the first (a request larger than
    `size` runs alone). run(items) -> one result or exception per item, on one thread."""

    def __init__(self, run, size: int, delay_s: float, name: str = "",
                 max_waiting: int | None = None):
        self.run, self.size, self.delay_s = run, max(1, size), max(0.0, delay_s)
        self.name, self.max_waiting = name, max_waiting
        self.queue: asyncio.Queue | None = None
        self.carry = None
        self.running = 0          # the size of the batch on the model thread now
        self.batch_s = 0.0        # how long the last batch ran
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="pixtok-model")

    def retry_after(self, waiting: int) -> int:
        """Whole seconds until the requests waiting now have run, at the last batch's pace."""
        batches = -(-waiting // self.size) + 1
        return max(1, min(60, math.ceil(batches * self.batch_s)))

    async def submit(self, items: list) -> tuple[list, int]:
        """-> (one result or exception per item, the size of the batch they ran in); Overloaded
        at once when max_waiting requests are waiting already."""
        loop = asyncio.get_running_loop()
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self.loop())
        waiting = self.queue.qsize() + (self.carry is not None)
        if self.max_waiting is not None and waiting >= self.max_waiting:
            raise Overloaded(self.name, waiting, self.retry_after(waiting))
        future = loop.create_future()
        await self.queue.put((items, future))
        return await future

    async def next_request(self, timeout: float | None):
        if self.carry is not None:
            found, self.carry = self.carry, None
            return found
        if timeout is None:
            return await self.queue.get()
        if timeout <= 0:
            return self.queue.get_nowait()       # QueueEmpty when none is waiting
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def loop(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.next_request(None)]
            count, deadline = len(batch[0][0]), loop.time() + self.delay_s
            while count < self.size:
                try:
                    found = await self.next_request(deadline - loop.time())
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                if count + len(found[0]) > self.size:
                    self.carry = found           # first in the next batch
                    break
                batch.append(found)
                count += len(found[0])
            items = [item for request, _ in batch for item in request]
            self.running, began = len(items), loop.time()
            try:
                results = await loop.run_in_executor(self.executor, self.run_all, items)
            except Exception as e:               # never leave a client waiting
                results = [e] * len(items)
            self.batch_s = loop.time() - began
            start = 0
            for request, future in batch:
                if not future.done():
                    future.set_result((results[start:start + len(request)], len(items)))
                start += len(request)

    def run_all(self, items: list) -> list:
        """One run over the batch; if it fails as a whole, item by item, so one input that trips
        the model cannot fail the requests it was batched with."""
        try:
            return list(self.run(items))
        except Exception:
            log.exception("pixtok: batch of %d failed; retrying one by one", len(items))
        out = []
        for item in items:
            try:
                out.append(self.run([item])[0])
            except Exception as e:
                log.exception("pixtok: prediction failed")
                out.append(e if isinstance(e, RequestError) else
                           RequestError(500, "internal_error",
                                        f"the model failed on this input ({e})"))
        return out


def first_error(results: list):
    for r in results:
        if isinstance(r, RequestError):
            return r
        if isinstance(r, Exception):
            return RequestError(500, "internal_error", f"the model failed ({r})")
    return None
