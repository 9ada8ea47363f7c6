"""The queue loop over real eventfds: sleeps only after arming, signals once per batch."""

from __future__ import annotations

import asyncio
import os

import pytest

from pyvirtio.queue.bulk import Bulk
from pyvirtio.runtime import CallbackService, Kick, QueueLoop, eventfd_call
from pyvirtio.testing import QueuePair


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("bulk", [False, True])
def test_asyncio_runner_serves_kicked_batches_and_interrupts_once_per_batch(ring, bulk):
    pair = QueuePair(ring, 32, event_idx=True)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    qloop = QueueLoop(pair.vq, Kick(kick), eventfd_call(call))
    done: list[tuple[object, int]] = []

    def handler(chains):
        if type(chains) is Bulk:
            return [(chains, 0)]
        return [(c, 0) for c in chains]

    qloop.attach(lambda q: CallbackService(q, handler, batch=64, bulk=bulk))

    async def driver() -> None:
        loop = asyncio.get_running_loop()
        irq = asyncio.Event()
        loop.add_reader(call, irq.set)
        bufs = [pair.pool.alloc(64) for _ in range(8)]
        try:
            for _ in range(20):
                for b in bufs:
                    pair.driver.add([(b, 64)], [], None)
                if pair.driver.publish():   # kick only when the device asked
                    os.eventfd_write(kick, 1)
                while pair.driver.outstanding:
                    done.extend(pair.driver.get_used())
                    if not pair.driver.outstanding or pair.driver.enable_interrupts():
                        continue
                    irq.clear()
                    await asyncio.wait_for(irq.wait(), 5)  # a lost interrupt fails here
                    os.eventfd_read(call)
        finally:
            loop.remove_reader(call)
            qloop.stopping = True
            os.eventfd_write(kick, 1)

    async def main() -> None:
        serve = asyncio.create_task(qloop.run_async())
        await driver()
        await asyncio.wait_for(serve, 5)

    try:
        asyncio.run(main())
    finally:
        qloop.close()
        os.close(kick)
        os.close(call)
    assert len(done) == 160
    assert qloop.counters.sleeps >= 1
    # one interrupt decision per published batch at most
    assert qloop.counters.interrupts <= pair.vq.stats.publishes
