"""The hostile-driver catalogue of reference/virtqueue.md section 4, rows 1-39.

Each test drives the device queue with the driver model (`QueuePair`) for
the well-behaved part and raw writes into guest memory (`pair.raw`) for the
hostile part, then asserts the reaction the catalogue asks for. A fatal
case must:

- raise the `QueueError` subclass named for the guest behaviour;
- retire the queue: `pop_batch` returns [] afterwards and `arm()` returns
  False, so a device loop sleeps instead of spinning;
- leave every other queue on the same memory working;
- write nothing but the device area while failing (in particular nothing
  into a device-readable buffer);
- still let the device complete the chains it took before the bad entry;
- finish before a deadline (a hang or a spin fails the test).

Catalogue row numbers are in each test's docstring.
"""

from __future__ import annotations

import dataclasses
import signal
import struct
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from pyvirtio.driver import PackedDriver, SplitDriver, ring_layout
from pyvirtio.memory import (
    AccessCounter,
    AreaKind,
    CountingArea,
    CountingMemory,
    GuestMemory,
    GuestMemoryError,
    Region,
)
from pyvirtio.queue import (
    ArmResult,
    AvailIndexJump,
    BadBufferAddress,
    BadIndirectTable,
    ChainTooLarge,
    ChainTooLong,
    DescriptorIndexOutOfRange,
    HeadOutOfRange,
    IndirectInList,
    IndirectNotNegotiated,
    IndirectWithNext,
    InvalidQueueGeometry,
    InvalidSavedState,
    NestedIndirect,
    QueueError,
    QueueState,
    ReadableAfterWritable,
    TooManyInFlight,
    Virtqueue,
)
from pyvirtio.spec import (
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    EVENT_FLAGS,
    EVENT_OFF_WRAP,
    PACKED_DESC,
    PACKED_FLAGS,
    SPLIT_DESC,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    EventFlags,
    Feature,
    avail_event_offset,
    packed_need_event,
    used_event_offset,
    used_size,
    vring_need_event,
)
from pyvirtio.testing import QueuePair

NEXT, WRITE, INDIRECT = 0x1, 0x2, 0x4
P_AVAIL, P_USED = 1 << 7, 1 << 15
MEM_SIZE = 1 << 20  # QueuePair's default guest memory
DEADLINE_S = 10.0
RINGS = ["split", "packed"]
#: how the device fetches: the lazy `pop_batch`, the eager baseline, and
#: the vectorised `pop_bulk` fast path (a separate reader of the same guest data)
MODES = ["lazy", "eager", "bulk"]


class Hang(Exception):
    """The device did not return within the deadline (hang or spin)."""


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"test exceeded {DEADLINE_S}s: the device hangs or spins")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- raw guest-memory helpers -----------------------------------------------------------


def rd16(mem: GuestMemory, gpa: int) -> int:
    return int.from_bytes(mem.read(gpa, 2), "little")


def wr16(mem: GuestMemory, gpa: int, v: int) -> None:
    mem.write(gpa, (v & 0xFFFF).to_bytes(2, "little"))


def wr32(mem: GuestMemory, gpa: int, v: int) -> None:
    mem.write(gpa, (v & 0xFFFFFFFF).to_bytes(4, "little"))


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 37 + i * 11 + 1) & 0xFF for i in range(n))


def is_bulk(x: object) -> bool:
    return hasattr(x, "chains") and hasattr(x, "n")


class OtherQueue:
    """A second, well-behaved queue on the same guest memory."""

    SIZE = 4

    def __init__(self, pair: QueuePair) -> None:
        self.pool = pair.pool
        self.raw = pair.raw
        base = pair.pool.alloc(0x800)
        desc, drv, dev, end = ring_layout(pair.packed, self.SIZE, base)
        assert end <= base + 0x800
        cls = PackedDriver if pair.packed else SplitDriver
        self.driver = cls(pair.raw, self.SIZE, desc, drv, dev, pool=pair.pool)
        features = Feature.VERSION_1 | (Feature.RING_PACKED if pair.packed else 0)
        self.vq = Virtqueue(pair.mem, self.SIZE, desc, drv, dev, features=int(features), name="other")
        self.rounds = 0

    def roundtrip(self) -> None:
        self.rounds += 1
        o, i = self.pool.alloc(8), self.pool.alloc(8)
        msg = b"ping%04d" % self.rounds
        self.raw.write(o, msg)
        self.driver.add([(o, 8)], [(i, 8)], token=("other", self.rounds))
        self.driver.publish()
        (c,) = self.vq.pop_batch()
        assert c.read() == msg
        assert c.write(b"pong") == 4
        self.vq.complete(c, 4)
        self.vq.flush()
        assert self.driver.get_used() == [(("other", self.rounds), 4)]
        assert self.raw.read(i, 4) == b"pong"


class Rig:
    """A `QueuePair`, a second queue on its memory, and a hostile driver's pen.

    Good requests go through the driver model; hostile ones are written raw:
    split descriptors are taken from the top of the table (the driver model
    allocates from the bottom), packed lists at the driver's next slot.
    """

    def __init__(self, ring: str, size: int = 8, *, event_idx: bool = False, indirect: bool = True,
                 mode: str = "lazy", start_index: int = 0) -> None:
        self.mode = mode
        self.pair = QueuePair(ring, size, event_idx=event_idx, indirect=indirect,
                              policy="eager" if mode == "eager" else "lazy", start_index=start_index)
        if start_index and self.pair.packed:
            slot, wrap = start_index % size, not (start_index // size) & 1
            self.pair.vq = self.pair.new_device(QueueState(size, True, slot, wrap, slot, wrap, ()))
        self.packed = self.pair.packed
        self.last_kick: bool | None = None
        self._bulk = None
        self.size = size
        self.raw = self.pair.raw
        self.other = OtherQueue(self.pair)
        self.good: list[tuple[object, int, bytes, int, int]] = []  # token, out gpa, data, in gpa, in len
        self._top = size - 1
        self._pslot: int | None = None
        self._pwrap = 1

    @property
    def vq(self) -> Virtqueue:
        return self.pair.vq

    # -- device side --------------------------------------------------------------------

    def pop(self, limit: int = 64) -> list:
        """One fetch in this rig's mode; a `Bulk` comes back as its chains
        (complete them all at once with `complete`)."""
        if self.mode == "bulk":
            got = self.vq.pop_bulk(limit)
            if is_bulk(got):
                self._bulk = got
                return list(got.chains())
            return list(got)
        return self.vq.pop_batch(limit)

    def complete(self, chains: list, written: Callable[[object], int] | None = None) -> bool:
        """Complete `chains` (all of the last pop if it was a `Bulk`) and flush."""
        notify = False
        bulk, self._bulk = self._bulk, None
        if bulk is not None:
            w = np.array([written(c) if written else 0 for c in chains], np.uint32)
            notify = self.vq.complete_bulk(bulk, w)
            return self.vq.flush() | notify
        for c in chains:
            n = written(c) if written else 0
            notify |= self.vq.complete(c, n)
        return self.vq.flush() | notify

    # -- guest memory ------------------------------------------------------------------

    def buf(self, n: int, seed: int = 7) -> int:
        gpa = self.pair.pool.alloc(max(n, 1))
        self.raw.write(gpa, pattern(seed, max(n, 1)))
        return gpa

    def snapshot(self) -> dict[int, bytes]:
        return {r.gpa: bytes(r.mv) for r in self.raw.regions if r.size <= 16 << 20}

    def device_area_spans(self) -> list[tuple[int, int]]:
        p = self.pair
        if self.packed:
            return [(p.device_area, p.device_area + 4)]
        return [(p.device_area, p.device_area + used_size(self.size))]

    def changed_outside(self, before: dict[int, bytes], allowed: list[tuple[int, int]]) -> list[int]:
        """Guest addresses changed since `before` that lie outside `allowed`."""
        bad: list[int] = []
        for gpa, old in before.items():
            new = bytes(self.raw.view(gpa, len(old)))
            if new == old:
                continue
            diff = np.flatnonzero(np.frombuffer(old, np.uint8) != np.frombuffer(new, np.uint8)) + gpa
            for a in diff.tolist():
                if not any(lo <= a < hi for lo, hi in allowed):
                    bad.append(a)
        return bad

    # -- a good request ----------------------------------------------------------------

    def post_good(self, n: int = 1) -> list[object]:
        tokens = []
        for _ in range(n):
            k = len(self.good)
            token = ("good", k)
            data = pattern(100 + k, 16)
            o = self.buf(16, 100 + k)
            i = self.buf(32, 200 + k)
            self.pair.driver.add([(o, 16)], [(i, 32)], token=token, indirect=False)
            self.good.append((token, o, data, i, 32))
            tokens.append(token)
        self.last_kick = self.pair.driver.publish()
        return tokens

    # -- hostile split ring --------------------------------------------------------------

    def take_desc(self, n: int = 1) -> list[int]:
        out = list(range(self._top, self._top - n, -1))
        self._top -= n
        return out

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.raw.write(self.pair.desc + 16 * i, SPLIT_DESC.pack(addr, length, flags, nxt))

    def push(self, *heads: int) -> None:
        """Append heads to the available ring and move avail.idx past them."""
        p = self.pair
        idx = rd16(self.raw, p.driver_area + AVAIL_IDX)
        for h in heads:
            wr16(self.raw, p.driver_area + AVAIL_RING + 2 * (idx % self.size), h)
            idx = (idx + 1) & 0xFFFF
        wr16(self.raw, p.driver_area + AVAIL_IDX, idx)

    def chain(self, segs: list[tuple[int, int, int]]) -> int:
        """A split chain of (addr, len, flags) linked with NEXT; returns its head."""
        ids = self.take_desc(len(segs))
        for k, (addr, ln, fl) in enumerate(segs):
            if k + 1 < len(segs):
                self.desc(ids[k], addr, ln, fl | NEXT, ids[k + 1])
            else:
                self.desc(ids[k], addr, ln, fl, 0)
        return ids[0]

    def table(self, entries: list[tuple[int, int, int, int]]) -> int:
        """An indirect table of (addr, len, flags, next-or-id) records; returns its gpa."""
        st = PACKED_DESC if self.packed else SPLIT_DESC
        data = b"".join(st.pack(a, ln, f, x) if not self.packed else st.pack(a, ln, x, f)
                        for a, ln, f, x in entries)
        gpa = self.pair.pool.alloc(max(len(data), 16))
        self.raw.write(gpa, data)
        return gpa

    def linked_table(self, segs: list[tuple[int, int, int]]) -> int:
        """A split indirect table of (addr, len, flags) linked 0->1->2..."""
        n = len(segs)
        return self.table([(a, ln, fl | (NEXT if k + 1 < n else 0), k + 1 if k + 1 < n else 0)
                           for k, (a, ln, fl) in enumerate(segs)])

    # -- hostile packed ring -------------------------------------------------------------

    def push_list(self, descs: list[tuple[int, int, int, int]], *, raw_flags: bool = False) -> int:
        """Write a packed list of (addr, len, id, flags) at the next free slot
        with this lap's AVAIL bits (unless `raw_flags`), head flags last.
        Returns the first slot."""
        drv = self.pair.driver
        assert isinstance(drv, PackedDriver)
        if self._pslot is None:
            self._pslot, self._pwrap = drv.next_avail, drv.avail_wrap
        first = slot = self._pslot
        wrap = self._pwrap
        writes = []
        for addr, ln, bid, fl in descs:
            bits = 0 if raw_flags else (P_AVAIL if wrap else P_USED)
            writes.append((slot, PACKED_DESC.pack(addr, ln, bid, fl | bits)))
            slot += 1
            if slot == self.size:
                slot, wrap = 0, wrap ^ 1
        for s, b in writes[1:]:
            self.raw.write(self.pair.desc + 16 * s, b)
        s, b = writes[0]
        self.raw.write(self.pair.desc + 16 * s, b)
        self._pslot, self._pwrap = slot, wrap
        return first

    # -- either format -------------------------------------------------------------------

    def post_hostile(self, segs: list[tuple[int, int, int]], bid: int = 5) -> None:
        """One hostile buffer of (addr, len, flags) descriptors, direct."""
        if self.packed:
            n = len(segs)
            self.push_list([(a, ln, bid, fl | (NEXT if k + 1 < n else 0))
                            for k, (a, ln, fl) in enumerate(segs)])
        else:
            self.push(self.chain(segs))

    def post_indirect(self, table_gpa: int, table_len: int, flags: int = 0, bid: int = 5) -> None:
        """One hostile buffer whose single descriptor points at a table."""
        if self.packed:
            self.push_list([(table_gpa, table_len, bid, INDIRECT | flags)])
        else:
            (d,) = self.take_desc()
            self.desc(d, table_gpa, table_len, INDIRECT | flags)
            self.push(d)


def expect_retired(rig: Rig, exc_type: type[QueueError] | tuple[type[QueueError], ...], *,
                   taken: list | None = None, good: list[object] | None = None,
                   exact: bool = True) -> QueueError:
    """Fetch until the queue fails, then check everything a fatal case owes.

    `taken`: chains popped before the hostile write; `good`: tokens of the
    well-behaved requests that must be taken and still complete (with
    `exact=False`, that may be taken: those taken must complete).
    """
    vq = rig.vq
    before = rig.snapshot()
    got = list(taken or [])
    err: QueueError | None = None
    for _ in range(4):
        try:
            got += rig.pop()
        except QueueError as e:
            err = e
            break
    assert isinstance(err, exc_type), f"expected {exc_type.__name__}, got {err!r}"
    assert vq.failed is err
    # retired: no more work, no spin
    for _ in range(3):
        assert rig.pop() == []
        assert vq.arm() is ArmResult.SLEEP
        assert vq.has_work() is False
    # failing wrote nothing but the device area (no device-readable buffer touched)
    assert rig.changed_outside(before, rig.device_area_spans()) == []
    # chains taken before the bad entry are still completable
    good = list(good or [])
    assert len(got) == len(good) if exact else len(got) <= len(good)
    by_out = {o: (tok, data, i, n) for tok, o, data, i, n in rig.good}
    before = rig.snapshot()
    allowed = rig.device_area_spans()
    done = []
    for c in got:
        data = c.read()
        match = [v for v in by_out.values() if v[1] == data]
        assert match, f"chain {c!r} does not carry a good request's data"
        tok, _d, i, n = match[0]
        assert tok in good
        done.append(tok)
        assert c.write(b"R" * n) == n
        allowed.append((i, i + n))
        vq.complete(c, n)
    vq.flush()
    if rig.packed:
        p = rig.pair
        allowed.append((p.desc, p.desc + 16 * rig.size))
    assert rig.changed_outside(before, allowed) == []
    if good:
        reaped = rig.pair.driver.get_used()
        assert sorted(map(repr, reaped)) == sorted(repr((t, 32)) for t in done)
    # the other queue on the same memory is unaffected
    rig.other.roundtrip()
    rig.other.roundtrip()
    return err


def take_good(rig: Rig, n: int = 1) -> tuple[list, list[object]]:
    """Post `n` good requests and let the device take them."""
    good = rig.post_good(n)
    taken = rig.pop()
    assert len(taken) == n
    return taken, good


# =====================================================================================
# rows 1-7: chain structure and the available ring
# =====================================================================================


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ["two_cycle", "self_loop", "in_indirect_table"])
def test_split_next_cycle_retires_queue_with_chain_too_long(mode: str, shape: str) -> None:
    """Row 1: a `next` cycle is fatal (ChainTooLong), never an endless walk."""
    rig = Rig("split", mode=mode)
    good = rig.post_good()
    b = rig.buf(16)
    if shape == "two_cycle":
        x, y = rig.take_desc(2)
        rig.desc(x, b, 16, NEXT, y)
        rig.desc(y, b, 16, NEXT, x)
        rig.push(x)
    elif shape == "self_loop":
        (x,) = rig.take_desc()
        rig.desc(x, b, 16, NEXT, x)
        rig.push(x)
    else:
        t = rig.table([(b, 16, NEXT, 1), (b, 16, NEXT, 2), (b, 16, NEXT, 0)])
        rig.post_indirect(t, 48)
    expect_retired(rig, ChainTooLong, good=good)


@pytest.mark.parametrize("mode", MODES)
def test_split_chain_of_exactly_queue_size_descriptors_is_accepted(mode: str) -> None:
    """Row 2: a chain of exactly Q descriptors is legal (direct, and direct+indirect)."""
    q = 8
    rig = Rig("split", q, mode=mode)
    bufs = [rig.buf(8, k) for k in range(q)]
    order = [3, 0, 7, 1, 6, 2, 5, 4]  # every descriptor of the table, shuffled
    for k, d in enumerate(order):
        last = k + 1 == q
        rig.desc(d, bufs[k], 8, 0 if last else NEXT, 0 if last else order[k + 1])
    rig.push(order[0])
    (c,) = rig.pop()
    assert len(c.readable) == q and c.readable_len == 8 * q
    assert c.read() == b"".join(pattern(k, 8) for k in range(q))
    rig.complete([c])
    # one direct descriptor + an indirect table of Q-1: Q descriptors in all
    rig2 = Rig("split", q, mode=mode)
    b = rig2.buf(8)
    t = rig2.linked_table([(b, 8, 0)] * (q - 1))
    (d0, d1) = rig2.take_desc(2)
    rig2.desc(d0, b, 8, NEXT, d1)
    rig2.desc(d1, t, 16 * (q - 1), INDIRECT)
    rig2.push(d0)
    (c,) = rig2.pop()
    assert c.readable_len == 8 * q
    assert rig2.vq.failed is None


@pytest.mark.parametrize("mode", MODES)
def test_split_chain_longer_than_queue_size_retires_queue_with_chain_too_long(mode: str) -> None:
    """Row 2: an acyclic chain of Q+1 descriptors (direct ones plus an
    indirect table) is fatal."""
    q = 8
    rig = Rig("split", q, mode=mode)
    good = rig.post_good()
    b = rig.buf(8)
    t = rig.linked_table([(b, 8, 0)] * (q - 1))
    rig.push(rig.chain([(b, 8, 0), (b, 8, 0), (t, 16 * (q - 1), INDIRECT)]))
    expect_retired(rig, ChainTooLong, good=good)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["table_next_eq_q", "table_next_ffff", "indirect_next_eq_entries"])
def test_split_next_out_of_range_retires_queue(mode: str, where: str) -> None:
    """Row 3: `next` >= Q, or >= entries inside an indirect table, is fatal."""
    rig = Rig("split", mode=mode)
    good = rig.post_good()
    b = rig.buf(16)
    if where == "indirect_next_eq_entries":
        t = rig.table([(b, 16, NEXT, 1), (b, 16, NEXT, 2)])
        rig.post_indirect(t, 32)
    else:
        (x,) = rig.take_desc()
        rig.desc(x, b, 16, NEXT, rig.size if where == "table_next_eq_q" else 0xFFFF)
        rig.push(x)
    expect_retired(rig, DescriptorIndexOutOfRange, good=good)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", [8, 9, 0x7FFF, 0xFFFF])
def test_split_head_out_of_range_retires_queue(mode: str, head: int) -> None:
    """Row 4: an available-ring entry naming a head >= Q is fatal (HeadOutOfRange)."""
    rig = Rig("split", 8, mode=mode)
    good = rig.post_good()
    rig.push(head)
    expect_retired(rig, HeadOutOfRange, good=good)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("move", ["forward_q_plus_1", "forward_half_ring", "backwards_1",
                                  "backwards_below_the_seen_index"])
def test_split_avail_idx_jump_retires_queue(mode: str, move: str) -> None:
    """Row 5: avail.idx advanced by more than Q, or moved backwards, is fatal."""
    rig = Rig("split", 8, mode=mode)
    p = rig.pair
    taken: list = []
    good: list[object] = []
    if move == "backwards_below_the_seen_index":
        good = rig.post_good(3)
        taken = rig.pop(limit=1)  # the device has seen idx 3 and taken one
        wr16(rig.raw, p.driver_area + AVAIL_IDX, 1)
    else:
        t, good = take_good(rig)
        taken += t
        idx = rd16(rig.raw, p.driver_area + AVAIL_IDX)
        new = {"forward_q_plus_1": idx + rig.size + 1, "forward_half_ring": idx + 0x8000,
               "backwards_1": idx - 1}[move]
        wr16(rig.raw, p.driver_area + AVAIL_IDX, new)
    # entries the device saw before the index went back may or may not be
    # taken (a cached index vs. a reload per chain); those taken complete
    expect_retired(rig, AvailIndexJump, taken=taken, good=good,
                   exact=move != "backwards_below_the_seen_index")


@pytest.mark.parametrize("found_by", ["arm", "has_work"])
@pytest.mark.parametrize("ring", RINGS)
def test_violation_found_while_arming_or_peeking_is_reported_once_then_the_queue_sleeps(
        found_by: str, ring: str) -> None:
    """Rows 5/31: a violation first seen by the arm() re-check or by
    has_work() is not lost: the call says "work" once, the next pop_batch
    raises it, and from then on the queue sleeps (arm() False, no spin)."""
    rig = Rig(ring, 4)
    taken, good = take_good(rig, 2 if ring == "packed" else 1)
    assert rig.pop() == []
    if ring == "split":
        idx = rd16(rig.raw, rig.pair.driver_area + AVAIL_IDX)
        wr16(rig.raw, rig.pair.driver_area + AVAIL_IDX, idx + 7)  # jump by more than Q
        exc: type[QueueError] = AvailIndexJump
    else:
        rig.push_list([(rig.buf(8), 8, 0, 0)])  # every slot is in flight: a re-stamp
        exc = TooManyInFlight
    if found_by == "arm":
        assert rig.vq.arm() is ArmResult.WORK
    else:
        assert rig.vq.has_work() is True
    expect_retired(rig, exc, taken=taken, good=good)


@pytest.mark.parametrize("mode", MODES)
def test_split_heads_reposted_beyond_queue_size_retire_queue_with_too_many_in_flight(mode: str) -> None:
    """Row 6: more than Q chains in flight (heads re-posted while the device
    holds them) is fatal; the Q chains already taken still complete."""
    rig = Rig("split", 4, mode=mode)
    good = rig.post_good(2)  # 2 descriptors each: the whole table
    taken = rig.pop()
    assert len(taken) == 2
    rig.push(0, 2, 0)  # heads the device holds: 5 chains would be in flight on a ring of 4
    expect_retired(rig, TooManyInFlight, taken=taken, good=good)


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_split_head_reposted_once_in_flight_is_tolerated_and_echoed(mode: str) -> None:
    """Row 7: one head re-posted while in flight (below the bound) is not an
    error: both entries are handed out and both completions are published."""
    rig = Rig("split", 8, mode=mode)
    rig.post_good()
    rig.push(0)  # the good request's head once more
    chains = rig.pop()
    assert [c.id for c in chains] == [0, 0]
    assert chains[0] is not chains[1]
    rig.complete(chains[::-1], written=lambda c: 0)
    p = rig.pair
    assert rd16(rig.raw, p.device_area + USED_IDX) == 2
    elems = struct.unpack("<4I", rig.raw.read(p.device_area + USED_RING, 16))
    assert elems == (0, 0, 0, 0)
    assert rig.vq.failed is None
    rig.other.roundtrip()


# =====================================================================================
# rows 8-17: indirect descriptors and lists
# =====================================================================================


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_indirect_without_feature_retires_queue(ring: str, mode: str) -> None:
    """Row 8: INDIRECT used although VIRTIO_F_INDIRECT_DESC was not negotiated."""
    rig = Rig(ring, indirect=False, mode=mode)
    good = rig.post_good()
    b = rig.buf(16)
    t = rig.table([(b, 16, 0, 0)])
    rig.post_indirect(t, 16)
    expect_retired(rig, IndirectNotNegotiated, good=good)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_nested_indirect_table_retires_queue(ring: str, mode: str) -> None:
    """Row 9: an INDIRECT descriptor inside an indirect table is fatal."""
    rig = Rig(ring, mode=mode)
    good = rig.post_good()
    b = rig.buf(16)
    inner = rig.table([(b, 16, 0, 0)])
    if ring == "split":
        t = rig.table([(b, 16, NEXT, 1), (inner, 16, INDIRECT, 0)])
    else:
        t = rig.table([(b, 16, 0, 0), (inner, 16, INDIRECT, 0)])
    rig.post_indirect(t, 32)
    expect_retired(rig, NestedIndirect, good=good)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_indirect_with_next_retires_queue(ring: str, mode: str) -> None:
    """Row 10: INDIRECT and NEXT on one descriptor is fatal."""
    rig = Rig(ring, mode=mode)
    good = rig.post_good()
    b = rig.buf(16)
    t = rig.table([(b, 16, 0, 0)])
    rig.post_hostile([(t, 16, INDIRECT), (b, 16, 0)])  # post_hostile adds NEXT to the first
    expect_retired(rig, IndirectWithNext, good=good)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("length", [8, 24, 17, 0xFFFFFFFF], ids=lambda v: f"len{v}")
def test_indirect_length_not_a_multiple_of_16_retires_queue(ring: str, mode: str, length: int) -> None:
    """Row 11: indirect `len` not a multiple of 16 is fatal."""
    rig = Rig(ring, mode=mode)
    good = rig.post_good()
    b = rig.buf(16)
    t = rig.table([(b, 16, 0, 0), (b, 16, 0, 0)])
    rig.post_indirect(t, length)
    expect_retired(rig, BadIndirectTable, good=good)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_indirect_length_zero_retires_queue(ring: str, mode: str) -> None:
    """Row 12: an empty indirect table is fatal."""
    rig = Rig(ring, mode=mode)
    good = rig.post_good()
    rig.post_indirect(rig.buf(16), 0)
    expect_retired(rig, BadIndirectTable, good=good)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("entries", [9, 64, 0xFFFFFFF0 // 16], ids=lambda v: f"{v}entries")
def test_indirect_table_larger_than_queue_retires_queue(ring: str, mode: str, entries: int) -> None:
    """Row 13: an indirect table of more than Q entries (up to a 4 GiB one)
    is fatal, and refused before it is read or allocated."""
    rig = Rig(ring, 8, mode=mode)
    good = rig.post_good()
    b = rig.buf(16)
    t = rig.table([(b, 16, 0, 0)] * min(entries, 64))
    rig.post_indirect(t, 16 * entries)
    expect_retired(rig, BadIndirectTable, good=good)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_indirect_table_of_exactly_queue_size_entries_is_accepted(ring: str, mode: str) -> None:
    """Rows 13/24: seg_max = Q is the largest table; it works."""
    q = 8
    rig = Rig(ring, q, mode=mode)
    bufs = [rig.buf(4, k) for k in range(q)]
    if ring == "split":
        t = rig.linked_table([(x, 4, 0) for x in bufs])
    else:
        t = rig.table([(x, 4, 0, 0) for x in bufs])
    rig.post_indirect(t, 16 * q)
    (c,) = rig.pop()
    assert len(c.readable) == q
    assert c.read() == b"".join(pattern(k, 4) for k in range(q))
    rig.complete([c])


def add_adjacent_region(rig: Rig, size: int = 0x10000) -> tuple[int, bytearray]:
    """A second memory region right after the first (gpa MEM_SIZE), and a
    hole after it."""
    backing = bytearray(size)
    rig.raw.add(Region.from_buffer(backing, MEM_SIZE))
    return MEM_SIZE, backing


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_indirect_table_straddling_two_regions_is_read_across_them(ring: str, mode: str) -> None:
    """Row 14: a table spanning two memory regions is read in pieces, correctly."""
    rig = Rig(ring, mode=mode)
    base, _ = add_adjacent_region(rig)
    bufs = [rig.buf(8, k) for k in range(3)]
    if ring == "split":
        recs = [SPLIT_DESC.pack(bufs[0], 8, NEXT, 1), SPLIT_DESC.pack(bufs[1], 8, NEXT, 2),
                SPLIT_DESC.pack(bufs[2], 8, WRITE, 0)]
    else:
        recs = [PACKED_DESC.pack(bufs[0], 8, 0, 0), PACKED_DESC.pack(bufs[1], 8, 0, 0),
                PACKED_DESC.pack(bufs[2], 8, 0, WRITE)]
    t = base - 24  # the second record straddles the boundary
    rig.raw.write(t, b"".join(recs))
    rig.post_indirect(t, 48)
    (c,) = rig.pop()
    assert c.read() == pattern(0, 8) + pattern(1, 8)
    assert c.writable_len == 8
    assert c.write(b"W" * 8) == 8
    rig.complete([c], written=lambda c: 8)
    assert rig.raw.read(bufs[2], 8) == b"W" * 8


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_indirect_table_running_into_a_memory_hole_retires_queue(ring: str, mode: str) -> None:
    """Row 14: a table whose tail is not guest memory is fatal (BadBufferAddress)."""
    rig = Rig(ring, mode=mode)
    good = rig.post_good()
    t = MEM_SIZE - 16
    b = rig.buf(8)
    st = SPLIT_DESC if ring == "split" else PACKED_DESC
    rig.raw.write(t, st.pack(b, 8, 0, 0))
    rig.post_indirect(t, 48)
    expect_retired(rig, BadBufferAddress, good=good)


class MutatingMemory(CountingMemory):
    """The device's view of guest memory, for a driver that rewrites what the
    device just read (a double-fetch attack): after every device read of a
    descriptor, an avail-ring entry or an indirect table, the bytes read are
    changed in guest memory to other *valid-looking* values.
    """

    def __init__(self, inner: GuestMemory, *, packed: bool, size: int) -> None:
        super().__init__(inner)
        self.packed = packed
        self.qsize = size
        self.mutations = 0

    def area(self, kind: AreaKind, gpa: int, size: int, align: int = 1):  # type: ignore[override]
        if align > 1 and gpa % align:
            raise GuestMemoryError(f"{kind.value} area at {gpa:#x} is not {align}-byte aligned", gpa, size)
        return _MutatingArea(kind, gpa, self.view(gpa, size), self.counters[kind], self)

    def read(self, gpa: int, length: int, kind: AreaKind = AreaKind.PAYLOAD) -> bytes:
        data = super().read(gpa, length, kind)
        if kind is AreaKind.INDIRECT:
            self.mutate_records(gpa, gpa, length)
        return data

    def mutate_records(self, base: int, gpa: int, length: int) -> None:
        """Rewrite the 16-byte records of the table at `base` that lie in
        [gpa, gpa+length): shift addr and len, flip WRITE, change next/id.
        A 2-byte read of packed flags flips WRITE and NEXT there."""
        inner = self.inner
        if length == 2 and self.packed and (gpa - base) % 16 == PACKED_FLAGS:
            (fl,) = struct.unpack("<H", inner.read(gpa, 2))
            inner.write(gpa, struct.pack("<H", fl ^ (WRITE | NEXT)))
            self.mutations += 1
            return
        first = base + -(-(gpa - base) // 16) * 16
        for rec in range(first, gpa + length - 15, 16):
            a, ln, x, y = SPLIT_DESC.unpack(inner.read(rec, 16))
            if self.packed:  # x = id, y = flags
                new = SPLIT_DESC.pack(a + 16, ln + 16, x ^ 1, y ^ WRITE)
            else:  # x = flags, y = next
                new = SPLIT_DESC.pack(a + 16, ln + 16, x ^ WRITE, (y + 1) % self.qsize)
            inner.write(rec, new)
            self.mutations += 1

    def mutate_heads(self, area_gpa: int, off: int, length: int) -> None:
        lo = max(off, AVAIL_RING)
        hi = min(off + length, AVAIL_RING + 2 * self.qsize)
        for o in range(lo - lo % 2, hi, 2):
            h = rd16(self.inner, area_gpa + o)
            wr16(self.inner, area_gpa + o, h ^ 1)
            self.mutations += 1

    def after_read(self, area: CountingArea, spans: list[tuple[int, int]]) -> None:
        for off, length in spans:
            if area.kind is AreaKind.DESC:
                self.mutate_records(area.gpa, area.gpa + off, length)
            elif area.kind is AreaKind.AVAIL and not self.packed:
                self.mutate_heads(area.gpa, off, length)


class _MutatingArea(CountingArea):
    __slots__ = ("owner",)

    def __init__(self, kind: AreaKind, gpa: int, mv: memoryview, counter: AccessCounter,
                 owner: MutatingMemory) -> None:
        super().__init__(kind, gpa, mv, counter)
        self.owner = owner

    def load16(self, off):  # type: ignore[no-untyped-def]
        v = super().load16(off)
        self.owner.after_read(self, [(off, 2)])
        return v

    def load16s(self, off, count):  # type: ignore[no-untyped-def]
        v = super().load16s(off, count)
        self.owner.after_read(self, [(off, 2 * count)])
        return v

    def np_load16s(self, off, count):  # type: ignore[no-untyped-def]
        v = super().np_load16s(off, count)
        self.owner.after_read(self, [(off, 2 * count)])
        return v

    def unpack(self, st, off):  # type: ignore[no-untyped-def]
        v = super().unpack(st, off)
        self.owner.after_read(self, [(off, st.size)])
        return v

    def unpack_many(self, st, offsets):  # type: ignore[no-untyped-def]
        v = super().unpack_many(st, offsets)
        self.owner.after_read(self, [(o, st.size) for o in offsets])
        return v

    def np_gather(self, dtype, index):  # type: ignore[no-untyped-def]
        v = super().np_gather(dtype, index)
        self.owner.after_read(self, [(int(i) * dtype.itemsize, dtype.itemsize) for i in index])
        return v

    def read(self, off, length):  # type: ignore[no-untyped-def]
        v = super().read(off, length)
        self.owner.after_read(self, [(off, length)])
        return v

    def packed_scan(self, slot, want, q, limit, budget, chunk, lists, count_lists, out):  # type: ignore[no-untyped-def]
        # the C flag scan: the slots it read, consecutive from `slot`
        v = super().packed_scan(slot, want, q, limit, budget, chunk, lists, count_lists, out)
        self.owner.after_read(self, [(((slot + i) % q) * 16 + 14, 2) for i in range(v[1])])
        return v

    def packed_bodies(self, start, n, q, out, flags):  # type: ignore[no-untyped-def]
        v = super().packed_bodies(start, n, q, out, flags)
        first = min(n, q - start)
        self.owner.after_read(self, [(start * 16, first * 16)] + ([(0, (n - first) * 16)] if n > first else []))
        return v

    def gather_split(self, desc, start, n, q, heads, descs):  # type: ignore[no-untyped-def]
        # the C batch scan: every head it read, then every descriptor
        v = super().gather_split(desc, start, n, q, heads, descs)
        self.owner.after_read(self, [(AVAIL_RING + 2 * ((start + i) % q), 2) for i in range(n)])
        if v[0] < 0:
            self.owner.after_read(desc, [(int(h) * 16, 16) for h in np.frombuffer(heads, np.uint16)])
        return v


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ["direct", "indirect", "singles"])
def test_device_acts_on_one_snapshot_when_driver_rewrites_descriptors_between_reads(
        ring: str, mode: str, shape: str) -> None:
    """Row 15: descriptors, ring entries and indirect tables rewritten right
    after the device read them change nothing: every chain is built from the
    first (and only) read of each."""
    pair = QueuePair(ring, 16, indirect=True, policy="eager" if mode == "eager" else "lazy")
    mm = MutatingMemory(pair.raw, packed=pair.packed, size=16)
    pair.mem = mm
    pair.vq = pair.new_device()
    expect: dict[int, tuple[bytes, int, int | None]] = {}
    for k in range(3):
        if shape == "singles":
            g = pair.pool.alloc(64)
            pair.raw.write(g, pattern(10 * k, 64))
            head = pair.driver.add([(g, 8 + 4 * k)], [], token=k)
            expect[head] = (pattern(10 * k, 64)[: 8 + 4 * k], 0, None)
            continue
        outs = [(pair.pool.alloc(64), 16), (pair.pool.alloc(64), 8)]
        ins = [(pair.pool.alloc(64), 24)]
        for j, (g, _n) in enumerate(outs):
            pair.raw.write(g, pattern(10 * k + j, 64))
        head = pair.driver.add(outs, ins, token=k, indirect=shape == "indirect")
        expect[head] = (pattern(10 * k, 64)[:16] + pattern(10 * k + 1, 64)[:8], 24, ins[0][0])
    single = pair.pool.alloc(64)
    pair.raw.write(single, pattern(99, 64))
    head = pair.driver.add([(single, 12)], [], token=3)
    expect[head] = (pattern(99, 64)[:12], 0, None)
    pair.driver.publish()
    bulk = None
    if mode == "bulk":
        got = pair.vq.pop_bulk()
        if is_bulk(got):
            bulk = got
            chains = list(got.chains())
        else:
            chains = list(got)
    else:
        chains = pair.vq.pop_batch()
    assert mm.mutations > 0, "the test did not rewrite anything"
    assert sorted(c.id for c in chains) == sorted(expect)
    for c in chains:
        data, wlen, in_gpa = expect[c.id]
        assert c.read() == data, f"chain {c.id} was built from re-read descriptors"
        assert c.readable_len == len(data)
        assert c.writable_len == wlen
        if wlen:
            assert c.write(b"Z" * wlen) == wlen
            assert in_gpa is not None and pair.raw.read(in_gpa, wlen) == b"Z" * wlen
    if bulk is not None:
        pair.vq.complete_bulk(bulk, 0)
    else:
        for c in chains:
            pair.vq.complete(c, c.writable_len)
    pair.vq.flush()
    assert sorted(t for t, _ in pair.driver.get_used()) == [0, 1, 2, 3]


@pytest.mark.parametrize("mode", MODES)
def test_split_direct_chain_ending_in_indirect_table_is_handled(mode: str) -> None:
    """Row 16: direct descriptors followed by one INDIRECT descriptor is a
    valid chain (the device MUST handle it)."""
    rig = Rig("split", mode=mode)
    b0, b1, b2 = rig.buf(8, 1), rig.buf(8, 2), rig.buf(8, 3)
    t = rig.linked_table([(b1, 8, 0), (b2, 8, WRITE)])
    rig.push(rig.chain([(b0, 8, 0), (t, 32, INDIRECT)]))
    (c,) = rig.pop()
    assert c.read() == pattern(1, 8) + pattern(2, 8)
    assert c.writable_len == 8
    c.write(b"x" * 8)
    rig.complete([c], written=lambda c: 8)
    assert rig.raw.read(b2, 8) == b"x" * 8
    assert rig.vq.failed is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tail_flags", [0, NEXT], ids=["indirect_last", "indirect_then_more"])
def test_packed_next_list_containing_indirect_retires_queue(mode: str, tail_flags: int) -> None:
    """Row 17: an INDIRECT descriptor inside a packed NEXT list is fatal."""
    rig = Rig("packed", mode=mode)
    good = rig.post_good()
    b = rig.buf(16)
    t = rig.table([(b, 16, 0, 0)])
    descs = [(b, 16, 5, NEXT), (t, 16, 5, INDIRECT | tail_flags)]
    if tail_flags:
        descs.append((b, 16, 5, 0))
    rig.push_list(descs)
    expect_retired(rig, (IndirectInList, IndirectWithNext)[bool(tail_flags)], good=good)


# =====================================================================================
# rows 18-26: buffers
# =====================================================================================


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_zero_length_descriptor_with_garbage_address_is_accepted_untranslated(ring: str, mode: str) -> None:
    """Row 18: a zero-length descriptor is accepted and never translated,
    whatever its address (alone, and inside a chain)."""
    rig = Rig(ring, mode=mode)
    b = rig.buf(8, 4)
    rig.post_hostile([(0xFFFF_FFFF_FFFF_FFF0, 0, 0)], bid=1)
    rig.post_hostile([(b, 8, 0), (1 << 50, 0, 0), (0xDEAD_0000_0000, 0, WRITE)], bid=2)
    chains = rig.pop()
    assert [(c.readable_len, c.writable_len) for c in chains] == [(0, 0), (8, 0)]
    assert chains[0].readable == [] and chains[0].writable == []
    assert chains[1].read() == pattern(4, 8)
    rig.complete(chains)
    assert rig.vq.failed is None


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["readable_beyond_memory", "writable_beyond_memory",
                                  "tail_beyond_memory", "second_descriptor", "indirect_table"])
def test_address_outside_guest_memory_retires_queue(ring: str, mode: str, case: str) -> None:
    """Row 19: a buffer (or table) outside guest memory is fatal, never a fault."""
    rig = Rig(ring, mode=mode)
    good = rig.post_good()
    b = rig.buf(8)
    segs = {
        "readable_beyond_memory": [(16 << 20, 64, 0)],
        "writable_beyond_memory": [(16 << 20, 64, WRITE)],
        "tail_beyond_memory": [(MEM_SIZE - 8, 64, WRITE)],
        "second_descriptor": [(b, 8, 0), (1 << 40, 8, WRITE)],
    }.get(case)
    if segs is None:
        rig.post_indirect(1 << 40, 32)
    else:
        rig.post_hostile(segs)
    expect_retired(rig, BadBufferAddress, good=good)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_buffer_spanning_two_regions_becomes_two_views(ring: str, mode: str) -> None:
    """Row 20: a buffer across adjacent regions is split into several views
    that read and write the right bytes."""
    rig = Rig(ring, mode=mode)
    base, backing = add_adjacent_region(rig)
    rig.raw.write(base - 8, pattern(5, 24))
    rig.post_hostile([(base - 8, 24, 0), (base - 4, 12, WRITE)])
    (c,) = rig.pop()
    assert len(c.readable) == 2 and len(c.writable) == 2
    assert c.read() == pattern(5, 24)
    assert c.write(b"ABCDEFGHIJKL") == 12
    rig.complete([c], written=lambda c: 12)
    assert rig.raw.read(base - 4, 12) == b"ABCDEFGHIJKL"
    assert bytes(backing[:8]) == b"EFGHIJKL"


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_buffer_running_into_a_memory_hole_retires_queue(ring: str, mode: str) -> None:
    """Row 20: a buffer that leaves the last region (into a hole) is fatal."""
    rig = Rig(ring, mode=mode)
    base, backing = add_adjacent_region(rig)
    good = rig.post_good()
    rig.post_hostile([(base + len(backing) - 8, 16, 0)])
    expect_retired(rig, BadBufferAddress, good=good)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("addr,length", [((1 << 64) - 8, 16), ((1 << 64) - 1, 0xFFFFFFFF),
                                         ((1 << 64) - 0x1000, 0x1001)])
def test_address_plus_length_wrapping_u64_retires_queue(ring: str, mode: str, addr: int, length: int) -> None:
    """Row 21: `addr + len` wrapping the 64-bit space is fatal."""
    rig = Rig(ring, mode=mode)
    good = rig.post_good()
    rig.post_hostile([(addr, length, WRITE)])
    expect_retired(rig, BadBufferAddress, good=good)


BIG_GPA = 1 << 32
BIG_SIZE = (1 << 31) + 0x1000


def add_big_region(rig: Rig) -> int:
    """A sparse 2 GiB region at 4 GiB (never touched, so it costs no memory)."""
    big = GuestMemory.anonymous(BIG_SIZE, gpa=BIG_GPA)
    rig.raw.add(big.regions[0])
    return BIG_GPA


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_chain_longer_than_4gib_retires_queue(ring: str, mode: str) -> None:
    """Row 22: a chain whose total length exceeds 2^32 bytes is fatal."""
    rig = Rig(ring, mode=mode)
    g = add_big_region(rig)
    good = rig.post_good()
    half = (1 << 31) + 8
    rig.post_hostile([(g, half, 0), (g, half, WRITE)])
    expect_retired(rig, ChainTooLarge, good=good)


@pytest.mark.parametrize("ring", RINGS)
def test_chain_of_exactly_4gib_is_accepted(ring: str) -> None:
    """Row 22: 2^32 bytes in total is the limit, and legal."""
    rig = Rig(ring)
    g = add_big_region(rig)
    rig.post_hostile([(g, 1 << 31, 0), (g, 1 << 31, 0)])
    (c,) = rig.pop()
    assert c.readable_len == 1 << 32
    rig.complete([c])


@pytest.mark.parametrize("ring", RINGS)
def test_completing_a_4gib_writable_chain_publishes_a_u32_length(ring: str) -> None:
    """Row 22 corollary: the largest legal chain can be completed; the used
    length is clamped to what the u32 field can say (the spec lets a device
    underestimate), and the buffer id is intact."""
    rig = Rig(ring)
    g = add_big_region(rig)
    rig.post_hostile([(g, 1 << 31, WRITE), (g, 1 << 31, WRITE)], bid=2)
    (c,) = rig.pop()
    assert c.writable_len >= 0xFFFFFFFF
    head = c.id
    try:
        rig.vq.complete(c, c.writable_len)
        rig.vq.flush()
    except (ValueError, struct.error, OverflowError) as e:
        pytest.fail(f"completing the largest legal chain raised {e!r}")
    p = rig.pair
    if rig.packed:
        ln, bid, fl = struct.unpack("<IHH", rig.raw.read(p.desc + 8, 8))
        assert bid == head and fl & WRITE
    else:
        assert rd16(rig.raw, p.device_area + USED_IDX) == 1
        bid, ln = struct.unpack("<II", rig.raw.read(p.device_area + USED_RING, 8))
        assert bid == head
    assert ln == 0xFFFFFFFF


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["direct", "indirect"])
def test_readable_after_writable_retires_queue(ring: str, mode: str, where: str) -> None:
    """Row 23: a device-readable descriptor after a writable one is fatal."""
    rig = Rig(ring, mode=mode)
    good = rig.post_good()
    b = rig.buf(16)
    if where == "direct":
        rig.post_hostile([(b, 8, WRITE), (b, 8, 0)])
    else:
        if ring == "split":
            t = rig.linked_table([(b, 8, 0), (b, 8, WRITE), (b, 8, 0)])
        else:
            t = rig.table([(b, 8, 0, 0), (b, 8, WRITE, 0), (b, 8, 0, 0)])
        rig.post_indirect(t, 48)
    expect_retired(rig, ReadableAfterWritable, good=good)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_segments_beyond_queue_size_are_refused_so_host_vectors_stay_bounded(ring: str, mode: str) -> None:
    """Row 24: a chain never yields more than Q descriptors (the host vector
    bound is the queue size; Q itself works, see row 13): Q+1 are refused."""
    q = 8
    rig = Rig(ring, q, mode=mode)
    good = rig.post_good()
    b = rig.buf(4)
    if ring == "split":
        rig.push(rig.chain([(b, 4, 0), (rig.linked_table([(b, 4, 0)] * q), 16 * q, INDIRECT)]))
        expect_retired(rig, ChainTooLong, good=good)
    else:
        rig.post_indirect(rig.table([(b, 4, 0, 0)] * (q + 1)), 16 * (q + 1))
        expect_retired(rig, BadIndirectTable, good=good)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_device_cannot_write_a_readable_only_chain_and_can_fail_it_with_len_0(ring: str, mode: str) -> None:
    """Rows 25/26: a chain too short for the device's response (here: only a
    readable header) gets a device error with used len 0; nothing is ever
    written into a device-readable buffer, and claiming written bytes is refused."""
    rig = Rig(ring, mode=mode)
    b = rig.buf(16, 9)
    rig.post_hostile([(b, 16, 0)], bid=2)
    (c,) = rig.pop()
    assert c.writable_len == 0
    before = rig.snapshot()
    assert c.write(b"status!!") == 0
    with pytest.raises(ValueError):
        rig.vq.complete(c, 1)
    rig.vq.complete(c, 0)
    rig.vq.flush()
    assert rig.raw.read(b, 16) == pattern(9, 16)
    p = rig.pair
    allowed = rig.device_area_spans() + ([(p.desc, p.desc + 16 * rig.size)] if rig.packed else [])
    assert rig.changed_outside(before, allowed) == []
    if rig.packed:
        _ln, bid, fl = struct.unpack("<IHH", rig.raw.read(p.desc + 8, 8))
        assert (bid, fl & WRITE) == (2, 0)
    else:
        assert struct.unpack("<II", rig.raw.read(p.device_area + USED_RING, 8)) == (c.id, 0)


# =====================================================================================
# rows 27-36: notifications and suppression
# =====================================================================================


def warm_up(rig: Rig, n: int) -> list:
    """Post n requests, take them all, complete one (the first decision after
    start is always an interrupt) and reap it; returns the rest in flight."""
    rig.post_good(n)
    chains = rig.pop()
    assert len(chains) == n
    rig.vq.complete(chains[0], 0)
    assert rig.vq.flush() is True
    rig.pair.driver.get_used()
    return chains[1:]


@pytest.mark.parametrize("used_event", [0, 1, 2, 3, 4, 5, 8, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF])
@pytest.mark.parametrize("start", [0, 0xFFFE])
def test_split_used_event_garbage_only_feeds_the_formula(used_event: int, start: int) -> None:
    """Row 27: `used_event` may hold anything; the device applies the range
    formula to it and never uses it as an index (values < 8 are relative to
    the start index, so that they land around the batch; others are absolute)."""
    rig = Rig("split", 8, event_idx=True, start_index=start)
    rest = warm_up(rig, 4)
    old = (start + 1) & 0xFFFF
    ue = (start + used_event) & 0xFFFF if used_event < 8 else used_event
    wr16(rig.raw, rig.pair.driver_area + used_event_offset(8), ue)
    for c in rest:
        rig.vq.complete(c, 0)
    notify = rig.vq.flush()
    new = (old + 3) & 0xFFFF
    assert notify is vring_need_event(ue, new, old)
    assert rd16(rig.raw, rig.pair.device_area + USED_IDX) == new
    assert rig.vq.failed is None


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("flags", [0x0000, 0x0001, 0xFFFE, 0xFFFF, 0x8000, 0x8001])
def test_split_avail_flags_garbage_is_ignored_except_no_interrupt_without_event_idx(
        event_idx: bool, flags: int) -> None:
    """Row 28: with EVENT_IDX, NO_INTERRUPT and every other avail.flags bit are
    ignored; without it only bit 0 counts. Fetching never looks at the flags."""
    rig = Rig("split", 8, event_idx=event_idx)
    rest = warm_up(rig, 4)
    p = rig.pair
    wr16(rig.raw, p.driver_area + AVAIL_FLAGS, flags)
    if event_idx:
        wr16(rig.raw, p.driver_area + used_event_offset(8), 1)  # inside the next batch
    for c in rest:
        rig.vq.complete(c, 0)
    notify = rig.vq.flush()
    assert notify is (True if event_idx else not flags & 1)
    rig.pair.driver.get_used()
    rig.post_good(2)
    assert len(rig.pop()) == 2


class PerAreaCountingMemory(CountingMemory):
    """Counts accesses per ring area (kind and address), so that reads of
    `avail_event` can be told from reads of `used_event`."""

    def __init__(self, inner: GuestMemory) -> None:
        super().__init__(inner)
        self.by_area: dict[tuple[AreaKind, int], AccessCounter] = {}

    def area(self, kind: AreaKind, gpa: int, size: int, align: int = 1):  # type: ignore[override]
        if align > 1 and gpa % align:
            raise GuestMemoryError(f"{kind.value} area at {gpa:#x} is not {align}-byte aligned", gpa, size)
        c = self.by_area.setdefault((kind, gpa), AccessCounter())
        return CountingArea(kind, gpa, self.view(gpa, size), c)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_guest_scribbling_on_device_owned_fields_is_never_read_back(ring: str, event_idx: bool,
                                                                     mode: str) -> None:
    """Row 29: the device keeps shadows of used.idx, used.flags, avail_event
    and its event structure; a guest scribbling on them changes nothing the
    device computes, and the device never reads them."""
    pair = QueuePair(ring, 8, event_idx=event_idx, policy=mode)
    mem = PerAreaCountingMemory(pair.raw)
    pair.mem = mem
    pair.vq = pair.new_device()
    q = 8

    def scribble() -> None:
        if pair.packed:
            pair.raw.write(pair.device_area, b"\xa5\x5a\xff\xff")
        else:
            wr16(pair.raw, pair.device_area + USED_FLAGS, 0xFFFF)
            wr16(pair.raw, pair.device_area + USED_IDX, 0x1234)
            wr16(pair.raw, pair.device_area + avail_event_offset(q), 0xBEEF)
            pair.raw.write(pair.device_area + USED_RING + 8 * 5, b"\xee" * 24)

    done = 0
    for rnd in range(4):
        scribble()
        pair.post(3, out=8, in_=8)
        n = pair.serve(written=4)
        assert n == 3
        done += 3
        if not pair.packed:
            assert rd16(pair.raw, pair.device_area + USED_IDX) == done & 0xFFFF
        assert sorted(pair.driver.get_used()) == [(0, 4), (1, 4), (2, 4)]
        scribble()
        assert pair.vq.arm() is ArmResult.SLEEP
    if pair.packed:
        dev = mem.by_area[(AreaKind.EVENT, pair.device_area)]
        assert dev.reads == 0
    else:
        used = mem.by_area[(AreaKind.USED, pair.device_area)]
        assert used.reads == 0
        ae = mem.by_area.get((AreaKind.EVENT, pair.device_area + avail_event_offset(q)))
        assert ae is None or ae.reads == 0
    assert mem.counters[AreaKind.USED].reads == 0
    assert pair.vq.failed is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flags", [P_AVAIL | P_USED, 0, P_USED, P_USED | WRITE | NEXT],
                         ids=["used_this_lap", "zero", "wrong_wrap", "wrong_wrap_with_bits"])
def test_packed_slot_not_available_is_not_work(mode: str, flags: int) -> None:
    """Row 30: a slot whose AVAIL/USED bits do not say "available in this lap"
    is no work: nothing is taken, the device sleeps (no spin), no error."""
    rig = Rig("packed", 8, mode=mode)
    b = rig.buf(16)
    rig.push_list([(b, 16, 3, flags)], raw_flags=True)
    for _ in range(3):
        assert rig.pop() == []
        assert rig.vq.has_work() is False
        assert rig.vq.arm() is ArmResult.SLEEP
    assert rig.vq.failed is None
    rig._pslot = None
    rig.post_good()  # the driver model overwrites the slot properly
    assert len(rig.pop()) == 1


@pytest.mark.parametrize("mode", MODES)
def test_packed_list_overrunning_in_flight_slots_retires_queue(mode: str) -> None:
    """Row 31: a list that would need slots the device still holds is fatal."""
    rig = Rig("packed", 4, mode=mode)
    good = rig.post_good(1)  # 2 slots
    b = rig.buf(16)
    taken = rig.pop()
    rig.post_hostile([(b, 8, 0), (b, 8, 0), (b, 8, 0)], bid=1)  # slots 2, 3, and 0 (in flight)
    expect_retired(rig, TooManyInFlight, taken=taken, good=good)


@pytest.mark.parametrize("mode", MODES)
def test_packed_slot_restamped_while_ring_is_full_retires_queue(mode: str) -> None:
    """Row 31: with every slot in flight, a slot that turns available again can
    only be a re-stamped in-flight slot: fatal via the in-flight bound."""
    rig = Rig("packed", 4, mode=mode)
    good = rig.post_good(2)  # 4 slots: the whole ring
    taken = rig.pop()
    assert len(taken) == 2
    rig.push_list([(rig.buf(8), 8, 0, 0)])  # slot 0 again, next lap's AVAIL bits
    expect_retired(rig, TooManyInFlight, taken=taken, good=good)


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_packed_buffer_ids_reused_or_out_of_range_are_echoed(mode: str) -> None:
    """Row 32: the device echoes buffer ids (reused while in flight, or >= Q)
    and indexes nothing with them."""
    rig = Rig("packed", 8, mode=mode)
    b = rig.buf(16)
    ids = [3, 3, 0xFFFF, 8, 0x7FFF]
    for bid in ids:
        rig.push_list([(b, 16, bid, WRITE)])
    chains = rig.pop()
    assert [c.id for c in chains] == ids
    for c in chains[::-1]:
        rig.vq.complete(c, 5)
    rig.vq.flush()
    p = rig.pair
    used = [struct.unpack("<IHH", rig.raw.read(p.desc + 16 * s + 8, 8)) for s in range(len(ids))]
    assert [u[1] for u in used] == ids[::-1]
    assert all(u[0] == 5 and u[2] & WRITE and u[2] & P_AVAIL and u[2] & P_USED for u in used)
    assert rig.vq.failed is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("start", ["fresh_ring", "mid_ring"])
def test_packed_list_longer_than_queue_retires_queue_with_chain_too_long(mode: str, start: str) -> None:
    """Row 33: a packed list whose every slot says NEXT (it would run round
    the ring onto itself) is fatal at Q descriptors."""
    rig = Rig("packed", 8, mode=mode)
    if start == "mid_ring":  # one request served and reaped: the list wraps
        rig.post_good()
        rig.complete(rig.pop(), written=lambda c: 0)
        rig.pair.driver.get_used()
    b = rig.buf(8)
    rig.push_list([(b, 8, 1, NEXT)] * 8)
    expect_retired(rig, ChainTooLong, good=[])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("q", [8, 6])
def test_packed_list_of_exactly_queue_size_slots_is_accepted_and_toggles_wrap(mode: str, q: int) -> None:
    """Rows 2/33: a list of exactly Q slots is legal; both wrap counters
    toggle after exactly Q slots and the used descriptor carries the next
    lap's bits."""
    rig = Rig("packed", q, mode=mode)
    bufs = [(rig.buf(4, k), 4) for k in range(q)]
    rig.pair.driver.add(bufs, [], token="all", indirect=False)
    rig.pair.driver.publish()
    (c,) = rig.pop()
    assert c.slots == q and len(c.readable) == q
    st = rig.vq.save()
    assert (st.last_avail, st.avail_wrap) == (0, False)
    rig.vq.complete(c, 0)
    rig.vq.flush()
    st = rig.vq.save()
    assert (st.used_idx, st.used_wrap) == (0, False)
    fl = rd16(rig.raw, rig.pair.desc + PACKED_FLAGS)
    assert fl & (P_AVAIL | P_USED) == P_AVAIL | P_USED  # written in lap 1
    assert rig.pair.driver.get_used() == [("all", 0)]
    # next lap: the used descriptor has both bits clear
    rig.post_good()
    (c,) = rig.pop()
    rig.vq.complete(c, 32)
    rig.vq.flush()
    assert rd16(rig.raw, rig.pair.desc + PACKED_FLAGS) & (P_AVAIL | P_USED) == 0
    assert rig.pair.driver.get_used() == [(("good", 0), 32)]


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("off_wrap", [0, 1, 3, 5, 7, 8, 0x7FFF, 0x8000, 0x8003, 0x8007, 0xFFFF])
@pytest.mark.parametrize("flags", [int(EventFlags.ENABLE), int(EventFlags.DISABLE), int(EventFlags.DESC),
                                   int(EventFlags.RESERVED), 0xFFFC, 0xFFFD, 0xFFFE, 0xFFFF])
def test_packed_driver_event_garbage_applies_formula_and_reserved_is_enable(
        event_idx: bool, off_wrap: int, flags: int) -> None:
    """Row 34: any off_wrap/flags: DISABLE -> no interrupt, ENABLE or the
    reserved value 3 -> interrupt, DESC -> the range formula (with
    EVENT_IDX; without it DESC means "interrupt"); reserved bits 2-15 ignored."""
    rig = Rig("packed", 8, event_idx=event_idx)
    rest = warm_up(rig, 4)
    old = rig.vq.save()
    p = rig.pair
    wr16(rig.raw, p.driver_area + EVENT_OFF_WRAP, off_wrap)
    wr16(rig.raw, p.driver_area + EVENT_FLAGS, flags)
    for c in rest:
        rig.vq.complete(c, 0)
    notify = rig.vq.flush()
    new = rig.vq.save()
    mode = flags & 3
    if mode == EventFlags.DISABLE:
        want = False
    elif mode == EventFlags.DESC and event_idx:
        want = packed_need_event(off_wrap, new.used_idx, old.used_idx, int(new.used_wrap), 8)
    else:
        want = True
    assert notify is want
    assert rig.vq.failed is None


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_spurious_kicks_are_harmless_and_bounded(ring: str, event_idx: bool, mode: str) -> None:
    """Row 35: a storm of kicks with no work makes the device do a small,
    bounded amount of work per kick, take nothing and keep sleeping; the
    next real publish is still kicked and served."""
    rig = Rig(ring, 8, event_idx=event_idx, mode=mode)
    vq = rig.vq
    assert rig.pop() == [] and vq.arm() is ArmResult.SLEEP
    rig.pair.mem.reset_counts()
    kicks = 1000
    for _ in range(kicks):
        assert rig.pop() == []
        assert vq.arm() is ArmResult.SLEEP
    c = rig.pair.counts()
    assert c["metadata_reads"] <= 3 * kicks
    assert c["metadata_writes"] <= kicks
    assert c["fences"] <= kicks
    assert vq.failed is None
    rig.post_good()
    assert rig.last_kick is True
    assert len(rig.pop()) == 1


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("event_idx", [False, True])
def test_spurious_kick_does_not_rearm_an_armed_queue(ring: str, event_idx: bool) -> None:
    """Row 35: once armed, a spurious wake-up costs the empty check only: no
    kick-enable write, no fence."""
    rig = Rig(ring, 8, event_idx=event_idx)
    assert rig.pop() == [] and rig.vq.arm() is ArmResult.SLEEP
    rig.pair.mem.reset_counts()
    for _ in range(10):
        assert rig.pop() == []
        assert rig.vq.arm() is ArmResult.SLEEP
    c = rig.pair.counts()
    assert (c["metadata_writes"], c["fences"]) == (0, 0)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("limit", [1, 3, 7])
def test_endless_work_is_served_in_bounded_batches(ring: str, mode: str, limit: int) -> None:
    """Row 36: a driver that keeps the ring full forever gets at most `limit`
    chains per pop, with guest reads bounded by the limit, not by the ring."""
    q = 16
    rig = Rig(ring, q, mode=mode)
    pair = rig.pair
    for k in range(q):
        o = rig.buf(8, k)
        pair.driver.add([(o, 8)], [], token=k)
    pair.driver.publish()
    for _ in range(40):
        pair.mem.reset_counts()
        got = rig.pop(limit)
        assert 1 <= len(got) <= limit
        assert pair.counts()["metadata_reads"] <= 4 * limit + 4
        assert rig.vq.has_work() is True  # more is waiting: the caller yields between batches
        rig.complete(got)
        reaped = pair.driver.get_used()
        assert len(reaped) == len(got)
        for tok, _ in reaped:
            pair.driver.add([(rig.buf(8, 1), 8)], [], token=tok)
        pair.driver.publish()


# =====================================================================================
# rows 37-39: geometry and saved state
# =====================================================================================


def _same(p: QueuePair) -> tuple[int, int, int]:
    return p.desc, p.driver_area, p.device_area


GEOMETRY: dict[str, tuple[str, int, Callable[[QueuePair], tuple[int, int, int]]]] = {
    "split_size_0": ("split", 0, _same),
    "split_size_3": ("split", 3, _same),
    "split_size_12": ("split", 12, _same),
    "split_size_65536": ("split", 65536, _same),
    "packed_size_0": ("packed", 0, _same),
    "packed_size_32769": ("packed", 32769, _same),
    "split_desc_misaligned": ("split", 8, lambda p: (p.desc + 8, p.driver_area, p.device_area)),
    "split_avail_odd": ("split", 8, lambda p: (p.desc, p.driver_area + 1, p.device_area)),
    "split_used_misaligned": ("split", 8, lambda p: (p.desc, p.driver_area, p.device_area + 2)),
    "packed_desc_misaligned": ("packed", 8, lambda p: (p.desc + 8, p.driver_area, p.device_area)),
    "packed_driver_event_misaligned": ("packed", 8, lambda p: (p.desc, p.driver_area + 2, p.device_area)),
    "packed_device_event_misaligned": ("packed", 8, lambda p: (p.desc, p.driver_area, p.device_area + 2)),
    "split_avail_over_desc": ("split", 8, lambda p: (p.desc, p.desc + 4, p.device_area)),
    "split_used_over_avail": ("split", 8, lambda p: (p.desc, p.driver_area, p.driver_area + 4)),
    "packed_driver_event_in_desc": ("packed", 8, lambda p: (p.desc, p.desc + 4, p.device_area)),
    "packed_events_shared": ("packed", 8, lambda p: (p.desc, p.driver_area, p.driver_area)),
    "split_desc_unmapped": ("split", 8, lambda p: (16 << 20, p.driver_area, p.device_area)),
    "split_used_off_the_end": ("split", 8, lambda p: (p.desc, p.driver_area, MEM_SIZE - 16)),
    "packed_driver_event_unmapped": ("packed", 8, lambda p: (p.desc, 1 << 40, p.device_area)),
    "packed_desc_off_the_end": ("packed", 8, lambda p: (MEM_SIZE - 64, p.driver_area, p.device_area)),
}


@pytest.mark.parametrize("case", list(GEOMETRY))
def test_bad_geometry_refuses_to_start_the_queue(case: str) -> None:
    """Row 37: size 0, split size not a power of two, size > 32768, misaligned,
    overlapping or unmapped areas: the queue does not start, nothing is
    written, other queues carry on."""
    ring, size, where = GEOMETRY[case]
    rig = Rig(ring, 8)
    p = rig.pair
    desc, drv, dev = where(p)
    before = rig.snapshot()
    with pytest.raises(InvalidQueueGeometry):
        Virtqueue(p.mem, size, desc, drv, dev, features=p.features)
    assert rig.changed_outside(before, []) == []
    rig.other.roundtrip()
    p.post(2)
    assert p.serve() == 2


def saved_with_two_in_flight(ring: str, q: int = 8) -> tuple[QueuePair, QueueState]:
    pair = QueuePair(ring, q)
    pair.post(3, out=8, in_=8)
    chains = pair.vq.pop_batch()
    pair.vq.complete(chains[1], 2)  # out of order on purpose
    pair.vq.flush()
    return pair, pair.vq.save()


def _corrupt(st: QueueState, how: str) -> QueueState:
    q = st.size
    r = dataclasses.replace
    if how == "last_avail_beyond_ring":
        return r(st, last_avail=q if st.packed else 0x10000)
    if how == "used_beyond_ring":
        return r(st, used_idx=q if st.packed else -1)
    if how == "negative_last_avail":
        return r(st, last_avail=-1)
    if how == "cursor_moved":
        return r(st, last_avail=(st.last_avail + 1) % (q if st.packed else 0x10000))
    if how == "extra_in_flight":
        return r(st, in_flight=st.in_flight + ((st.in_flight[0][0] + 1, 1),))
    if how == "missing_in_flight":
        return r(st, in_flight=st.in_flight[:1])
    if how == "id_out_of_range":
        (pos, _), rest = st.in_flight[0], st.in_flight[1:]
        return r(st, in_flight=((pos, 0x10000 if st.packed else q),) + rest)
    if how == "position_out_of_range":
        (_, cid), rest = st.in_flight[0], st.in_flight[1:]
        return r(st, in_flight=((q + 3 if st.packed else 0x10000, cid),) + rest)
    if how == "more_in_flight_than_ring":
        return r(st, in_flight=tuple((k, 0) for k in range(q + 1)))
    if how == "wrong_size":
        return r(st, size=q * 2)
    if how == "wrong_format":
        return r(st, packed=not st.packed)
    if how == "zero_size":
        return r(st, size=0)
    lists = getattr(st, "in_flight_lists", None)
    if not st.packed or lists is None:
        pytest.skip("split states carry no segments")
    if how == "packed_segment_outside_memory":
        slots, segs = lists[0]
        return r(st, in_flight_lists=((slots, ((1 << 40, 8, False),) + tuple(segs[1:])),) + lists[1:])
    if how == "packed_list_of_zero_slots":
        return r(st, in_flight_lists=((0, lists[0][1]),) + lists[1:])
    if how == "packed_segments_missing":
        return r(st, in_flight_lists=lists[:1])
    raise AssertionError(how)


CORRUPTIONS = ["last_avail_beyond_ring", "used_beyond_ring", "negative_last_avail", "cursor_moved",
               "extra_in_flight", "missing_in_flight", "id_out_of_range",
               "position_out_of_range", "more_in_flight_than_ring", "wrong_size", "wrong_format",
               "zero_size", "packed_segment_outside_memory", "packed_list_of_zero_slots",
               "packed_segments_missing"]


@pytest.mark.parametrize("ring,how", [(r, h) for r in RINGS for h in CORRUPTIONS
                                      if r == "packed" or not h.startswith("packed_")])
def test_corrupt_saved_state_is_rejected(ring: str, how: str) -> None:
    """Row 38: a saved state whose indices or in-flight entries cannot exist
    is rejected (InvalidSavedState) when restored, and never read into
    guest memory or host tables."""
    pair, st = saved_with_two_in_flight(ring)
    bad = _corrupt(st, how)
    before = {r.gpa: bytes(r.mv) for r in pair.raw.regions}
    # a saved segment outside guest memory may also be reported as the bad address it is
    expected = (InvalidSavedState, BadBufferAddress) if how == "packed_segment_outside_memory" \
        else InvalidSavedState
    with pytest.raises(expected):
        vq = pair.new_device(bad)
        vq.pop_batch()  # some inconsistencies only show against the ring
    assert {r.gpa: bytes(r.mv) for r in pair.raw.regions} == before


@pytest.mark.parametrize("ring", RINGS)
def test_valid_saved_state_with_out_of_order_completion_resumes(ring: str) -> None:
    """Row 38 (the positive side): a real state round-trips; the chains that
    were in flight are handed out again and complete, even after an
    out-of-order completion overwrote packed slots of an in-flight list."""
    pair, st = saved_with_two_in_flight(ring)
    assert sorted(pair.driver.get_used()) == [(1, 2)]
    vq = pair.new_device(st)
    again = vq.pop_batch()
    assert sorted(c.id for c in again) == sorted(cid for _, cid in st.in_flight)
    for c in again:
        assert c.readable_len == 8 and c.writable_len == 8
        vq.complete(c, 3)
    vq.flush()
    assert sorted(pair.driver.get_used()) == [(0, 3), (2, 3)]
    pair.vq = vq
    pair.post(2)
    assert pair.serve() == 2


def test_packed_state_with_two_in_flight_lists_from_one_slot_resumes() -> None:
    """Row 38 (positive side): after B completes before A, the driver reuses
    A's first slot for C while A is still in flight; that state is real and
    must restore."""
    pair = QueuePair("packed", 2)
    pair.post(2, out=8)
    a, b = pair.vq.pop_batch()
    pair.vq.complete(b, 0)
    pair.vq.flush()
    assert pair.driver.get_used() == [(1, 0)]
    pair.driver.add([(pair.pool.alloc(8), 8)], [], token="c")
    pair.driver.publish()
    (c,) = pair.vq.pop_batch()
    assert a.pos == c.pos == 0
    st = pair.vq.save()
    vq = pair.new_device(st)
    again = vq.pop_batch()
    assert sorted(ch.id for ch in again) == sorted([a.id, c.id])
    for ch in again:
        vq.complete(ch, 0)
    vq.flush()
    assert sorted(map(str, pair.driver.get_used())) == sorted(map(str, [(0, 0), ("c", 0)]))


@pytest.mark.parametrize("ring", RINGS)
def test_queue_size_change_rejects_old_state_and_sizes_tables_from_current_q(ring: str) -> None:
    """Row 39: state saved at one queue size cannot be restored at another,
    and a queue re-created at a larger size holds that many in flight."""
    pair, st = saved_with_two_in_flight(ring, 8)
    desc, drv, dev, _ = ring_layout(pair.packed, 16, pair.pool.alloc(0x1000))
    with pytest.raises(InvalidSavedState):
        Virtqueue(pair.mem, 16, desc, drv, dev, features=pair.features, state=st)
    big = QueuePair(ring, 16)
    big.post(16)
    chains = big.vq.pop_batch()
    assert len(chains) == 16 and big.vq.in_flight == 16
    for c in chains[::-1]:
        big.vq.complete(c, 0)
    big.vq.flush()
    assert sorted(t for t, _ in big.driver.get_used()) == list(range(16))
