"""Driver and device in separate processes, sharing memory and eventfds.

The device sleeps on its kick eventfd whenever `arm()` says so; the driver
sleeps on the call eventfd. With random pauses on both sides, every
interleaving of publish/arm/re-check gets exercised. A lost kick or a lost
interrupt shows up as a stall: both sides wait with a timeout, so a stall
is detected (and reported as lost requests) instead of hanging the suite.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import select
import time

import pytest

from pyvirtio.driver import BufferPool, PackedDriver, SplitDriver, ring_layout
from pyvirtio.memory import GuestMemory
from pyvirtio.queue import Virtqueue
from pyvirtio.runtime import CallbackService, Kick, QueueLoop, eventfd_call
from pyvirtio.spec import Feature

STALL = 5.0  # seconds without progress that count as a lost wake-up


def _driver(mem, packed, q, event_idx, n, kick, call, seed, conn):
    rnd = random.Random(seed)
    desc, drv_area, dev_area, end = ring_layout(packed, q, 0)
    pool = BufferPool(mem, end + 4096, 1 << 20)
    cls = PackedDriver if packed else SplitDriver
    drv = cls(mem, q, desc, drv_area, dev_area, event_idx=event_idx, pool=pool)
    bufs = [pool.alloc(16) for _ in range(q)]
    free = list(range(q))
    poller = select.poll()
    poller.register(call, select.POLLIN)
    posted = done = kicks = stalls = 0
    seen = set()
    while done < n:
        k = min(rnd.randint(1, 8), n - posted, len(free))
        for _ in range(k):
            slot = free.pop()
            drv.add([], [(bufs[slot], 16)], (posted, slot))
            posted += 1
        if k and drv.publish():
            kicks += 1
            os.eventfd_write(kick, 1)
        if rnd.random() < 0.3:
            time.sleep(rnd.random() * 0.0005)
        got = drv.get_used()
        for (req, slot), written in got:
            assert written == 16 and req not in seen
            seen.add(req)
            free.append(slot)
        done += len(got)
        if not got and (not free or posted == n):
            if drv.enable_interrupts():
                continue
            if not poller.poll(STALL * 1000):
                stalls += 1
                if stalls > 2:
                    break
            try:
                os.eventfd_read(call)
            except BlockingIOError:
                pass
    conn.send({"done": done, "kicks": kicks, "stalls": stalls})


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_no_request_is_lost_when_both_sides_sleep_and_wake_at_random(ring, event_idx):
    packed = ring == "packed"
    q, n = 16, 20_000
    mem = GuestMemory.anonymous(4 << 20)
    desc, drv_area, dev_area, _ = ring_layout(packed, q, 0)
    features = int(Feature.VERSION_1)
    if packed:
        features |= Feature.RING_PACKED
    if event_idx:
        features |= Feature.RING_EVENT_IDX
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_driver, args=(mem, packed, q, event_idx, n, kick, call, 7, child), daemon=True)
    vq = Virtqueue(mem, q, desc, drv_area, dev_area, features=features)
    loop = QueueLoop(vq, Kick(kick), eventfd_call(call))
    rnd = random.Random(3)
    completed = [0]

    def handler(chains):
        if rnd.random() < 0.3:
            time.sleep(rnd.random() * 0.0005)
        completed[0] += len(chains)
        return [(c, c.write(b"x" * 16)) for c in chains]

    loop.attach(lambda q: CallbackService(q, handler, batch=8))
    proc.start()
    try:
        deadline = time.monotonic() + 120
        loop.run(stop=lambda: completed[0] >= n or time.monotonic() > deadline or not proc.is_alive(),
                 stop_poll=STALL)
        assert parent.poll(30), "driver process did not report"
        report = parent.recv()
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        loop.close()
        os.close(kick)
        os.close(call)
        mem.close()
    # a sleep that had to time out means a kick was lost; a driver stall
    # means an interrupt was lost
    assert loop.counters.timeouts == 0 and report["stalls"] == 0, (loop.counters, report)
    assert report["done"] == n and completed[0] == n
    assert vq.failed is None
    assert loop.counters.sleeps > 0  # the device really went to sleep and was woken
