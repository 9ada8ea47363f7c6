"""Running a queue: wait for kicks only after arming, signal once per batch.

Two drivers of the same loop: `QueueRunner.run_blocking()` (a thread or a
process devoted to one queue, blocking reads on the kick eventfd: the
fastest in CPython) and `QueueRunner.serve()` (asyncio, many queues and a
control socket in one thread).

The loop: take a batch, hand it to the device, publish the completions as
one batch, signal the call eventfd if the driver wants an interrupt; when a
pop finds nothing, arm (enable kicks, full fence, re-check) and sleep only if
the re-check found nothing. A kick that arrives while we are busy just
leaves the eventfd readable; we drain it before sleeping, never re-arm per
kick.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pyvirtio.queue import Chain, QueueError, Virtqueue
from pyvirtio.queue.bulk import Bulk

log = logging.getLogger(__name__)

#: A device handler: given a batch, returns (chain, bytes written) for each
#: chain it completed now. Chains it keeps are completed later through
#: `QueueRunner.complete`.
#: With `bulk=True` it may receive a `Bulk` instead; it returns (bulk, written).
Handler = Callable[[Any], Sequence[tuple[Any, Any]]]
AsyncHandler = Callable[[Any], Awaitable[Sequence[tuple[Any, Any]]]]


@dataclass(slots=True)
class RunnerStats:
    kicks: int = 0        # kick eventfd reads that returned a count (wake-ups)
    kick_count: int = 0   # sum of eventfd counters (driver notifications)
    interrupts: int = 0   # call eventfd writes
    sleeps: int = 0       # times the loop slept on the kick fd
    timeouts: int = 0     # sleeps that ended by timeout, not by a kick
    sleep_seconds: float = 0.0  # time spent asleep (run_blocking)


class QueueRunner:
    """Runs one `Virtqueue` against its kick and call eventfds.

    `kick_fd` None means polling mode (no kicks: the runner never sleeps on
    a fd, it yields instead); `call_fd` None means interrupts are dropped.
    `batch` bounds the work per wake-up so one busy queue cannot starve the
    others sharing the loop.
    """

    def __init__(self, vq: Virtqueue, kick_fd: int | None, call_fd: int | None, *,
                 batch: int = 64, bulk: bool = False) -> None:
        self.vq = vq
        #: hand the handler a `Bulk` when a run allows it (`Virtqueue.pop_bulk`)
        self.bulk = bulk
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.batch = batch
        self.stats = RunnerStats()
        self.stopped = False

    def signal(self) -> None:
        if self.call_fd is not None:
            try:
                os.eventfd_write(self.call_fd, 1)
            except OSError as e:  # the frontend closed it: interrupts are lost, not fatal
                log.warning("%s: call eventfd write failed: %s", self.vq.name, e)
                return
        self.stats.interrupts += 1

    def complete(self, items: Sequence[tuple[Chain | Bulk, Any]]) -> None:
        """Complete what the handler finished, as one published batch."""
        vq = self.vq
        if vq.eager:
            for obj, written in items:
                if type(obj) is Bulk:
                    notify = vq.complete_bulk(obj, written)
                else:
                    notify = vq.complete(obj, written)  # type: ignore[arg-type]
                if notify:
                    self.signal()
            return
        chains: list[tuple[Chain, int]] = []
        for obj, written in items:
            if type(obj) is Bulk:
                vq.complete_bulk(obj, written)
            else:
                chains.append((obj, written))  # type: ignore[arg-type]
        if vq.complete_batch(chains):
            self.signal()

    def _drain_kick(self) -> None:
        if self.kick_fd is None:
            return
        try:
            n = os.eventfd_read(self.kick_fd)
        except BlockingIOError:
            return
        self.stats.kicks += 1
        self.stats.kick_count += n

    def run_blocking(self, handler: Handler, stop: Callable[[], bool] = lambda: False,
                     timeout: float | None = None) -> None:
        """Serve until `stop()` is true (checked at every wake-up, and every
        `timeout` seconds while asleep)."""
        vq = self.vq
        kick = self.kick_fd
        poller = None
        if kick is not None:
            os.set_blocking(kick, False)
            poller = select.poll()
            poller.register(kick, select.POLLIN)
        wait_ms = None if timeout is None else int(timeout * 1000)
        while not self.stopped and not stop():
            try:
                chains = vq.pop_bulk(self.batch) if self.bulk else vq.pop_batch(self.batch)
            except QueueError:
                chains = []  # logged by the queue, which is now retired
            if len(chains):
                self.complete(handler(chains))
                continue
            if poller is None:
                os.sched_yield()  # polling mode: the frontend never kicks
                continue
            # Kicks that came while we worked are stale: drain them before
            # arming; any kick after this point stays readable.
            self._drain_kick()
            if vq.arm():
                continue
            self.stats.sleeps += 1
            t = time.perf_counter()
            if not poller.poll(wait_ms):
                self.stats.timeouts += 1
            self.stats.sleep_seconds += time.perf_counter() - t

    async def serve(self, handler: Handler | AsyncHandler) -> None:
        """asyncio version of `run_blocking`."""
        loop = asyncio.get_running_loop()
        vq = self.vq
        kick = self.kick_fd
        woke = asyncio.Event()
        if kick is not None:
            os.set_blocking(kick, False)
            loop.add_reader(kick, woke.set)
        is_async = asyncio.iscoroutinefunction(handler)
        try:
            while not self.stopped:
                try:
                    chains = vq.pop_bulk(self.batch) if self.bulk else vq.pop_batch(self.batch)
                except QueueError:
                    chains = []
                if len(chains):
                    if is_async:
                        done = await handler(chains)  # type: ignore[misc]
                    else:
                        done = handler(chains)
                    self.complete(done)
                    await asyncio.sleep(0)  # bounded work per wake-up: let others run
                    continue
                if kick is None:
                    await asyncio.sleep(0.0005)  # polling mode: the frontend never kicks
                    continue
                woke.clear()
                self._drain_kick()
                if vq.arm():
                    continue
                self.stats.sleeps += 1
                await woke.wait()
        finally:
            if kick is not None:
                loop.remove_reader(kick)

    def stop(self) -> None:
        self.stopped = True
