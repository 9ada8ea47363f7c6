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


def _kicked_loop(ring: str, handler) -> tuple[QueuePair, QueueLoop, int, int]:
    pair = QueuePair(ring, 16, event_idx=True)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    loop = QueueLoop(pair.vq, Kick(kick), eventfd_call(call))
    loop.attach(lambda q: CallbackService(q, handler, batch=16))
    return pair, loop, kick, call


def _serve_one(pair: QueuePair, kick: int, token: str, timeout: float = 5.0) -> list:
    import time

    pair.driver.add([(pair.pool.alloc(8), 8)], [], token)
    if pair.driver.publish():
        os.eventfd_write(kick, 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pair.driver.get_used()
        if got:
            return got
        time.sleep(0.001)
    return []


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_a_loop_group_serves_its_rings_in_one_thread_and_they_come_and_go_on_their_own(ring):
    """Two rings in one `LoopGroup`: both served by the group's one thread;
    one stops while the other keeps working; a failing device retires only
    its ring; the thread ends with the last loop and starts with the next."""
    import threading

    from pyvirtio.runtime import LoopGroup

    seen: list[str] = []

    def ok(chains):
        seen.append(threading.current_thread().name)
        return [(c, 0) for c in chains]

    def broken(chains):
        raise RuntimeError("a device bug")

    group = LoopGroup("pair")
    a, la, ka, _ = _kicked_loop(ring, ok)
    b, lb, kb, _ = _kicked_loop(ring, ok)
    c, lc, kc, _ = _kicked_loop(ring, broken)
    failures: list[BaseException] = []
    lc._on_fail = lambda index, exc: failures.append(exc)
    for lp in (la, lb):
        lp.start(group)
    assert _serve_one(a, ka, "a1") == [("a1", 0)]
    assert _serve_one(b, kb, "b1") == [("b1", 0)]
    assert set(seen) == {"pair"}  # the group's thread, not one per ring
    thread = group.thread
    lc.start(group)
    assert _serve_one(c, kc, "c1", timeout=0.5) == []  # its device raised: that ring is retired...
    assert len(failures) == 1 and isinstance(failures[0], RuntimeError)
    la.stop()
    assert _serve_one(b, kb, "b2") == [("b2", 0)]  # ...and the other rings go on, one stopped
    assert _serve_one(a, ka, "a2", timeout=0.3) == []
    lb.stop()
    thread.join(5)
    assert not thread.is_alive() and group.thread is None  # it ended with its last loop
    d, ld, kd, _ = _kicked_loop(ring, ok)
    ld.start(group)
    assert _serve_one(d, kd, "d1") == [("d1", 0)]
    ld.stop()
    group.close()


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_a_sleeping_ring_of_a_group_is_served_while_another_ring_of_the_group_never_rests(ring):
    """A busy ring does not starve its group's sleepers: the group thread
    looks at their kicks between the busy ring's passes (at most every
    `LoopGroup.BUSY_POLL_NS`), so a kicked ring is served promptly, and a
    `QueueLoop.wake()` (a device's own event) reaches it too."""
    import threading
    import time

    from pyvirtio.runtime import LoopGroup, Service

    passes = 0

    class Spinner(Service):  # work of its own on every pass: its loop never sleeps
        def take(self) -> int:
            return 0

        def progress(self, done) -> bool:
            nonlocal passes
            passes += 1
            return True

    group = LoopGroup("pair")
    _, busy, _, _ = _kicked_loop(ring, lambda chains: [(c, 0) for c in chains])
    busy.attach(Spinner)
    woke = threading.Event()

    class Waker(CallbackService):
        def after_sleep(self) -> None:
            woke.set()

    pair, lp, kick, _ = _kicked_loop(ring, None)
    lp.attach(lambda q: Waker(q, lambda chains: [(c, 0) for c in chains], batch=16))
    try:
        busy.start(group)
        lp.start(group)
        deadline = time.monotonic() + 5
        while lp.counters.sleeps == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert lp.counters.sleeps >= 1 and passes > 0  # one sleeps, the other spins
        for i in range(20):
            assert _serve_one(pair, kick, f"t{i}", timeout=2.0) == [(f"t{i}", 0)]
        woke.clear()
        lp.wake()
        assert woke.wait(2.0)
        assert busy.counters.sleeps == 0  # the busy ring was busy throughout
    finally:
        busy.stop()
        lp.stop()
        group.close()


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_receive_bulk_moves_a_whole_batch_into_the_next_buffers_or_hands_back_what_it_took(ring):
    """`Queue.receive_bulk`: another ring's batch of frames lands one per
    buffer in this ring's next buffers, the patch over each copy, used at
    once with each frame's length and counted here; with fewer buffers than
    frames nothing is written or counted and the buffers taken come back in
    ring order; a ring that is not quiet (another thread's) gives none."""
    import threading
    from collections import deque

    from pyvirtio.runtime import LoopGroup

    group = LoopGroup("test")
    group.thread = threading.current_thread()  # this thread stands for the group's
    group.ident = threading.get_ident()
    txp, rxp = QueuePair(ring, 16), QueuePair(ring, 16)
    calls: list[int] = []
    lp = QueueLoop(rxp.vq, None, lambda: calls.append(1))
    lp.group = group
    rq = lp.queue
    frames = [bytes(2) + bytes([i]) * (30 + i) for i in range(5)]

    def send(fs: list[bytes]) -> Bulk:
        for f in fs:
            g = txp.pool.alloc(len(f))
            txp.raw.write(g, f)
            txp.driver.add([(g, len(f))], [], token=f)
        txp.driver.publish()
        got = txp.vq.pop_bulk(16)
        assert type(got) is Bulk
        return got

    def post(n: int) -> list[int]:
        gpas = [rxp.pool.alloc(64) for _ in range(n)]
        for g in gpas:
            rxp.raw.write(g, b"\xee" * 64)
            rxp.driver.add([], [(g, 64)], token=g)
        rxp.driver.publish()
        return gpas

    held: deque = deque()
    post(3)
    bulk = send(frames)
    assert rq.receive_bulk(bulk, held, 2, 64, 0, b"\x01") == -1  # 3 buffers for 5 frames
    assert [ch.writable_len for ch in held] == [64] * 3 and rxp.driver.get_used() == []
    assert rq.counters.packets == 0 and rq.counters.bytes == 0
    rxp.vq.complete_batch([(ch, 0) for ch in held])  # handed back unused
    rxp.driver.get_used()
    held.clear()

    gpas = post(5)
    assert rq.receive_bulk(bulk, held, 2, 64, 0, b"\x01") == sum(len(f) - 2 for f in frames)
    assert not held
    used = rxp.driver.get_used()
    assert [w for _, w in used] == [len(f) for f in frames] and [g for g, _ in used] == gpas
    assert [rxp.raw.read(g, len(f)) for g, f in zip(gpas, frames)] == [b"\x01" + f[1:] for f in frames]
    assert rxp.raw.read(gpas[0] + len(frames[0]), 1) == b"\xee"  # nothing past the frame
    assert rq.counters.packets == 5 and rq.counters.bytes == sum(len(f) - 2 for f in frames)
    txp.vq.complete_bulk(bulk, 0)
    txp.vq.flush()

    post(5)
    bulk = send(frames[:2])
    group.ident = -1  # served by another thread now: not quiet
    assert rq.receive_bulk(bulk, held, 2, 64) == -1 and not held
    group.ident = threading.get_ident()
    assert rq.receive_bulk(bulk, held, 2, 32) == -1  # a frame longer than `hi`: the caller looks at it
    assert len(held) == 2 and rq.counters.packets == 5 and rxp.driver.get_used() == []
    lp.close()
