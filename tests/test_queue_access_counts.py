"""The hot path does exactly the minimum of guest-memory accesses.

Each test derives the count by hand from the virtio rules (see the comment
beside each expectation); a change that adds a single read or write to the
hot path fails here.
"""

from __future__ import annotations

import pytest

from pyvirtio.memory import AreaKind
from pyvirtio.queue import ArmResult
from pyvirtio.testing import QueuePair

A, D, U, E = AreaKind.AVAIL, AreaKind.DESC, AreaKind.USED, AreaKind.EVENT


def _one_sleeping_batch(pair: QueuePair, n: int) -> None:
    """Driver posts n, device drains, publishes once, re-arms and sleeps."""
    pair.post(n)
    chains = pair.vq.pop_batch(1024)
    assert len(chains) == n
    for c in chains:
        pair.vq.complete(c, 0)
    pair.vq.flush()
    assert pair.vq.pop_batch(1024) == []
    assert pair.vq.arm() is ArmResult.SLEEP
    assert len(pair.driver.get_used()) == n


def _warm(pair: QueuePair) -> None:
    # The first decision after start always notifies without reading the
    # event (nothing is known about the driver yet): get past it.
    _one_sleeping_batch(pair, 1)
    pair.mem.reset_counts()


def test_split_event_idx_batch_of_32_costs_one_descriptor_read_per_request_plus_eight():
    pair = QueuePair("split", 64, event_idx=True)
    _warm(pair)
    _one_sleeping_batch(pair, 32)
    # avail: idx, ring slice, empty-check idx, re-check idx
    assert pair.area_counts(A) == (4, 0)
    # one 16-byte read per single-descriptor chain
    assert pair.area_counts(D) == (32, 0)
    # used: element slice + used.idx, both writes, never read back
    assert pair.area_counts(U) == (0, 2)
    # event: used_event read for the interrupt decision, avail_event write to arm
    assert pair.area_counts(E) == (1, 1)
    snap = pair.counts()
    assert snap["metadata_reads"] + snap["metadata_writes"] == 40  # 1.25 per request
    assert snap["fences"] == 2  # publish, arm


def test_split_without_event_idx_suppresses_lazily_once_per_wake():
    pair = QueuePair("split", 64, event_idx=False)
    _warm(pair)
    _one_sleeping_batch(pair, 32)
    # avail: idx, ring slice, flags (NO_INTERRUPT) at publish, empty check, re-check
    assert pair.area_counts(A) == (5, 0)
    assert pair.area_counts(D) == (32, 0)
    # used: NO_NOTIFY (work found while armed), elements, idx, flags=0 at arm
    assert pair.area_counts(U) == (0, 4)
    assert pair.area_counts(E) == (0, 0)


def test_packed_event_idx_batch_of_32_reads_two_byte_flags_and_stores_once_per_request():
    pair = QueuePair("packed", 64, event_idx=True)
    _warm(pair)
    _one_sleeping_batch(pair, 32)
    d = pair.mem.counters[D]
    # flags: 32 available + the unavailable one ending the run, the empty
    # check, the re-check; one bulk body read
    assert d.reads == 32 + 1 + 1 + 1 + 1
    assert d.bytes_read == 2 * 35 + 16 * 32
    # one 8-byte len|id|flags store per used descriptor
    assert d.writes == 32 and d.bytes_written == 8 * 32
    # event: driver event read at publish, device event (off_wrap|DESC) write at arm
    assert pair.area_counts(E) == (1, 1)
    snap = pair.counts()
    assert (snap["metadata_reads"] + snap["metadata_writes"]) / 32 <= 2.2


def test_checking_for_work_never_writes_guest_memory():
    for ring in ("split", "packed"):
        for event_idx in (False, True):
            pair = QueuePair(ring, 16, event_idx=event_idx)
            _warm(pair)
            for _ in range(5):
                assert pair.vq.has_work() is False
                assert pair.vq.pop_batch() == []
            snap = pair.counts()
            assert snap["metadata_writes"] == 0, (ring, event_idx)
            assert snap["fences"] == 0


def test_split_reads_avail_idx_once_for_a_whole_batch_even_in_small_pops():
    pair = QueuePair("split", 64, event_idx=True)
    _warm(pair)
    pair.post(32)
    got = []
    for _ in range(8):
        got += pair.vq.pop_batch(4)
    assert len(got) == 32
    # one idx load covered all 32 entries; 8 ring-slice reads (one per pop)
    assert pair.area_counts(A) == (1 + 8, 0)


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_eager_policy_costs_more_than_lazy_for_the_same_work(ring):
    costs = {}
    for policy in ("lazy", "eager"):
        pair = QueuePair(ring, 64, event_idx=True, policy=policy)
        _warm(pair)
        for _ in range(4):
            _one_sleeping_batch(pair, 32)
        snap = pair.counts()
        costs[policy] = snap["metadata_reads"] + snap["metadata_writes"]
        assert pair.vq.stats.completed == 4 * 32 + 1
    assert costs["eager"] > 2 * costs["lazy"]


def test_publishing_a_batch_decides_one_interrupt_not_one_per_completion():
    pair = QueuePair("split", 64, event_idx=True)
    _warm(pair)
    pair.driver.enable_interrupts()
    pair.post(16)
    chains = pair.vq.pop_batch()
    decisions = [pair.vq.complete(c, 0) for c in chains]
    assert decisions == [False] * 16
    assert pair.vq.flush() is True
    assert pair.vq.stats.publishes == 2  # warm-up + this batch
