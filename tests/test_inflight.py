"""Inflight I/O tracking (vhost-user "Inflight I/O tracking"), split and packed:
a back-end killed at *any* store it makes to the inflight region, then
restarted on the same region, completes every request exactly once, in
fetch order for the ones it resubmits, even when requests completed out of
order and the driver re-posted freed descriptors before the restart.

The crash is injected by a region view that raises after N stores; for a
scenario, every N is tried. The driver model (`pyvirtio.driver`) raises on a
used id that is not outstanding, so a duplicate completion fails loudly."""

from __future__ import annotations

import os

import pytest

from pyvirtio.queue import QueueState, guest_used_idx
from pyvirtio.testing import QueuePair
from pyvirtio.vhost_user.inflight import (
    VERSION,
    InflightRegion,
    PackedTracker,
    SplitTracker,
    TrackedVirtqueue,
    queue_region_size,
)

SIZE = 8


class Crash(Exception):
    """The back-end process died here."""


class CrashingView:
    """A memoryview whose stores raise `Crash` once a shared budget runs out."""

    def __init__(self, mv: memoryview, budget: list[int]) -> None:
        self.mv = mv
        self.budget = budget

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self.mv[i]

    def __setitem__(self, i, v) -> None:  # type: ignore[no-untyped-def]
        if self.budget[0] == 0:
            raise Crash
        self.budget[0] -= 1
        self.mv[i] = v

    def __len__(self) -> int:
        return len(self.mv)


def make_tracker(pair: QueuePair, mv: memoryview) -> SplitTracker | PackedTracker:
    if pair.packed:
        return PackedTracker(mv, pair.size, pair.mem, pair.desc)
    return SplitTracker(mv, pair.size)


def start(pair: QueuePair, mv: memoryview, budget: list[int] | None = None,
          policy: str = "lazy") -> tuple[TrackedVirtqueue, SplitTracker | PackedTracker]:
    """A back-end (re)starting on the ring: resume from the region, as
    `Backend._maybe_start` does. The front-end's base after a crash is stale
    for packed (QEMU keeps the one it last set: the start of the ring here)."""
    tracker = make_tracker(pair, mv)
    if budget is not None:
        for name in ("b", "h", "q") + (("i32",) if pair.packed else ()):
            setattr(tracker, name, CrashingView(getattr(tracker, name), budget))
    if pair.packed:
        default = QueueState(pair.size, True)
    else:
        used = guest_used_idx(pair.raw, pair.device_area)
        default = QueueState(pair.size, False, last_avail=used, used_idx=used)
    state = tracker.resume(default)
    vq = TrackedVirtqueue(pair.mem, pair.size, pair.desc, pair.driver_area, pair.device_area,
                          features=pair.features, policy=policy, state=state, tracker=tracker)  # type: ignore[arg-type]
    return vq, tracker


def new_pair(ring: str, **kw: object) -> tuple[QueuePair, memoryview]:
    pair = QueuePair(ring, size=SIZE, event_idx=True, indirect=True, **kw)  # type: ignore[arg-type]
    region = bytearray(queue_region_size(SIZE, ring == "packed"))
    return pair, memoryview(region)


def post(pair: QueuePair, tokens: list[int], segments: int = 1) -> None:
    for t in tokens:
        outs = [(pair.pool.alloc(512), 512) for _ in range(segments)]
        status = pair.pool.alloc(1)
        pair.driver.add(outs, [(status, 1)], token=t)
    pair.driver.publish()


def complete(vq: TrackedVirtqueue, chains: list, order: list[int]) -> None:  # type: ignore[type-arg]
    for i in order:
        vq.complete(chains[i], 1)
    vq.flush()


# --- the basic promise ---------------------------------------------------------------


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_out_of_order_inflight_requests_are_resubmitted_in_fetch_order_after_a_crash(ring: str) -> None:
    pair, mv = new_pair(ring)
    vq, _ = start(pair, mv)
    post(pair, list(range(6)))
    chains = vq.pop_batch()
    assert len(chains) == 6
    complete(vq, chains, [1, 3])               # out of order
    assert sorted(t for t, _ in pair.driver.get_used()) == [1, 3]
    post(pair, [6, 7])                           # the driver reuses the freed descriptors
    del vq                                       # the back-end dies: 0, 2, 4, 5 in flight

    vq2, tracker = start(pair, mv)
    assert tracker.reconnected and tracker.resubmitted == 4
    first = vq2.pop_batch()
    # resubmitted first, in the order they were fetched, then the new ones
    assert [c.id for c in first] == [chains[i].id for i in (0, 2, 4, 5)]
    rest = vq2.pop_batch()
    assert len(rest) == 2
    for c in first + rest:
        vq2.complete(c, 1)
    vq2.flush()
    got = sorted(t for t, _ in pair.driver.get_used())
    assert got == [0, 2, 4, 5, 6, 7]
    assert vq2.in_flight == 0


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_a_fresh_region_is_initialised_and_nothing_is_resubmitted(ring: str) -> None:
    pair, mv = new_pair(ring)
    _, tracker = start(pair, mv)
    assert not tracker.reconnected and tracker.resubmitted == 0
    assert tracker.version == VERSION
    assert mv.cast("H")[5] == SIZE  # desc_num


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_restart_after_a_clean_stop_resumes_where_the_ring_is(ring: str) -> None:
    pair, mv = new_pair(ring)
    vq, _ = start(pair, mv)
    for round_ in range(3):                      # wrap the ring a few times
        post(pair, list(range(round_ * 6, round_ * 6 + 6)))
        chains = vq.pop_batch()
        complete(vq, chains, [5, 4, 3, 2, 1, 0])
        assert len(pair.driver.get_used()) == 6
    vq2, tracker = start(pair, mv)
    assert tracker.reconnected and tracker.resubmitted == 0
    post(pair, [100, 101])
    chains = vq2.pop_batch()
    complete(vq2, chains, [0, 1])
    assert sorted(t for t, _ in pair.driver.get_used()) == [100, 101]


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_multi_descriptor_and_indirect_lists_are_rebuilt_with_their_buffers(ring: str) -> None:
    pair, mv = new_pair(ring)
    vq, _ = start(pair, mv)
    post(pair, [0], segments=3)                                 # indirect (negotiated, >1 segment)
    outs = [(pair.pool.alloc(512), 512) for _ in range(2)]
    pair.driver.add(outs, [(pair.pool.alloc(1), 1)], token=1, indirect=False)  # a 3-descriptor chain
    pair.driver.publish()
    chains = vq.pop_batch()
    assert [c.readable_len for c in chains] == [1536, 1024]
    shapes = [(c.readable_len, c.writable_len, [bytes(v[:4]) for v in c.readable]) for c in chains]
    del vq
    vq2, _ = start(pair, mv)
    again = vq2.pop_batch()
    assert [(c.readable_len, c.writable_len, [bytes(v[:4]) for v in c.readable]) for c in again] == shapes
    complete(vq2, again, [1, 0])
    assert sorted(t for t, _ in pair.driver.get_used()) == [0, 1]


# --- a crash at every store --------------------------------------------------------------


def scenario(pair: QueuePair, vq: TrackedVirtqueue, posted: list[int], done: list[int]) -> None:
    """Work that exercises fetch, out-of-order batches, reuse and ring wrap."""
    tok = len(posted)

    def more(n: int) -> None:
        nonlocal tok
        new = list(range(tok, tok + n))
        tok += n
        posted.extend(new)
        post(pair, new)

    more(5)
    a = vq.pop_batch()
    complete(vq, a, [3, 0])
    done.extend(t for t, _ in pair.driver.get_used())  # type: ignore[misc]
    more(3)
    b = vq.pop_batch()
    complete(vq, a + b, [1, 5, 6])
    done.extend(t for t, _ in pair.driver.get_used())  # type: ignore[misc]
    more(2)
    c = vq.pop_batch()
    complete(vq, a + b + c, [2, 4, 7, 8, 9])


def run_to_completion(pair: QueuePair, mv: memoryview, done: list[int], posted: list[int]) -> None:
    vq, _ = start(pair, mv)
    for _ in range(20):
        chains = vq.pop_batch()
        if not chains:
            break
        complete(vq, chains, list(range(len(chains))[::-1]))
        done.extend(t for t, _ in pair.driver.get_used())  # type: ignore[misc]
    assert vq.in_flight == 0


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("policy", ["lazy", "eager"])
def test_a_crash_at_any_region_store_loses_and_duplicates_nothing(ring: str, policy: str) -> None:
    # how many stores does the scenario make?
    pair, mv = new_pair(ring, policy=policy)
    vq, _ = start(pair, mv, policy=policy)
    budget = [10**9]
    for name in ("b", "h", "q") + (("i32",) if pair.packed else ()):
        setattr(vq.tracker, name, CrashingView(getattr(vq.tracker, name), budget))
    scenario(pair, vq, [], [])
    total = 10**9 - budget[0]
    assert total > 20

    for n in range(total + 1):
        pair, mv = new_pair(ring, policy=policy)
        posted: list[int] = []
        vq, _ = start(pair, mv, policy=policy)
        budget = [n]
        for name in ("b", "h", "q") + (("i32",) if pair.packed else ()):
            setattr(vq.tracker, name, CrashingView(getattr(vq.tracker, name), budget))
        done: list[int] = []
        try:
            scenario(pair, vq, posted, done)
        except Crash:
            pass
        done.extend(t for t, _ in pair.driver.get_used())  # type: ignore[misc]
        del vq
        run_to_completion(pair, mv, done, posted)
        assert sorted(done) == sorted(posted), f"crash after {n} stores: completed {sorted(done)} of {posted}"
        assert len(done) == len(set(done)), f"crash after {n} stores: duplicate completions"


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_two_crashes_in_a_row_keep_the_fetch_order(ring: str) -> None:
    pair, mv = new_pair(ring)
    vq, _ = start(pair, mv)
    post(pair, list(range(5)))
    chains = vq.pop_batch()
    complete(vq, chains, [2])
    pair.driver.get_used()
    order = [chains[i].id for i in (0, 1, 3, 4)]
    del vq
    vq2, _ = start(pair, mv)
    again = vq2.pop_batch()
    assert [c.id for c in again] == order
    complete(vq2, again, [3])        # one of the resubmitted ones completes, then another crash
    post(pair, [5])
    del vq2
    vq3, t3 = start(pair, mv)
    assert t3.resubmitted == 3
    third = vq3.pop_batch()
    assert [c.id for c in third] == order[:3]
    new = vq3.pop_batch()
    complete(vq3, third + new, [0, 1, 2, 3])
    assert sorted(t for t, _ in pair.driver.get_used()) == [0, 1, 3, 4, 5]


# --- the shared buffer ---------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True])
def test_region_sizes_follow_the_spec_layouts(packed: bool) -> None:
    assert queue_region_size(128, False) == (16 + 16 * 128 + 63) & ~63   # header + entries, 64-aligned
    assert queue_region_size(128, True) == (32 + 32 * 128 + 63) & ~63
    assert queue_region_size(1, packed) == 64
    region = InflightRegion.allocate(4, 128, packed)
    try:
        assert region.mmap_size == 4 * queue_region_size(128, packed)
        assert os.fstat(region.fd).st_size == region.mmap_size
        assert bytes(region.mv) == bytes(region.mmap_size)  # zeroed
        assert len(region.queue(3)) == queue_region_size(128, packed)
        with pytest.raises(IndexError):
            region.queue(4)
    finally:
        region.close()


def test_a_buffer_too_small_for_its_queues_is_refused() -> None:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(ValueError):
            InflightRegion(fd, 4096, 0, 2, 256, False)    # needs 2 x 4160
        with pytest.raises(ValueError):
            InflightRegion(fd, 8192, 0, 1, 128, False)    # fd smaller than mmap_size
    finally:
        os.close(fd)


def test_a_ring_that_does_not_match_the_buffer_runs_untracked() -> None:
    region = InflightRegion.allocate(1, 128, False)
    try:
        pair = QueuePair("split", size=64)
        assert region.tracker(0, 64, False, pair.mem, pair.desc) is None      # other size
        assert region.tracker(0, 128, True, pair.mem, pair.desc) is None      # other layout
        assert region.tracker(1, 128, False, pair.mem, pair.desc) is None     # no such queue
        assert isinstance(region.tracker(0, 128, False, pair.mem, pair.desc), SplitTracker)
    finally:
        region.close()
