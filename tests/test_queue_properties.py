"""Property tests (hypothesis) of the device queue against the driver model.

1. Random driver behaviour (batch sizes, chains of 1-4 descriptors, indirect
   tables, readable/writable mixes, completions shuffled and published in
   several flushes, start indices next to the u16 wrap, save/restore)
   always ends with every request completed exactly once with the length
   and bytes the device wrote; the driver is woken whenever it asked (and
   never when it disabled interrupts); the kick protocol never loses a
   wake-up. Both directions are modelled sequentially, including a publish
   landing inside the device's arming window and a completion landing
   inside the driver's.
2. Garbage ring contents only ever raise `QueueError` subclasses, never
   hang, write nothing outside the device area and the device-writable
   buffers it was given, and never reach outside guest memory.
3. The spec arithmetic: `vring_need_event` and `packed_need_event` against
   their interval definitions, and packed wrap counters after exactly Q slots.
"""

from __future__ import annotations

import contextlib
import signal
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvirtio import fence as _fence_mod
from pyvirtio.driver import PackedDriver, QueueFullError, ring_layout
from pyvirtio.memory import CountingMemory, GuestMemory, Region
from pyvirtio.queue import ArmResult, QueueError, QueueState, Virtqueue
from pyvirtio.spec import (
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    EVENT_FLAGS,
    EVENT_OFF_WRAP,
    PACKED_DESC,
    SPLIT_DESC,
    USED_IDX,
    EventFlags,
    Feature,
    packed_need_event,
    used_event_offset,
    used_size,
    vring_need_event,
)
from pyvirtio.testing import QueuePair

WRITE = 0x2
P_AVAIL, P_USED = 1 << 7, 1 << 15

#: hypothesis budget per test: 700 + 1200 + 2 x 1000 + 200 = 4100 generated
#: cases per run of this file
MODEL_EXAMPLES = 700
GARBAGE_EXAMPLES = 1200
ARITH_EXAMPLES = 1000
WRAP_EXAMPLES = 200


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the run) if the body takes longer than `seconds`."""
    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"device did not return within {seconds}s (hang or spin)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 29 + i * 7 + 3) & 0xFF for i in range(n))


def rd16(mem: GuestMemory, gpa: int) -> int:
    return int.from_bytes(mem.read(gpa, 2), "little")


def is_bulk(x: object) -> bool:
    return hasattr(x, "chains") and hasattr(x, "n")


# =====================================================================================
# 1. random driver behaviour
# =====================================================================================


@dataclass
class Req:
    token: int
    out: list[tuple[int, int]]
    ins: list[tuple[int, int]]
    data: bytes
    written: int | None = None


@dataclass
class Model:
    """The sequential world: one driver, one device, no real concurrency."""

    pair: QueuePair
    data: st.DataObject
    bulk: bool
    reqs: dict[int, Req] = field(default_factory=dict)
    id_to_token: dict[int, int] = field(default_factory=dict)
    next_token: int = 0
    published: set[int] = field(default_factory=set)
    popped: set[int] = field(default_factory=set)      # handed to the device at least once
    redeliver: set[int] = field(default_factory=set)   # in flight across a restore, not handed out again yet
    held: list[tuple[object, list[tuple[object, int]]]] = field(default_factory=list)  # (unit, [(chain, token)])
    reaped: Counter = field(default_factory=Counter)
    # device fetch side
    awake: bool = True
    last_pop_empty: bool = False
    kicks: int = 0
    latched: bool = False       # a kick that arrived while awake (an eventfd stays readable)
    # interrupts
    decided: bool = False       # a decision happened since (re)start: the first one is forced
    waiting: bool = False       # the driver sleeps until an interrupt
    sleep_info: tuple = ()
    intr_disabled: bool = False
    interrupts: int = 0
    decisions: int = 0

    @property
    def vq(self) -> Virtqueue:
        return self.pair.vq

    @property
    def q(self) -> int:
        return self.pair.size

    # -- driver ------------------------------------------------------------------------

    def submit(self, n: int) -> None:
        """Add up to n requests (fewer if the ring is full) and publish."""
        d = self.data
        drv = self.pair.driver
        pool = self.pair.pool
        for _ in range(n):
            nseg = d.draw(st.integers(1, min(4, self.q)), label="segments")
            nread = d.draw(st.integers(0, nseg), label="readable")
            lens = d.draw(st.lists(st.integers(0, 40), min_size=nseg, max_size=nseg), label="lens")
            ind = d.draw(st.sampled_from([None, True, False]) if drv.indirect else st.just(False),
                         label="indirect")
            tok = self.next_token
            out = [(pool.alloc(max(ln, 1)), ln) for ln in lens[:nread]]
            ins = [(pool.alloc(max(ln, 1)), ln) for ln in lens[nread:]]
            blob = pattern(tok, sum(lens[:nread]))
            pos = 0
            for g, ln in out:
                self.pair.raw.write(g, blob[pos : pos + ln])
                pos += ln
            try:
                cid = drv.add(out, ins, token=tok, indirect=ind)
            except QueueFullError:
                for g, _ in out + ins:
                    pool.free(g)
                break
            self.next_token += 1
            self.reqs[tok] = Req(tok, out, ins, blob)
            self.id_to_token[cid] = tok
        self.publish()

    def publish(self) -> None:
        staged = [t for t in self.reqs if t not in self.published and t not in self.reaped]
        kicked = self.pair.driver.publish()
        self.published.update(staged)
        if kicked:
            self.kicks += 1
            if not self.awake:
                self.awake = True
                self.last_pop_empty = False
            else:
                self.latched = True
        self.check_no_lost_wakeup("after a publish")

    def reap(self) -> None:
        for tok, ln in self.pair.driver.get_used():
            self.check_reaped(tok, ln)

    def check_reaped(self, tok: object, ln: int) -> None:
        assert isinstance(tok, int)
        r = self.reqs[tok]
        assert self.reaped[tok] == 0, f"request {tok} completed twice"
        self.reaped[tok] += 1
        assert r.written is not None, f"request {tok} reaped but the device never completed it"
        assert ln == r.written, f"request {tok}: used len {ln}, device wrote {r.written}"
        got = b"".join(self.pair.raw.read(g, n) for g, n in r.ins if n)[:ln]
        assert got == pattern(tok + 1000, ln)
        for g, _ in r.out + r.ins:
            self.pair.pool.free(g)

    def enable(self, delayed: bool, inject: bool) -> None:
        """The driver re-enables interrupts and sleeps unless told not to."""
        drv = self.pair.driver
        woken = []
        if inject and self.held:
            # A completion lands between the driver's enable store and its
            # re-check (its full fence): the mirror race of section 5.
            orig = drv._fence

            def hook() -> None:
                drv._fence = orig
                orig()
                woken.append(self.device_complete(quiet=True))

            drv._fence = hook
            try:
                pending = drv.enable_interrupts(delayed=delayed)
            finally:
                drv._fence = orig
        else:
            pending = drv.enable_interrupts(delayed=delayed)
        self.intr_disabled = False
        if pending or any(woken):
            if any(woken):
                event("completion inside the enable window caught")
            self.reap()
            return
        self.waiting = True
        p = self.pair
        if p.packed:
            self.sleep_info = (drv.last_used + self.q * (1 - drv.used_wrap),
                               rd16(p.raw, p.driver_area + EVENT_FLAGS) & 3,
                               rd16(p.raw, p.driver_area + EVENT_OFF_WRAP))
        else:
            self.sleep_info = (drv.last_used, rd16(p.raw, p.driver_area + used_event_offset(self.q)))
        assert not self.wake_point_passed(), "interrupt lost: the driver sleeps past its wake point"

    def wake_point_passed(self) -> bool:
        """Has the device published past the point the sleeping driver asked for?"""
        p = self.pair
        if p.packed:
            p_last, mode, off_wrap = self.sleep_info
            s = self.vq.save()
            q2 = 2 * self.q
            p_now = s.used_idx + self.q * (1 - int(s.used_wrap))
            if mode == EventFlags.DESC and p.driver.event_idx:
                p_off = (off_wrap & 0x7FFF) + self.q * (1 - (off_wrap >> 15))
                return (p_now - p_last) % q2 > (p_off - p_last) % q2
            return p_now != p_last
        last, ue = self.sleep_info
        used = rd16(p.raw, p.device_area + USED_IDX)
        if p.driver.event_idx:
            return ((used - last) & 0xFFFF) > ((ue - last) & 0xFFFF)
        return used != last

    def on_decision(self, notify: bool) -> None:
        first = not self.decided
        self.decided = True
        self.decisions += 1
        if notify:
            self.interrupts += 1
            assert first or not self.intr_disabled, "interrupt although the driver disabled them"
            if self.waiting:
                event("driver woken by an interrupt")
                self.waiting = False
                self.reap()
        elif self.waiting:
            assert not self.wake_point_passed(), "interrupt lost: the driver sleeps past its wake point"

    # -- device ------------------------------------------------------------------------

    def pending_work(self) -> set[int]:
        return (self.published - self.popped) | self.redeliver

    def check_no_lost_wakeup(self, when: str) -> None:
        if not self.awake:
            assert not self.pending_work(), f"lost wake-up {when}: device asleep, work pending"

    def device_pop(self, limit: int) -> None:
        if self.bulk:
            got = self.vq.pop_bulk(limit)
            units = [(got, got.chains())] if is_bulk(got) else [(c, [c]) for c in got]
        else:
            units = [(c, [c]) for c in self.vq.pop_batch(limit)]
        n = 0
        for unit, chains in units:
            pairs = []
            for c in chains:
                tok = self.id_to_token[c.id]
                r = self.reqs[tok]
                assert tok in self.published and r.written is None
                assert tok not in self.popped or tok in self.redeliver, f"request {tok} handed out twice"
                self.redeliver.discard(tok)
                self.popped.add(tok)
                assert c.readable_len == len(r.data) and c.read() == r.data
                assert c.writable_len == sum(n for _, n in r.ins)
                pairs.append((c, tok))
                n += 1
            self.held.append((unit, pairs))
        assert n <= limit
        self.last_pop_empty = n == 0
        if n == 0:
            assert not self.pending_work(), "pop found nothing although work was published"

    def device_arm(self, inject: int) -> None:
        vq = self.vq
        kicks = self.kicks
        if inject:
            # The driver publishes between the device's kick-enable store and
            # its re-check (inside its full fence): the race of section 5.
            # (Patched where the memory's fence calls it, not on the memory
            # object: a compiled engine's native classes take no instance patch.)
            orig = _fence_mod.full

            def hook() -> None:
                _fence_mod.full = orig
                orig()
                self.submit(inject)

            _fence_mod.full = hook
            try:
                work = vq.arm()
            finally:
                _fence_mod.full = orig
        else:
            work = vq.arm()
        if work is ArmResult.WORK or self.kicks != kicks:
            if inject:
                event("publish inside the arming window caught")
            self.last_pop_empty = False  # process (or woken at once by the kick)
            return
        if self.latched and self.vq.eager:
            # The eager baseline arms inside pop_batch, before arm(): a publish
            # in between is kicked, and the latched kick wakes it at once. The
            # lazy path must not need this: its arm() re-check finds the work.
            self.latched = False
            self.last_pop_empty = False
            return
        self.latched = False
        self.awake = False
        self.check_no_lost_wakeup("after arm() said idle")

    def device_complete(self, quiet: bool = False) -> bool:
        """Complete some held units in random order, in 1-3 flushes."""
        d = self.data
        if not self.held:
            return False
        k = d.draw(st.integers(1, len(self.held)), label="complete how many")
        order = d.draw(st.permutations(range(len(self.held))), label="completion order")[:k]
        chosen = [self.held[i] for i in order]
        self.held = [u for i, u in enumerate(self.held) if i not in set(order)]
        cuts = sorted(d.draw(st.sets(st.integers(1, max(1, k - 1)), max_size=2), label="flushes"))
        groups = [chosen[a:b] for a, b in zip([0, *cuts], [*cuts, k]) if a < b]
        notified = False
        for group in groups:
            for unit, pairs in group:
                written = []
                for c, tok in pairs:
                    w = d.draw(st.integers(0, c.writable_len), label="written") if c.writable_len else 0
                    assert c.write(pattern(tok + 1000, w)) == w
                    self.reqs[tok].written = w
                    written.append(w)
                if is_bulk(unit):
                    notify = self.vq.complete_bulk(unit, np.array(written, np.uint32))
                else:
                    notify = self.vq.complete(unit, written[0])
                if self.vq.eager:
                    notified |= notify
                    if not quiet:
                        self.on_decision(notify)
            notify = self.vq.flush()
            if not self.vq.eager:
                notified |= notify
                if not quiet:
                    self.on_decision(notify)
        if quiet:  # decided inside the driver's enable window: the driver is not asleep yet
            self.decided = True
        return notified

    def save_restore(self) -> None:
        st_ = self.vq.save()
        self.pair.vq = self.pair.new_device(st_)
        for _unit, pairs in self.held:
            for _c, tok in pairs:
                self.redeliver.add(tok)
        self.held = []
        event("saved and restored")
        self.decided = False
        self.awake = True
        self.last_pop_empty = False

    # -- the end ---------------------------------------------------------------------------

    def drain(self) -> None:
        """Everyone wakes up and finishes: every request completes exactly once."""
        if self.waiting:
            self.waiting = False
        self.awake = True
        for _ in range(4 * len(self.reqs) + 8):
            if all(self.reaped[t] for t in self.reqs):
                break
            self.device_pop(self.q)
            while self.held:
                self.device_complete()
            self.reap()
        assert set(self.reqs) == set(self.reaped)
        event(f"requests completed: {'0' if not self.reqs else '1-9' if len(self.reqs) < 10 else '10+'}")
        if not self.pair.packed and self.pair.driver.avail_idx < self.pair.driver.start_index:
            event("split indices crossed 65535")
        assert all(v == 1 for v in self.reaped.values())
        assert self.vq.failed is None


#: weighted: the common steps often, save/restore and disabling now and then
ACTIONS = ["submit"] * 4 + ["pop"] * 4 + ["arm"] * 3 + ["complete"] * 4 + ["reap"] * 2 + ["enable"] * 2 + [
    "disable", "save"]


@settings(max_examples=MODEL_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_driver_behaviour_completes_every_request_once_and_wakes_both_sides(data: st.DataObject) -> None:
    ring = data.draw(st.sampled_from(["split", "packed"]), label="ring")
    if ring == "split":
        size = data.draw(st.sampled_from([1, 2, 4, 8, 16]), label="size")
        start = data.draw(st.one_of(st.just(0), st.integers(0x10000 - size, 0xFFFF),
                                    st.integers(0x10000 - 4 * size, 0xFFFF), st.integers(0, 0xFFFF)),
                          label="start")
    else:
        size = data.draw(st.sampled_from([1, 2, 3, 4, 5, 8, 13]), label="size")
        start = data.draw(st.integers(0, 4 * size), label="start")
    event_idx = data.draw(st.booleans(), label="event_idx")
    indirect = data.draw(st.booleans(), label="indirect")
    policy = data.draw(st.sampled_from(["lazy", "lazy", "eager"]), label="policy")
    bulk = policy == "lazy" and data.draw(st.booleans(), label="pop_bulk")
    pair = QueuePair(ring, size, event_idx=event_idx, indirect=indirect, policy=policy,
                     mem_size=1 << 18, start_index=start)
    if ring == "packed" and start:
        slot, wrap = start % size, not (start // size) & 1
        pair.vq = pair.new_device(QueueState(size, True, slot, wrap, slot, wrap, ()))
    m = Model(pair, data, bulk)
    with deadline(5.0):
        for _ in range(data.draw(st.integers(1, 30), label="steps")):
            action = data.draw(st.sampled_from(ACTIONS), label="action")
            if action == "submit":
                m.submit(data.draw(st.integers(1, size), label="batch"))
            elif action == "pop" and m.awake:
                m.device_pop(data.draw(st.integers(1, size + 2), label="limit"))
            elif action == "arm" and m.awake and m.last_pop_empty:
                inject = data.draw(st.integers(0, 2), label="publish inside arm") if policy == "lazy" else 0
                m.device_arm(inject)
            elif action == "complete":
                m.device_complete()
            elif action == "reap" and not m.waiting:
                m.reap()
            elif action == "enable" and not m.waiting:
                delayed = event_idx and data.draw(st.booleans(), label="delayed")
                m.enable(delayed, data.draw(st.booleans(), label="complete inside enable"))
            elif action == "disable" and not m.waiting:
                pair.driver.disable_interrupts()
                m.intr_disabled = True
            elif action == "save":
                m.save_restore()
        m.drain()


# =====================================================================================
# 2. garbage rings
# =====================================================================================

GUARD = 4096
MAIN = 0x10000           # region 0: [0, 64 KiB)
SECOND = 0x20000         # region 1: [128 KiB, 132 KiB); a hole in between
SECOND_SIZE = 0x1000
RING_BASE = 0x1000
TABLES = (0x8000, 0x8400, 0x20800)  # where garbage indirect tables live
CANARY = 0x5C

VALID_ADDR = st.integers(0x4000, 0xC000)
ADDRS = st.one_of(
    VALID_ADDR, VALID_ADDR, VALID_ADDR,
    st.sampled_from([0, RING_BASE, MAIN - 8, MAIN, 0x18000, SECOND, SECOND + 0xFF8, SECOND_SIZE + SECOND,
                     1 << 40, (1 << 64) - 8, (1 << 64) - 1]),
    st.integers(0, (1 << 64) - 1),
)
SMALL_LEN = st.integers(0, 64)
LENS = st.one_of(SMALL_LEN, SMALL_LEN, SMALL_LEN,
                 st.sampled_from([0x1000, 0xFFF0, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF]),
                 st.integers(0, 0xFFFFFFFF))
U16 = st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF))


def descriptor(q: int, packed: bool) -> st.SearchStrategy[tuple[int, int, int, int]]:
    """(addr, len, flags, next-or-id): mostly plausible, sometimes anything."""
    low = st.sampled_from([0, 0, 2, 2, 1, 3, 4, 5, 6, 7])  # NEXT=1 WRITE=2 INDIRECT=4
    if packed:
        low = low.map(lambda f: f | P_AVAIL)  # available in the device's first lap
    flags = st.one_of(low, low, low, st.integers(0, 0xFFFF))
    nxt = st.one_of(st.integers(0, q - 1), st.integers(0, q - 1), st.integers(0, q + 1), st.integers(0, 0xFFFF))
    plain = st.tuples(ADDRS, LENS, flags, nxt)
    table_flags = st.sampled_from([4, 5, 6, 4 | P_AVAIL, 5 | P_AVAIL]) if packed else st.sampled_from([4, 5, 6])
    table = st.tuples(st.sampled_from(TABLES), st.sampled_from([0, 16, 32, 48, 64, 24]), table_flags, nxt)
    return st.one_of(plain, plain, plain, table)


def addr_of(mv: memoryview) -> int:
    return int(np.frombuffer(mv, np.uint8).ctypes.data)


class GarbageWorld:
    """Guest memory in two regions, each carved out of a bigger host buffer
    with canary bytes around it (so that any access outside guest memory
    would show); the ring at RING_BASE; the device on a counting view."""

    def __init__(self, packed: bool, size: int, event_idx: bool, indirect: bool, policy: str) -> None:
        self.host0 = bytearray([CANARY]) * (GUARD + MAIN + GUARD)
        self.host1 = bytearray([CANARY]) * (GUARD + SECOND_SIZE + GUARD)
        mv0 = memoryview(self.host0)[GUARD : GUARD + MAIN]
        mv1 = memoryview(self.host1)[GUARD : GUARD + SECOND_SIZE]
        mv0[:] = bytes(MAIN)
        mv1[:] = bytes(SECOND_SIZE)
        self.raw = GuestMemory([Region.from_buffer(mv0, 0), Region.from_buffer(mv1, SECOND)])
        self.mem = CountingMemory(self.raw)
        self.packed = packed
        self.size = size
        self.desc, self.drv, self.dev, self.end = ring_layout(packed, size, RING_BASE)
        features = Feature.VERSION_1 | (Feature.RING_PACKED if packed else 0)
        features |= (Feature.RING_EVENT_IDX if event_idx else 0) | (Feature.RING_INDIRECT_DESC if indirect else 0)
        self.vq = Virtqueue(self.mem, size, self.desc, self.drv, self.dev, features=int(features),
                            policy=policy)  # type: ignore[arg-type]
        self.region_spans = [(addr_of(mv0), addr_of(mv0) + MAIN), (addr_of(mv1), addr_of(mv1) + SECOND_SIZE)]

    def snapshot(self) -> tuple[bytes, bytes]:
        return bytes(self.host0[GUARD : GUARD + MAIN]), bytes(self.host1[GUARD : GUARD + SECOND_SIZE])

    def device_spans(self) -> list[tuple[int, int]]:
        if self.packed:
            return [(self.dev, self.dev + 4), (self.desc, self.desc + 16 * self.size)]
        return [(self.dev, self.dev + used_size(self.size))]

    def check_changes(self, before: tuple[bytes, bytes], allowed: list[tuple[int, int]]) -> None:
        for (old, base), new in zip(zip(before, (0, SECOND)), self.snapshot()):
            if old == new:
                continue
            diff = np.flatnonzero(np.frombuffer(old, np.uint8) != np.frombuffer(new, np.uint8)) + base
            outside = [a for a in diff.tolist() if not any(lo <= a < hi for lo, hi in allowed)]
            assert not outside, f"device wrote guest memory it does not own: {outside[:8]}"

    def check_canaries(self) -> None:
        for host, n in ((self.host0, MAIN), (self.host1, SECOND_SIZE)):
            assert host[:GUARD] == bytes([CANARY]) * GUARD
            assert host[GUARD + n :] == bytes([CANARY]) * GUARD

    def view_gpa_span(self, v: memoryview) -> tuple[int, int]:
        a = addr_of(v)
        for (lo, hi), gpa in zip(self.region_spans, (0, SECOND)):
            if lo <= a and a + len(v) <= hi:
                return gpa + a - lo, gpa + a - lo + len(v)
        raise AssertionError("a chain's view lies outside guest memory")

    # -- the hostile driver's writes -------------------------------------------------------

    def write_desc(self, i: int, d: tuple[int, int, int, int]) -> None:
        st_ = PACKED_DESC if self.packed else SPLIT_DESC
        a, ln, fl, x = d
        data = st_.pack(a, ln, x, fl) if self.packed else st_.pack(a, ln, fl, x)
        self.raw.write(self.desc + 16 * (i % self.size), data)

    def write_table(self, t: int, descs: list[tuple[int, int, int, int]]) -> None:
        for k, (a, ln, fl, x) in enumerate(descs):
            st_ = PACKED_DESC if self.packed else SPLIT_DESC
            self.raw.write(t + 16 * k, st_.pack(a, ln, x, fl) if self.packed else st_.pack(a, ln, fl, x))

    def write16(self, gpa: int, v: int) -> None:
        self.raw.write(gpa, struct.pack("<H", v & 0xFFFF))


def scribble(w: GarbageWorld, data: st.DataObject, first: bool) -> None:
    """The hostile driver writes arbitrary ring contents."""
    q = w.size
    desc = descriptor(q, w.packed)
    if first:
        for i in range(q):
            w.write_desc(i, data.draw(desc, label="desc"))
        for t in TABLES:
            w.write_table(t, data.draw(st.lists(descriptor(4, False), max_size=4), label="table"))
    else:
        for _ in range(data.draw(st.integers(0, 3), label="rewrites")):
            w.write_desc(data.draw(st.integers(0, q - 1)), data.draw(desc, label="desc"))
    if w.packed:
        if data.draw(st.booleans(), label="driver event"):
            w.write16(w.drv + EVENT_OFF_WRAP, data.draw(U16))
            w.write16(w.drv + EVENT_FLAGS, data.draw(U16))
        return
    for k in range(data.draw(st.integers(0, q), label="heads")):
        w.write16(w.drv + AVAIL_RING + 2 * ((k + data.draw(st.integers(0, q))) % q),
                  data.draw(st.one_of(st.integers(0, q - 1), st.integers(0, q - 1), st.integers(0, q + 1),
                                      st.integers(0, 0xFFFF)), label="head"))
    if data.draw(st.booleans(), label="move idx"):
        old = rd16(w.raw, w.drv + AVAIL_IDX)
        step = st.integers(0, q + 1).map(lambda d: old + d)
        new = data.draw(st.one_of(step, step, step, st.integers(0, 0xFFFF)), label="avail idx")
        w.write16(w.drv + AVAIL_IDX, new)
    if data.draw(st.booleans(), label="flags/event"):
        w.write16(w.drv + AVAIL_FLAGS, data.draw(U16))
        w.write16(w.drv + used_event_offset(q), data.draw(U16))


@settings(max_examples=GARBAGE_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_garbage_rings_only_raise_queue_errors_and_touch_only_what_the_device_owns(data: st.DataObject) -> None:
    packed = data.draw(st.booleans(), label="packed")
    size = data.draw(st.sampled_from([1, 2, 4, 8, 16] if not packed else [1, 2, 3, 4, 7, 8, 16]), label="size")
    policy = data.draw(st.sampled_from(["lazy", "eager"]), label="policy")
    bulk = policy == "lazy" and data.draw(st.booleans(), label="pop_bulk")
    w = GarbageWorld(packed, size, data.draw(st.booleans(), label="event_idx"),
                     data.draw(st.booleans(), label="indirect"), policy)
    vq = w.vq
    held: list[tuple[object, list]] = []
    failed = False
    with deadline(2.0):
        for rnd in range(data.draw(st.integers(1, 6), label="rounds")):
            scribble(w, data, rnd == 0)
            before = w.snapshot()
            allowed = w.device_spans()
            try:
                limit = data.draw(st.integers(1, size + 2), label="limit")
                if bulk:
                    got = vq.pop_bulk(limit)
                    units = [(got, got.chains())] if is_bulk(got) else [(c, [c]) for c in got]
                else:
                    units = [(c, [c]) for c in vq.pop_batch(limit)]
                assert sum(len(cs) for _, cs in units) <= limit
                for unit, chains in units:
                    for c in chains:
                        spans = [w.view_gpa_span(v) for v in c.readable + c.writable]
                        assert sum(len(v) for v in c.readable) == c.readable_len
                        assert sum(len(v) for v in c.writable) == c.writable_len
                        assert c.readable_len + c.writable_len <= 1 << 32
                        del spans
                    held.append((unit, chains))
                    event("garbage accepted as a chain")
                assert vq.in_flight <= size
                # complete a random part, writing into the writable buffers
                k = data.draw(st.integers(0, len(held)), label="complete")
                for unit, chains in held[:k]:
                    ws = []
                    for c in chains:
                        n = min(c.writable_len, data.draw(st.integers(0, 64), label="written"))
                        c.write(b"\xd7" * n)
                        rem = n
                        for v in c.writable:
                            if rem <= 0:
                                break
                            lo, hi = w.view_gpa_span(v)
                            allowed.append((lo, min(hi, lo + rem)))
                            rem -= len(v)
                        ws.append(n)
                    if is_bulk(unit):
                        vq.complete_bulk(unit, np.array(ws, np.uint32))
                    else:
                        vq.complete(unit, ws[0])
                del held[:k]
                vq.flush()
                vq.has_work()
                vq.arm()
            except QueueError as e:
                event(f"retired: {type(e).__name__}")
                failed = True
            w.check_changes(before, allowed)
            w.check_canaries()
            if failed:
                for _ in range(2):
                    assert vq.pop_batch() == [] and vq.arm() is ArmResult.SLEEP and vq.has_work() is False
                # chains taken before the failure can still be completed
                for unit, chains in held:
                    if is_bulk(unit):
                        vq.complete_bulk(unit, 0)
                    else:
                        vq.complete(unit, 0)
                vq.flush()
                break


# =====================================================================================
# 3. spec arithmetic
# =====================================================================================


@pytest.mark.parametrize("event,new,old,want", [
    (12, 14, 10, True),      # virtqueue.md 2.6: 1 < 4
    (14, 14, 10, False),     # 65535 < 4 is false
    (10, 14, 10, True),      # the first entry of the batch
    (13, 14, 10, True),      # the last entry of the batch
    (9, 14, 10, False),      # behind the batch
    (10, 11, 10, True),      # k = 1: used_event == old
    (11, 11, 10, False),
    (0xFFFF, 2, 0xFFFE, True),  # across the u16 wrap
    (0, 2, 0xFFFE, True),
    (1, 2, 0xFFFE, True),
    (2, 2, 0xFFFE, False),
    (0xFFFD, 2, 0xFFFE, False),
])
def test_vring_need_event_examples(event: int, new: int, old: int, want: bool) -> None:
    assert vring_need_event(event, new, old) is want


@settings(max_examples=ARITH_EXAMPLES, deadline=None)
@given(old=st.integers(0, 0xFFFF), k=st.integers(1, 0xFFFF), event=st.integers(0, 0xFFFF))
def test_vring_need_event_is_event_inside_the_published_range(old: int, k: int, event: int) -> None:
    new = (old + k) & 0xFFFF
    in_range = ((event - old) & 0xFFFF) < k  # event in [old, new) mod 2^16
    assert vring_need_event(event, new, old) is in_range


def doubled(slot: int, wrap: int, q: int) -> int:
    """Position on the doubled ring: p(i, w) = i + Q(1 - w)."""
    return slot + q * (1 - wrap)


@settings(max_examples=ARITH_EXAMPLES, deadline=None)
@given(data=st.data())
def test_packed_need_event_is_the_range_test_on_the_doubled_ring(data: st.DataObject) -> None:
    q = data.draw(st.one_of(st.integers(1, 16), st.integers(1, 32768), st.just(32768)), label="q")
    old_slot = data.draw(st.integers(0, q - 1), label="old slot")
    old_wrap = data.draw(st.integers(0, 1), label="old wrap")
    d = data.draw(st.integers(1, q), label="slots published")
    p_old = doubled(old_slot, old_wrap, q)
    p_new = (p_old + d) % (2 * q)
    new_slot, new_wrap = p_new % q, 1 - p_new // q
    assert doubled(new_slot, new_wrap, q) == p_new
    off = data.draw(st.one_of(st.integers(0, q - 1), st.sampled_from([old_slot, new_slot, (old_slot + d - 1) % q])),
                    label="event slot")
    ewrap = data.draw(st.integers(0, 1), label="event wrap")
    p_off = doubled(off, ewrap, q)
    want = (p_off - p_old) % (2 * q) < (p_new - p_old) % (2 * q)
    assert packed_need_event(off | ewrap << 15, new_slot, old_slot, new_wrap, q) is want


@pytest.mark.parametrize("q", [1, 2, 3, 6, 8])
@pytest.mark.parametrize("lists", [[1] * 8, [2, 3, 1, 2], [8], [3, 3, 2]])
def test_packed_wrap_counters_toggle_after_exactly_q_slots(q: int, lists: list[int]) -> None:
    """Both wrap counters toggle exactly when the slot count reaches Q, for
    single- and multi-slot lists alike (OpenVMM 547661407)."""
    pair = QueuePair("packed", q)
    total = 0
    for n in lists:
        n = min(n, q)
        bufs = [(pair.pool.alloc(4), 4) for _ in range(n)]
        pair.driver.add(bufs, [], token=total, indirect=False)
        pair.driver.publish()
        (c,) = pair.vq.pop_batch()
        assert c.slots == n
        total += n
        s = pair.vq.save()
        assert (s.last_avail, s.avail_wrap) == (total % q, (total // q) % 2 == 0)
        pair.vq.complete(c, 0)
        pair.vq.flush()
        s = pair.vq.save()
        assert (s.used_idx, s.used_wrap) == (total % q, (total // q) % 2 == 0)
        assert (pair.driver.next_avail, pair.driver.avail_wrap) == (total % q, 1 - (total // q) % 2)
        assert len(pair.driver.get_used()) == 1
        assert (pair.driver.last_used, pair.driver.used_wrap) == (total % q, 1 - (total // q) % 2)


@settings(max_examples=WRAP_EXAMPLES, deadline=None)
@given(q=st.integers(1, 12), lists=st.lists(st.integers(1, 12), min_size=1, max_size=30),
       start=st.integers(0, 40))
def test_packed_device_cursors_track_the_driver_through_any_list_sizes(q: int, lists: list[int],
                                                                       start: int) -> None:
    pair = QueuePair("packed", q, start_index=start)
    slot, wrap = start % q, not (start // q) & 1
    pair.vq = pair.new_device(QueueState(q, True, slot, wrap, slot, wrap, ()))
    for n in lists:
        n = min(n, q)
        pair.driver.add([(pair.pool.alloc(4), 4) for _ in range(n)], [], token=n, indirect=False)
        pair.driver.publish()
        (c,) = pair.vq.pop_batch()
        assert c.slots == n
        pair.vq.complete(c, 0)
        pair.vq.flush()
        assert pair.driver.get_used() == [(n, 0)]
        s = pair.vq.save()
        drv = pair.driver
        assert isinstance(drv, PackedDriver)
        assert (s.last_avail, int(s.avail_wrap)) == (drv.next_avail, drv.avail_wrap)
        assert (s.used_idx, int(s.used_wrap)) == (drv.last_used, drv.used_wrap)
