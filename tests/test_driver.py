"""Tests of the driver (guest) side of both ring formats, on its own.

A small device model below completes buffers the way the spec says a device
does; it trusts the driver and is only as clever as these tests need.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio import spec
from pyvirtio.driver import (
    BufferPool,
    DeviceProtocolError,
    PackedDriver,
    QueueFullError,
    SplitDriver,
    ring_layout,
)
from pyvirtio.memory import Area, AreaKind, CountingMemory, GuestMemory, GuestMemoryError

RING_BASE = 0x1000
POOL_BASE = 0x40000
POOL_SIZE = 0x20000
DATA_BASE = 0x80000
MEM_SIZE = 0x100000

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
P_AVAIL, P_USED = 1 << 7, 1 << 15


def u16(mem: GuestMemory, gpa: int) -> int:
    return int.from_bytes(mem.read(gpa, 2), "little")


def put16(mem: GuestMemory, gpa: int, v: int) -> None:
    mem.write(gpa, (v & 0xFFFF).to_bytes(2, "little"))


def put32(mem: GuestMemory, gpa: int, v: int) -> None:
    mem.write(gpa, v.to_bytes(4, "little"))


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory.anonymous(MEM_SIZE, shared_fd=False)
    yield m
    m.close()


def make(cls, mem, size=8, pool=True, **kw):
    p = BufferPool(mem, POOL_BASE, POOL_SIZE) if pool else None
    return cls.at(mem, size, RING_BASE, pool=p, **kw)


# -- a minimal device -----------------------------------------------------------------


class SplitDevice:
    def __init__(self, mem: GuestMemory, drv: SplitDriver) -> None:
        self.mem, self.q = mem, drv.size
        self.desc, self.avail, self.used = drv.desc, drv.driver_area, drv.device_area
        self.last_avail = self.used_idx = drv.vring_base()

    def pop(self):
        if u16(self.mem, self.avail + 2) == self.last_avail:
            return None
        head = u16(self.mem, self.avail + 4 + 2 * (self.last_avail % self.q))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        segs, base, i = [], self.desc, head
        while True:
            addr, ln, flags, nxt = spec.SPLIT_DESC.unpack(self.mem.read(base + 16 * i, 16))
            if flags & F_INDIRECT:
                base, i = addr, 0
                continue
            segs.append((addr, ln, bool(flags & F_WRITE)))
            if not flags & F_NEXT:
                return head, segs
            i = nxt

    def push(self, done) -> None:
        for head, ln in done:
            off = self.used + 4 + 8 * (self.used_idx % self.q)
            self.mem.write(off, spec.USED_ELEM.pack(head, ln))
            self.used_idx = (self.used_idx + 1) & 0xFFFF
        put16(self.mem, self.used + 2, self.used_idx)

    def set_used_flags(self, v: int) -> None:
        put16(self.mem, self.used, v)

    def set_avail_event(self, v: int) -> None:
        put16(self.mem, self.used + 4 + 8 * self.q, v)


class PackedDevice:
    def __init__(self, mem: GuestMemory, drv: PackedDriver) -> None:
        self.mem, self.q = mem, drv.size
        self.desc, self.drv_ev, self.dev_ev = drv.desc, drv.driver_area, drv.device_area
        base = drv.vring_base()
        self.avail, self.avail_wrap = base & 0x7FFF, base >> 15 & 1
        self.used, self.used_wrap = base >> 16 & 0x7FFF, base >> 31
        self.slots: dict[int, int] = {}

    def _flags(self, slot: int) -> int:
        return u16(self.mem, self.desc + 16 * slot + 14)

    def pop(self):
        f = self._flags(self.avail)
        if bool(f & P_AVAIL) != self.avail_wrap or bool(f & P_USED) == self.avail_wrap:
            return None
        segs, count = [], 0
        while True:
            addr, ln, bid, flags = spec.PACKED_DESC.unpack(self.mem.read(self.desc + 16 * self.avail, 16))
            count += 1
            self.avail += 1
            if self.avail == self.q:
                self.avail, self.avail_wrap = 0, self.avail_wrap ^ 1
            if flags & F_INDIRECT:
                for j in range(ln // 16):
                    a, n, _, f2 = spec.PACKED_DESC.unpack(self.mem.read(addr + 16 * j, 16))
                    segs.append((a, n, bool(f2 & F_WRITE)))
            else:
                segs.append((addr, ln, bool(flags & F_WRITE)))
            if not flags & F_NEXT:
                self.slots[bid] = count
                return bid, segs

    def push(self, done, write: bool = True) -> None:
        for bid, ln in done:
            off = self.desc + 16 * self.used
            flags = (P_AVAIL | P_USED if self.used_wrap else 0) | (F_WRITE if write else 0)
            self.mem.write(off + 8, struct.pack("<IHH", ln, bid, flags))
            self.used += self.slots.pop(bid)
            if self.used >= self.q:
                self.used, self.used_wrap = self.used - self.q, self.used_wrap ^ 1

    def set_event(self, off_wrap: int, flags: int) -> None:
        self.mem.write(self.dev_ev, spec.EVENT_SUPPRESS.pack(off_wrap, flags))

    def driver_event(self) -> tuple[int, int]:
        return spec.EVENT_SUPPRESS.unpack(self.mem.read(self.drv_ev, 4))


DEVICES = {SplitDriver: SplitDevice, PackedDriver: PackedDevice}
BOTH = pytest.mark.parametrize("cls", [SplitDriver, PackedDriver], ids=["split", "packed"])


def echo_all(dev, fill: int = 0) -> list:
    """Pop everything; complete each buffer reporting its writable bytes."""
    done = []
    while (item := dev.pop()) is not None:
        bid, segs = item
        done.append((bid, sum(ln for _, ln, w in segs if w) if not fill else fill))
    return done


# -- layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_split_layout_holds_each_area_with_its_event_field_and_alignment(size):
    desc, drv, dev, end = ring_layout(False, size, 0x1003)
    assert desc >= 0x1003 and desc % 16 == 0 and drv % 2 == 0 and dev % 4 == 0
    assert drv >= desc + 16 * size
    assert dev >= drv + 6 + 2 * size
    assert end == dev + 6 + 8 * size


@pytest.mark.parametrize("size", [1, 3, 1000, 32768])
def test_packed_layout_holds_ring_and_both_event_structures(size):
    desc, drv, dev, end = ring_layout(True, size, 0)
    assert desc == 0 and drv >= 16 * size and drv % 4 == 0 and dev >= drv + 4 and dev % 4 == 0
    assert end == dev + 4


@pytest.mark.parametrize("packed,size", [(False, 0), (False, 3), (False, 65536), (True, 0), (True, 32769)])
def test_layout_refuses_illegal_queue_sizes(packed, size):
    with pytest.raises(ValueError):
        ring_layout(packed, size, 0)


def test_driver_refuses_overlapping_or_misaligned_areas(mem):
    with pytest.raises(ValueError, match="overlaps"):
        SplitDriver(mem, 8, 0x1000, 0x1040, 0x1100)
    with pytest.raises(GuestMemoryError, match="aligned"):
        PackedDriver(mem, 8, 0x1008, 0x2000, 0x3000)
    with pytest.raises(ValueError, match="BufferPool"):
        SplitDriver.at(mem, 8, RING_BASE, indirect=True)


# -- buffer pool ------------------------------------------------------------------------------


def test_pool_hands_out_aligned_disjoint_blocks_until_exhausted(mem):
    pool = BufferPool(mem, 0x10008, 0x100, align=16)
    blocks = [pool.alloc(20) for _ in range(7)]  # 32 bytes each in [0x10010, 0x10108)
    assert all(b % 16 == 0 for b in blocks)
    assert len({b // 32 for b in blocks}) == 7 and max(blocks) + 32 <= 0x10108
    with pytest.raises(MemoryError):
        pool.alloc(20)
    pool.free(blocks[3])
    assert pool.alloc(17) == blocks[3]
    with pytest.raises(ValueError):
        pool.free(blocks[3] + 1)


def test_pool_coalesces_freed_neighbours_for_a_larger_request(mem):
    pool = BufferPool(mem, 0x10000, 0x100)
    blocks = [pool.alloc(16) for _ in range(16)]
    for b in blocks[4:8]:
        pool.free(b)
    assert pool.alloc(64) == blocks[4]
    pool.free(blocks[4])
    with pytest.raises(ValueError):
        pool.free(blocks[4])  # double free
    assert pool.bytes_in_use == 12 * 16


# -- split: staging, publishing, recycling ---------------------------------------------------------


def test_split_add_is_invisible_until_publish(mem):
    drv = make(SplitDriver, mem)
    dev = SplitDevice(mem, drv)
    drv.add([(DATA_BASE, 10)], [], token="a")
    drv.add([(DATA_BASE + 16, 10)], [(DATA_BASE + 32, 10)], token="b")
    assert dev.pop() is None and drv.outstanding == 2
    assert drv.publish() is True
    assert drv.publish() is False  # nothing new
    assert [dev.pop()[0] for _ in range(2)] == [0, 1]
    assert dev.pop() is None


def test_split_chain_puts_readable_segments_before_writable_ones(mem):
    drv = make(SplitDriver, mem)
    dev = SplitDevice(mem, drv)
    out = [(DATA_BASE, 16), (DATA_BASE + 0x100, 32)]
    in_ = [(DATA_BASE + 0x200, 64), (DATA_BASE + 0x300, 1)]
    drv.add(out, in_, token="t")
    drv.publish()
    head, segs = dev.pop()
    assert segs == [(a, n, False) for a, n in out] + [(a, n, True) for a, n in in_]
    dev.push([(head, 65)])
    assert drv.get_used() == [("t", 65)]


def test_split_recycles_descriptors_after_out_of_order_completion(mem):
    drv = make(SplitDriver, mem, size=8)
    dev = SplitDevice(mem, drv)
    for t in range(4):
        drv.add([(DATA_BASE, 8)], [(DATA_BASE + 8, 8)], token=t)
    assert drv.num_free == 0
    with pytest.raises(QueueFullError):
        drv.add([(DATA_BASE, 8)], [], token="x")
    drv.publish()
    popped = [dev.pop()[0] for _ in range(4)]
    dev.push([(popped[2], 3), (popped[0], 0)])
    assert drv.get_used() == [(2, 3), (0, 0)]
    assert drv.num_free == 4 and drv.outstanding == 2
    drv.add([(DATA_BASE, 1)], [(DATA_BASE + 1, 1), (DATA_BASE + 2, 1), (DATA_BASE + 3, 1)], token="four")
    drv.publish()
    head, segs = dev.pop()
    assert len(segs) == 4
    dev.push([(popped[1], 8), (popped[3], 8), (head, 3)])
    assert drv.get_used() == [(1, 8), (3, 8), ("four", 3)]
    assert drv.num_free == 8 and drv.outstanding == 0


def test_split_indices_wrap_at_65536(mem):
    drv = make(SplitDriver, mem, size=4, start_index=65530)
    dev = SplitDevice(mem, drv)
    seen = []
    for i in range(20):
        drv.add([], [(DATA_BASE + 64, 4)], token=i)
        if i % 3 == 2:
            drv.publish()
            dev.push(echo_all(dev))
            seen += drv.get_used()
    drv.publish()
    dev.push(echo_all(dev))
    seen += drv.get_used()
    assert [t for t, _ in seen] == list(range(20))
    assert drv.avail_idx == drv.last_used == (65530 + 20) & 0xFFFF == u16(mem, drv.driver_area + 2)


def test_split_reaps_a_batch_that_crosses_the_end_of_the_used_ring(mem):
    drv = make(SplitDriver, mem, size=4, start_index=2)
    dev = SplitDevice(mem, drv)
    for i in range(4):
        drv.add([], [(DATA_BASE, 8)], token=i)
    drv.publish()
    dev.push(echo_all(dev))  # used slots 2, 3, 0, 1
    assert drv.get_used() == [(i, 8) for i in range(4)]


# -- split: kick decision ---------------------------------------------------------------------


def test_split_kick_follows_used_flags_without_event_idx(mem):
    drv = make(SplitDriver, mem)
    dev = SplitDevice(mem, drv)
    dev.set_used_flags(spec.UsedFlags.NO_NOTIFY)
    drv.add([(DATA_BASE, 1)], [])
    assert drv.publish() is False
    dev.set_used_flags(0)
    drv.add([(DATA_BASE, 1)], [])
    assert drv.publish() is True


@pytest.mark.parametrize("event,kick", [(10, True), (12, True), (13, True), (14, False), (9, False),
                                         (0x8000, False)])
def test_split_event_idx_kicks_iff_avail_event_is_in_the_published_range(mem, event, kick):
    drv = make(SplitDriver, mem, size=8, event_idx=True, start_index=10)
    dev = SplitDevice(mem, drv)
    dev.set_used_flags(spec.UsedFlags.NO_NOTIFY)  # ignored under EVENT_IDX
    dev.set_avail_event(event)
    for _ in range(4):
        drv.add([(DATA_BASE, 1)], [])
    assert drv.publish() is kick  # published 10..13


def test_split_event_idx_range_starts_at_the_previous_decision(mem):
    drv = make(SplitDriver, mem, size=8, event_idx=True, start_index=0xFFFE)
    dev = SplitDevice(mem, drv)
    dev.set_avail_event(0xFFFF)
    drv.add([(DATA_BASE, 1)], [])
    assert drv.publish() is False  # published 0xfffe only
    drv.add([(DATA_BASE, 1)], [])
    drv.add([(DATA_BASE, 1)], [])
    assert drv.publish() is True  # 0xffff, 0x0000: crosses the wrap
    dev.set_avail_event(0x0001)
    drv.add([(DATA_BASE, 1)], [])
    assert drv.publish() is True


def test_fresh_event_idx_queue_kicks_on_first_publish_from_any_start(mem):
    for start in (0, 77, 0xFFFF):
        drv = make(SplitDriver, mem, event_idx=True, start_index=start)
        drv.add([(DATA_BASE, 1)], [])
        assert drv.publish() is True


# -- split: used-buffer notifications -------------------------------------------------------------


def test_split_interrupt_flag_is_written_only_on_change(mem):
    cm = CountingMemory(mem)
    drv = make(SplitDriver, cm)
    cm.reset_counts()
    drv.disable_interrupts()
    drv.disable_interrupts()
    assert u16(mem, drv.driver_area) == spec.AvailFlags.NO_INTERRUPT
    assert cm.counters[AreaKind.AVAIL].writes == 1
    assert drv.enable_interrupts() is False
    drv.enable_interrupts()
    assert u16(mem, drv.driver_area) == 0
    assert cm.counters[AreaKind.AVAIL].writes == 2
    assert cm.fences == 2


def test_split_enable_reports_completions_that_raced_with_it(mem):
    drv = make(SplitDriver, mem)
    dev = SplitDevice(mem, drv)
    drv.disable_interrupts()
    drv.add([(DATA_BASE, 1)], [], token="t")
    drv.publish()
    dev.push(echo_all(dev))  # completed while notifications were off
    assert drv.pending_used() is True
    assert drv.enable_interrupts() is True
    assert drv.get_used() == [("t", 0)]
    assert drv.enable_interrupts() is False


def test_split_event_idx_enable_points_used_event_at_last_used(mem):
    drv = make(SplitDriver, mem, size=16, event_idx=True, start_index=0xFFF0)
    dev = SplitDevice(mem, drv)
    used_event = drv.driver_area + 4 + 2 * 16
    for i in range(8):
        drv.add([], [(DATA_BASE, 4)], token=i)
    drv.publish()
    drv.disable_interrupts()
    assert u16(mem, drv.driver_area) == 0  # flags stay 0 under EVENT_IDX
    assert u16(mem, used_event) == 0xFFEF
    assert drv.enable_interrupts(delayed=True) is False
    assert u16(mem, used_event) == 0xFFF0 + 6  # 3/4 of the 8 outstanding
    batch = echo_all(dev)
    dev.push(batch[:6])
    assert drv.enable_interrupts(delayed=True) is False  # 6 used, device not past the event yet
    dev.push(batch[6:7])
    assert drv.enable_interrupts(delayed=True) is True
    assert len(drv.get_used()) == 7
    assert u16(mem, used_event) == (0xFFF0 + 7) & 0xFFFF  # re-armed for the next completion
    assert drv.enable_interrupts() is False


# -- split: indirect --------------------------------------------------------------------------------


def test_split_indirect_table_is_used_and_freed(mem):
    drv = make(SplitDriver, mem, indirect=True)
    dev = SplitDevice(mem, drv)
    head = drv.add([(DATA_BASE, 4), (DATA_BASE + 4, 4)], [(DATA_BASE + 8, 4)], token="t")
    assert drv.num_free == 7
    addr, ln, flags, _ = spec.SPLIT_DESC.unpack(mem.read(drv.desc + 16 * head, 16))
    assert flags == F_INDIRECT and ln == 48 and drv.pool.bytes_in_use == 48
    table = [spec.SPLIT_DESC.unpack(mem.read(addr + 16 * i, 16)) for i in range(3)]
    assert [(f, n) for _, _, f, n in table] == [(F_NEXT, 1), (F_NEXT, 2), (F_WRITE, 0)]
    drv.add([(DATA_BASE, 4)], [])  # one segment: direct
    assert drv.pool.bytes_in_use == 48
    drv.publish()
    dev.push(echo_all(dev))
    assert drv.get_used()[0] == ("t", 4)
    assert drv.pool.bytes_in_use == 0 and drv.num_free == 8


def test_indirect_falls_back_to_direct_when_pool_is_full_unless_forced(mem):
    pool = BufferPool(mem, POOL_BASE, 64)
    for cls in (SplitDriver, PackedDriver):
        drv = cls.at(mem, 8, RING_BASE, indirect=True, pool=pool)
        blocker = pool.alloc(64)
        drv.add([(DATA_BASE, 4), (DATA_BASE + 4, 4)], [])
        assert drv.num_free == 6
        with pytest.raises(MemoryError):
            drv.add([(DATA_BASE, 4), (DATA_BASE + 4, 4)], [], indirect=True)
        assert drv.num_free == 6
        pool.free(blocker)


@BOTH
def test_indirect_needs_negotiation_and_buffers_need_segments(mem, cls):
    drv = make(cls, mem)
    with pytest.raises(ValueError):
        drv.add([(DATA_BASE, 4)], [], indirect=True)
    with pytest.raises(ValueError):
        drv.add([], [])
    with pytest.raises(ValueError):
        drv.add([(DATA_BASE, 1)] * 9, [])  # longer than the queue


# -- device bugs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bug", ["out_of_range", "not_outstanding", "duplicate", "too_long", "too_many",
                                 "staged"])
def test_split_device_bugs_raise_and_keep_earlier_completions(mem, bug):
    drv = make(SplitDriver, mem)
    dev = SplitDevice(mem, drv)
    for i in range(3):
        drv.add([], [(DATA_BASE, 8)], token=i)
    drv.publish()
    heads = [h for h, _ in echo_all(dev)]
    staged = drv.add([], [(DATA_BASE, 8)], token="s")
    bad = {"out_of_range": [(heads[0], 8), (8, 0)], "not_outstanding": [(heads[0], 8), (5, 0)],
           "duplicate": [(heads[0], 8), (heads[0], 8)], "too_long": [(heads[0], 8), (heads[1], 9)],
           "too_many": [(h, 0) for h in heads] + [(heads[0], 0)],
           "staged": [(heads[0], 8), (staged, 0)]}[bug]
    dev.push(bad)
    with pytest.raises(DeviceProtocolError) as ei:
        drv.get_used()
    if bug != "too_many":
        assert ei.value.reaped == [(0, 8)]
        assert drv.outstanding == 3 and drv.num_free == 5
        with pytest.raises(DeviceProtocolError):
            drv.get_used()  # the bad entry is still there


@pytest.mark.parametrize("bug", ["out_of_range", "not_outstanding", "too_long"])
def test_packed_device_bugs_raise_and_keep_earlier_completions(mem, bug):
    drv = make(PackedDriver, mem)
    dev = PackedDevice(mem, drv)
    for i in range(3):
        drv.add([], [(DATA_BASE, 8)], token=i)
    drv.publish()
    ids = [b for b, _ in echo_all(dev)]
    dev.slots[100] = dev.slots[5] = 1
    bad = {"out_of_range": (100, 0), "not_outstanding": (5, 0), "too_long": (ids[1], 9)}[bug]
    dev.push([(ids[0], 8), bad])
    with pytest.raises(DeviceProtocolError) as ei:
        drv.get_used()
    assert ei.value.reaped == [(0, 8)]
    assert drv.outstanding == 2


# -- packed -----------------------------------------------------------------------------------------


def test_packed_list_carries_its_id_everywhere_and_its_head_flags_come_last(mem):
    drv = make(PackedDriver, mem, size=4, start_index=2)
    dev = PackedDevice(mem, drv)
    bid = drv.add([(DATA_BASE, 4)], [(DATA_BASE + 4, 4), (DATA_BASE + 8, 4)], token="t")
    descs = [spec.PACKED_DESC.unpack(mem.read(drv.desc + 16 * s, 16)) for s in (2, 3, 0)]
    assert [d[2] for d in descs] == [bid] * 3
    # the head (slot 2) is not available yet; slot 3 is in lap 1, slot 0 in lap 0
    assert descs[0][3] == 0 and dev.pop() is None
    assert descs[1][3] == P_AVAIL | F_NEXT | F_WRITE
    assert descs[2][3] == P_USED | F_WRITE
    drv.publish()
    assert u16(mem, drv.desc + 16 * 2 + 14) == P_AVAIL | F_NEXT
    assert dev.pop() == (bid, [(DATA_BASE, 4, False), (DATA_BASE + 4, 4, True), (DATA_BASE + 8, 4, True)])
    assert (drv.next_avail, drv.avail_wrap) == (1, 0)


def test_packed_completion_skips_the_completed_buffers_slots(mem):
    drv = make(PackedDriver, mem, size=8)
    dev = PackedDevice(mem, drv)
    a = drv.add([(DATA_BASE, 1)] * 3, [], token="a")  # slots 0-2
    b = drv.add([(DATA_BASE, 1)], [(DATA_BASE, 2)], token="b")  # slots 3-4
    drv.publish()
    echo_all(dev)
    dev.push([(b, 2)])  # out of order: written at slot 0, cursor moves by 2
    assert drv.get_used() == [("b", 2)]
    assert drv.last_used == 2 and drv.num_free == 5
    dev.push([(a, 0)], write=False)
    assert drv.get_used() == [("a", 0)]
    assert drv.last_used == 5 and drv.num_free == 8


def test_packed_reports_len_only_for_used_descriptors_with_write(mem):
    drv = make(PackedDriver, mem)
    dev = PackedDevice(mem, drv)
    drv.add([(DATA_BASE, 4)], [(DATA_BASE + 4, 4)], token="t")
    drv.publish()
    dev.push([(echo_all(dev)[0][0], 4)], write=False)
    assert drv.get_used() == [("t", 0)]


def test_packed_wraps_with_lists_crossing_the_ring_end(mem):
    drv = make(PackedDriver, mem, size=5)
    dev = PackedDevice(mem, drv)
    rng = random.Random(1)
    got = []
    for i in range(200):
        n = rng.randint(1, 3)
        drv.add([(DATA_BASE, 2)] * (n - 1), [(DATA_BASE, 2)], token=i)
        drv.publish()
        dev.push(echo_all(dev))
        got += drv.get_used()
        assert drv.num_free == 5
    assert got == [(i, 2) for i in range(200)]


@pytest.mark.parametrize("start", [0, 4, 5, 9, 12345])
def test_packed_start_index_sets_slot_and_wrap_and_device_agrees(mem, start):
    drv = make(PackedDriver, mem, size=5, start_index=start)
    assert (drv.next_avail, drv.avail_wrap) == (start % 5, 1 ^ (start // 5) & 1)
    assert drv.pending_used() is False
    dev = PackedDevice(mem, drv)
    assert dev.pop() is None
    for i in range(12):
        drv.add([(DATA_BASE, 1)], [(DATA_BASE, 1)], token=i)
        drv.publish()
        dev.push(echo_all(dev))
        assert drv.get_used() == [(i, 1)]


# -- packed: kick decision and notifications --------------------------------------------------------


@pytest.mark.parametrize("flags,off_wrap,kick", [
    (spec.EventFlags.ENABLE, 0, True),
    (spec.EventFlags.DISABLE, 0, False),
    (spec.EventFlags.RESERVED, 0, True),
    (spec.EventFlags.DESC, 6 | 1 << 15, True),  # first slot of the batch
    (spec.EventFlags.DESC, 7 | 1 << 15, True),  # inside a multi-slot list
    (spec.EventFlags.DESC, 1 | 0 << 15, True),  # last slot, next lap
    (spec.EventFlags.DESC, 2 | 0 << 15, False),  # just past the batch
    (spec.EventFlags.DESC, 5 | 1 << 15, False),  # just before it
    (spec.EventFlags.DESC, 6 | 0 << 15, False),  # right slot, wrong lap
])
def test_packed_kick_decision_follows_device_event(mem, flags, off_wrap, kick):
    drv = make(PackedDriver, mem, size=8, event_idx=True, start_index=6)
    dev = PackedDevice(mem, drv)
    dev.set_event(off_wrap, flags)
    drv.add([(DATA_BASE, 1)] * 3, [])  # slots 6, 7, 0
    drv.add([(DATA_BASE, 1)], [])  # slot 1
    assert drv.publish() is kick


def test_packed_desc_event_is_ignored_without_event_idx(mem):
    drv = make(PackedDriver, mem)
    PackedDevice(mem, drv).set_event(7, spec.EventFlags.DESC)
    drv.add([(DATA_BASE, 1)], [])
    assert drv.publish() is True


def test_packed_event_idx_notifications(mem):
    cm = CountingMemory(mem)
    drv = make(PackedDriver, cm, size=8, event_idx=True)
    dev = PackedDevice(mem, drv)
    for i in range(4):
        drv.add([(DATA_BASE, 1)], [(DATA_BASE, 1)], token=i)
    drv.publish()
    cm.reset_counts()
    drv.disable_interrupts()
    drv.disable_interrupts()
    assert dev.driver_event()[1] == spec.EventFlags.DISABLE and cm.counters[AreaKind.EVENT].writes == 1
    assert drv.enable_interrupts(delayed=True) is False
    assert dev.driver_event() == (6 | 1 << 15, spec.EventFlags.DESC)  # 3/4 of 8 outstanding slots
    dev.push(echo_all(dev)[:1])
    assert drv.enable_interrupts() is True
    assert dev.driver_event() == (0 | 1 << 15, spec.EventFlags.DESC)
    assert drv.get_used() == [(0, 1)]
    assert dev.driver_event() == (2 | 1 << 15, spec.EventFlags.DESC)  # re-armed for the next one


def test_packed_enable_without_event_idx_writes_enable_once(mem):
    cm = CountingMemory(mem)
    drv = make(PackedDriver, cm)
    dev = PackedDevice(mem, drv)
    cm.reset_counts()
    assert drv.enable_interrupts() is False
    assert cm.counters[AreaKind.EVENT].writes == 0  # already ENABLE from initialisation
    drv.disable_interrupts()
    drv.add([(DATA_BASE, 1)], [], token="t")
    drv.publish()
    dev.push(echo_all(dev))
    assert drv.enable_interrupts() is True
    assert dev.driver_event()[1] == spec.EventFlags.ENABLE
    assert cm.counters[AreaKind.EVENT].writes == 2


# -- ordering of the publishing stores ----------------------------------------------------------------


class RecordingArea(Area):
    __slots__ = ("log",)

    def __init__(self, kind, gpa, mv, log):
        super().__init__(kind, gpa, mv)
        self.log = log

    def store16(self, off, value):
        self.log.append(("store16", self.kind, off))
        super().store16(off, value)

    def write(self, off, data):
        self.log.append(("write", self.kind, off))
        super().write(off, data)

    def load16(self, off):
        self.log.append(("load16", self.kind, off))
        return super().load16(off)

    def load32(self, off):
        self.log.append(("load32", self.kind, off))
        return super().load32(off)


class RecordingMemory(GuestMemory):
    def __init__(self, inner):
        self._regions, self._starts = inner._regions, inner._starts
        self.log = []

    def area(self, kind, gpa, size, align=1):
        return RecordingArea(kind, gpa, self.view(gpa, size), self.log)

    def fence(self):
        self.log.append(("fence",))


def test_split_publish_stores_avail_idx_once_then_fences_then_reads_suppression(mem):
    rm = RecordingMemory(mem)
    drv = make(SplitDriver, rm, event_idx=True)
    for _ in range(3):
        drv.add([(DATA_BASE, 1)], [(DATA_BASE, 1)])
    rm.log.clear()
    drv.publish()
    assert rm.log == [("store16", AreaKind.AVAIL, spec.AVAIL_IDX), ("fence",), ("load16", AreaKind.EVENT, 0)]


def test_packed_publish_writes_heads_in_order_then_fences_then_reads_event(mem):
    rm = RecordingMemory(mem)
    drv = make(PackedDriver, rm)
    drv.add([(DATA_BASE, 1)] * 2, [])
    drv.add([(DATA_BASE, 1)], [])
    rm.log.clear()
    drv.publish()
    assert rm.log == [("store16", AreaKind.DESC, 14), ("store16", AreaKind.DESC, 2 * 16 + 14), ("fence",),
                      ("load32", AreaKind.EVENT, 0)]


# -- end to end with payload, random traffic ------------------------------------------------------------


@BOTH
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([1, 2, 4, 8]), event_idx=st.booleans(),
       indirect=st.booleans(), start=st.integers(0, 0xFFFF))
def test_random_traffic_returns_every_token_once_with_the_device_data(cls, seed, size, event_idx, indirect,
                                                                      start):
    mem = GuestMemory.anonymous(MEM_SIZE, shared_fd=False)
    try:
        drv = make(cls, mem, size=size, event_idx=event_idx, indirect=indirect, start_index=start)
        dev = DEVICES[cls](mem, drv)
        data = BufferPool(mem, DATA_BASE, 0x40000)
        rng = random.Random(seed)
        inflight: dict[object, tuple[int, int, bytes]] = {}
        pending = []
        for step in range(150):
            op = rng.random()
            if op < 0.5:
                nseg = rng.randint(0, min(3, size - 1))
                src, dst = data.alloc(8 * nseg + 8), data.alloc(8)
                payload = rng.randbytes(8 * nseg)
                mem.write(src, payload)
                try:
                    drv.add([(src + 8 * i, 8) for i in range(nseg)], [(dst, 8)], token=step)
                except QueueFullError:
                    data.free(src)
                    data.free(dst)
                    continue
                inflight[step] = (src, dst, payload)
            elif op < 0.7:
                drv.publish()
            elif op < 0.9:
                while (item := dev.pop()) is not None:
                    pending.append(item)
                rng.shuffle(pending)
                k = rng.randint(0, len(pending))
                done = []
                for bid, segs in pending[:k]:
                    digest = bytes(sum(mem.read(a, n)) & 0xFF for a, n, w in segs if not w)
                    mem.write(segs[-1][0], digest.ljust(8, b"\0"))
                    done.append((bid, 8))
                del pending[:k]
                dev.push(done)
            else:
                for token, ln in drv.get_used():
                    src, dst, payload = inflight.pop(token)
                    assert ln == 8
                    want = bytes(sum(payload[i:i + 8]) & 0xFF for i in range(0, len(payload), 8))
                    assert mem.read(dst, len(want)) == want
                    data.free(src)
                    data.free(dst)
        drv.publish()
        while (item := dev.pop()) is not None:
            pending.append(item)
        dev.push([(bid, 0) for bid, _ in pending])
        for token, _ in drv.get_used():
            inflight.pop(token)
        assert not inflight and drv.outstanding == 0 and drv.num_free == size
        assert drv.pool.bytes_in_use == 0
    finally:
        mem.close()
