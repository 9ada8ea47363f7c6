"""Packed virtqueue, device side (virtio 1.2 section 2.8).

Access discipline (each line is one guest-memory access):
- availability: the 2-byte `flags` of the next slot, nothing else;
- a batch: the flags of each slot of the available run, then one bulk read
  of the run's descriptor bodies (two when it wraps);
- completion: one aligned 8-byte store per used descriptor covering
  len|id|flags, so the flags can never be seen without their id and length
  (the `addr` field is never written);
- after a batch: a full fence and one 4-byte read of the driver's event
  suppression structure.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from pyvirtio import fence as _fence
from pyvirtio.memory import HAVE_RING_SCAN, AreaKind, GuestMemory, GuestMemoryError
from pyvirtio.queue.bulk import PACKED_DESC_DTYPE, Bulk
from pyvirtio.queue.chain import IOV_MIN_SEGMENTS, Chain, build_chain, build_iov_chain
from pyvirtio.queue.errors import (
    BadBufferAddress,
    BadIndirectTable,
    ChainTooLong,
    IndirectInList,
    IndirectNotNegotiated,
    IndirectWithNext,
    InvalidQueueGeometry,
    NestedIndirect,
    TooManyInFlight,
)
from pyvirtio.queue.state import QueueState
from pyvirtio.spec import (
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    PACKED_DESC,
    PACKED_DESC_ALIGN,
    PACKED_EVENT_ALIGN,
    PACKED_FLAGS,
    EventFlags,
    PackedDescFlags,
    packed_need_event,
)

_NEXT: Final = int(PackedDescFlags.NEXT)
_MAX: Final = np.maximum.reduce  # ufunc methods: cheaper per batch than ndarray.max()/.any()
_MIN: Final = np.minimum.reduce
_OR: Final = np.bitwise_or.reduce
_WRITE: Final = int(PackedDescFlags.WRITE)
_INDIRECT: Final = int(PackedDescFlags.INDIRECT)
_AVAIL: Final = int(PackedDescFlags.AVAIL)
_USED: Final = int(PackedDescFlags.USED)
_BOTH: Final = _AVAIL | _USED
_ENABLE: Final = int(EventFlags.ENABLE)
_DISABLE: Final = int(EventFlags.DISABLE)
_DESC: Final = int(EventFlags.DESC)
_WEAK: Final = _fence.WEAK_ORDERING
_FLAGS_WORD: Final = PACKED_FLAGS // 2  # u16 index of `flags` within a descriptor
_EMPTY: Final = np.empty(0, np.uint16)
#: an indirect entry's flags (low byte) -> class: r readable, w writable, ? INDIRECT (not allowed)
_CLASSES: Final = bytes(ord("?") if f & _INDIRECT else ord("w") if f & _WRITE else ord("r") for f in range(256))
_SHAPE: Final = re.compile(rb"(r*)w*")


class PackedRing:
    """Device side of one packed ring. Used through `Virtqueue`."""

    packed = True

    def __init__(self, mem: GuestMemory, size: int, desc: int, driver: int, device: int, *,
                 event_idx: bool, indirect: bool) -> None:
        if not 1 <= size <= MAX_QUEUE_SIZE:
            raise InvalidQueueGeometry(f"packed queue size {size} is not in 1..32768")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        try:
            self.desc = mem.area(AreaKind.DESC, desc, DESC_SIZE * size, PACKED_DESC_ALIGN)
            self.driver_event = mem.area(AreaKind.EVENT, driver, 4, PACKED_EVENT_ALIGN)
            self.device_event = mem.area(AreaKind.EVENT, device, 4, PACKED_EVENT_ALIGN)
        except GuestMemoryError as e:
            raise InvalidQueueGeometry(f"packed ring areas: {e}") from None
        spans = sorted([(desc, DESC_SIZE * size), (driver, 4), (device, 4)])
        for (a, alen), (b, _) in itertools.pairwise(spans):
            if a + alen > b:
                raise InvalidQueueGeometry(f"packed ring areas overlap at {b:#x}")
        self.payload = getattr(mem, "counters", {}).get(AreaKind.PAYLOAD)
        self.next_avail = 0
        self.avail_wrap = True
        self.next_used = 0
        self.used_wrap = True
        self.in_flight_slots = 0
        self.kick_flags: int | None = None   # shadow of the device event flags
        self._run_guess = 8                  # length of the last available run (bulk scan)
        # the C scan's output, reused: a batch keeps its own copy of the
        # flags (`packed_bodies` writes them into its descriptor records)
        self._scan_out = np.empty(size + 1, np.uint16)
        # the same as a memoryview: what the C calls take (a numpy buffer
        # export costs ~0.1 us per call, a memoryview's a fraction of that)
        self._scan_mv = self._scan_out.data
        self.signalled_valid = False

    # -- state ---------------------------------------------------------------

    def restore(self, st: QueueState) -> None:
        self.next_avail, self.avail_wrap = st.last_avail, st.avail_wrap
        self.next_used, self.used_wrap = st.used_idx, st.used_wrap
        # slots between the used and avail cursors on the doubled ring
        a = self.next_avail + (0 if self.avail_wrap else self.size)
        u = self.next_used + (0 if self.used_wrap else self.size)
        self.in_flight_slots = (a - u) % (2 * self.size)
        self.signalled_valid = False

    def cursor(self) -> tuple[int, bool, int, bool]:
        return self.next_avail, self.avail_wrap, self.next_used, self.used_wrap

    def in_flight(self) -> int:
        return self.in_flight_slots

    def rewind(self, pos: int, slots: int) -> bool:
        """Un-take the most recent chains, which start at slot `pos` and
        occupy `slots` slots up to the avail cursor: the next fetch takes
        them again. Returns False (nothing changed) when they are not that."""
        if slots > self.in_flight_slots or (pos + slots - self.next_avail) % self.size:
            return False
        if slots > self.next_avail:  # they started before the cursor last wrapped
            self.avail_wrap = not self.avail_wrap
        self.next_avail = pos
        self.in_flight_slots -= slots
        return True

    # -- availability (read-only) ------------------------------------------------

    def _slot_available(self, slot: int, wrap: bool) -> bool:
        f = self.desc.load16(slot * DESC_SIZE + PACKED_FLAGS)
        return (f & _BOTH) == (_AVAIL if wrap else _USED)

    def peek(self) -> bool:
        if not self._slot_available(self.next_avail, self.avail_wrap):
            return False
        if self.in_flight_slots >= self.size:
            raise TooManyInFlight(f"slot {self.next_avail} made available while every slot is in flight")
        return True

    def unconsumed(self) -> bool:
        return False

    def recheck(self) -> bool:
        return self.peek()

    # -- kick control -------------------------------------------------------------

    def enable_kicks(self) -> None:
        if self.event_idx:
            # One 4-byte store: off_wrap can never be seen without DESC.
            off_wrap = self.next_avail | (self.avail_wrap << 15)
            self.device_event.store32(0, off_wrap | (_DESC << 16))
            self.kick_flags = _DESC
        elif self.kick_flags != _ENABLE:
            self.device_event.store16(2, _ENABLE)
            self.kick_flags = _ENABLE

    def disable_kicks(self) -> None:
        # With DESC the event fires once per pass of the ring at most: no write.
        if not self.event_idx and self.kick_flags != _DISABLE:
            self.device_event.store16(2, _DISABLE)
            self.kick_flags = _DISABLE

    def enable_kicks_eager(self) -> None:
        self.kick_flags = None
        self.enable_kicks()

    def disable_kicks_eager(self) -> None:
        self.device_event.store16(2, _DISABLE)
        self.kick_flags = _DISABLE

    # -- fetch -----------------------------------------------------------------------

    def _scan(self, limit: int) -> tuple[int, list[int], bytes]:
        """Flags of each slot of the available run (one 2-byte read each, up to
        `limit` lists), then the run's bodies in one read (two on wrap)."""
        # Hot path: written for speed.
        q = self.size
        budget = q - self.in_flight_slots
        start = slot = self.next_avail
        flags: list[int] = []
        want = _AVAIL if self.avail_wrap else _USED
        load16 = self.desc.load16
        lists = 0
        while lists < limit:
            f = load16(slot * DESC_SIZE + PACKED_FLAGS)
            if f & _BOTH != want:
                break
            if len(flags) >= budget:
                # every slot is already ours: this one was re-stamped in flight
                if flags:
                    break  # hand out what came before it; the next scan reports it
                raise TooManyInFlight(f"slot {slot} made available while every slot is in flight")
            flags.append(f)
            if not f & _NEXT:
                lists += 1
            slot += 1
            if slot == q:
                slot = 0
                want ^= _BOTH
        n = len(flags)
        if n == 0:
            return start, flags, b""
        if _WEAK:
            _fence.acquire()  # bodies are read after their flags said AVAIL
        if start + n <= q:
            bodies = self.desc.read(start * DESC_SIZE, n * DESC_SIZE)
        else:
            first = q - start
            bodies = self.desc.read(start * DESC_SIZE, first * DESC_SIZE) + self.desc.read(0, (n - first) * DESC_SIZE)
        return start, flags, bodies

    def fetch(self, out: list[Chain], limit: int) -> None:
        """Append up to `limit` available lists; one flags read per slot, then
        one bulk body read for the run."""
        start, flags, bodies = self._scan(limit)
        if flags:
            self._parse(out, start, flags, bodies)

    def _scan_vector(self, limit: int) -> tuple[int, np.ndarray, int, int]:
        """The flags of the available run, read in numpy chunks: still one
        2-byte read per slot, counted as such, but no Python loop per slot.
        Returns (first slot, the run's flags, their OR, their AND or -1 when
        not taken: the C scan takes it on the way). With the C scan the
        flags are a view of the ring's reusable `_scan_out`: valid until the
        next scan.

        The next slot is probed alone first (an empty ring costs one read).
        The rest is read in a chunk sized from the previous run, so a steady
        driver costs exactly the reads of the scalar scan (the run, plus the
        slot that ends it); a longer run doubles the chunk, a shorter one
        wastes at most the difference.
        """
        q = self.size
        start = self.next_avail
        want = _AVAIL if self.avail_wrap else _USED
        first = self.desc.load16(start * DESC_SIZE + PACKED_FLAGS)
        if first & _BOTH != want:
            return start, _EMPTY, 0, -1
        budget = q - self.in_flight_slots
        if budget <= 0:
            raise TooManyInFlight(f"slot {start} made available while every slot is in flight")
        total = 1
        lists = 0 if first & _NEXT else 1
        slot = start + 1
        if slot == q:
            slot = 0
            want ^= _BOTH
        chunk = min(self._run_guess, limit)
        count_lists = limit < budget  # otherwise the list limit cannot bind
        if HAVE_RING_SCAN:  # the loop below in one C call: same slots read, same run
            self._scan_mv[0] = first
            total, _reads, f_or, f_and = self.desc.packed_scan(slot, want, q, limit, budget, chunk, lists,
                                                               count_lists, self._scan_mv)
            self._run_guess = total
            return start, self._scan_out[:total], f_or, f_and
        parts = [np.array([first], np.uint16)]
        load = self.desc.np_load16_strided
        while lists < limit and total <= budget:
            k = min(chunk, q - slot, budget - total + 1)
            fl = load(slot * 8 + _FLAGS_WORD, 8, k)
            bad = np.flatnonzero((fl & _BOTH) != want)
            m = int(bad[0]) if len(bad) else k
            if total + m > budget:
                m = budget - total  # past the budget: a re-stamped in-flight slot; stop before it
            fl = fl[:m]
            if count_lists:
                ends = np.flatnonzero((fl & _NEXT) == 0)
                if len(ends) and lists + len(ends) >= limit:
                    fl = fl[: int(ends[limit - lists - 1]) + 1]
                    parts.append(fl)
                    total += len(fl)
                    break
                lists += len(ends)
            parts.append(fl)
            total += m
            if m < k:
                break
            slot += m
            if slot == q:
                slot = 0
                want ^= _BOTH
            chunk = chunk - k if chunk > k else 2 * chunk
        self._run_guess = total
        run = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return start, run, int(_OR(run)), -1

    def fetch_bulk(self, out: list[Chain], limit: int) -> Bulk | None:
        """Like `fetch`, but a run of single-descriptor lists in one memory
        region comes back as one `Bulk` (array form: no Python loop per slot)."""
        start, fl, f_or, f_and = self._scan_vector(limit)
        n = len(fl)
        if not n:
            return None
        q = self.size
        if _WEAK:
            _fence.acquire()  # bodies are read after their flags said AVAIL
        if HAVE_RING_SCAN and not f_or & (_NEXT | _INDIRECT):
            # The records in a bytearray (the C calls take it as one cheap
            # buffer; numpy's columns are views of it). They get the scan's
            # flags (one snapshot), so the reused scan output is not kept.
            raw = bytearray(n * DESC_SIZE)
            amin, emax, lmin, lmax, lsum = self.desc.packed_bodies(start, n, q, raw, self._scan_mv)
            r = self.mem.region_at(amin)
            if r is not None and emax <= r.gpa + r.size:  # every buffer in one region (emax saturates)
                self._advance(n)
                # the columns are made from the records when first asked for
                return Bulk(None, start, q, None, None, None, r.gpa, r.mv, (lmin, lmax, lsum), f_and, raw,
                            PACKED_FLAGS)
            self._parse(out, start, fl.tolist(), bytes(raw))
            return None
        if start + n <= q:
            bodies = self.desc.read(start * DESC_SIZE, n * DESC_SIZE)
        else:
            first = q - start
            bodies = self.desc.read(start * DESC_SIZE, first * DESC_SIZE) + self.desc.read(0, (n - first) * DESC_SIZE)
        flags = fl.tolist() if f_or & (_NEXT | _INDIRECT) else None
        if flags is None:
            descs = np.frombuffer(bodies, PACKED_DESC_DTYPE)
            addrs = descs["addr"]
            lens = descs["len"]
            r = self.mem.region_at(int(addrs[0]))
            if r is not None:
                g, end = r.gpa, r.gpa + r.size
                if int(_MIN(addrs)) >= g and int(_MAX(addrs)) <= end and int(_MAX(addrs + lens)) <= end:
                    self._advance(n)
                    return Bulk(descs["id"], start, q, addrs, lens, fl, g, r.mv)
        self._parse(out, start, flags if flags is not None else fl.tolist(), bodies)
        return None

    def _parse(self, out: list[Chain], start: int, flags: list[int], bodies: bytes) -> None:
        """Build the chains of a scanned run."""
        q = self.size
        n = len(flags)
        unpack = PACKED_DESC.unpack_from
        translate = self.mem.translate
        payload = self.payload
        i = 0
        pos = start
        while i < n:
            f = flags[i]
            addr, length, buf_id, _ = unpack(bodies, i * DESC_SIZE)
            if not f & (_NEXT | _INDIRECT):
                # single-descriptor list: the common case
                if length:
                    try:
                        views = translate(addr, length)
                    except GuestMemoryError as e:
                        raise BadBufferAddress(f"buffer {buf_id}: {e}") from None
                else:
                    views = []
                if f & _WRITE:
                    chain = Chain(buf_id, pos, 1, [], views, 0, length, payload)
                    chain.segments = ((addr, length, True),)
                else:
                    chain = Chain(buf_id, pos, 1, views, [], length, 0, payload)
                    chain.segments = ((addr, length, False),)
                i += 1
            else:
                chain, used = self._walk_list(pos, flags, bodies, i, n, q - self.in_flight_slots)
                i += used
            out.append(chain)
            self._advance(chain.slots)
            pos = self.next_avail

    def _advance(self, slots: int) -> None:
        nxt = self.next_avail + slots
        if nxt >= self.size:
            nxt -= self.size
            self.avail_wrap = not self.avail_wrap
        self.next_avail = nxt
        self.in_flight_slots += slots

    def _walk_list(self, pos: int, flags: list[int], bodies: bytes, i: int, n: int,
                   budget: int) -> tuple[Chain, int]:
        """A list of more than one slot, or an indirect one, starting at run index i."""
        q = self.size
        segments: list[tuple[int, int, bool]] = []
        count = 0
        slot = pos
        while True:
            if i + count < n:
                f = flags[i + count]
                addr, length, buf_id, _ = PACKED_DESC.unpack_from(bodies, (i + count) * DESC_SIZE)
            else:
                # The run's flag scan stopped inside this list: its later
                # descriptors were written before its head was made available,
                # so their bodies (flags included) are read without a flags check.
                if count >= budget:
                    raise TooManyInFlight(f"list at slot {pos} needs more slots than are free")
                addr, length, buf_id, f = self.desc.unpack(PACKED_DESC, slot * DESC_SIZE)
            count += 1
            if f & _INDIRECT:
                if count > 1 or f & _NEXT:
                    raise (IndirectWithNext if f & _NEXT else IndirectInList)(
                        f"list at slot {pos}: INDIRECT descriptor inside a NEXT list")
                if not self.indirect:
                    raise IndirectNotNegotiated(f"list at slot {pos}: INDIRECT without VIRTIO_F_INDIRECT_DESC")
                ch = self._walk_indirect(buf_id, addr, length, segments, pos)
                if ch is not None:
                    return ch, min(count, n - i)
                break
            segments.append((addr, length, bool(f & _WRITE)))
            if not f & _NEXT:
                break
            if count >= q:
                raise ChainTooLong(f"list at slot {pos} is longer than the ring ({q})")
            slot += 1
            if slot == q:
                slot = 0
        chain = build_chain(self.mem, buf_id, pos, count, segments, self.payload)
        chain.segments = tuple(segments)
        return chain, min(count, n - i)

    def _walk_indirect(self, buf_id: int, addr: int, length: int,
                       segments: list[tuple[int, int, bool]], pos: int = -1) -> Chain | None:
        """Read an indirect table (one access) and append its segments; or,
        for a long table (`pos` given), return the chain built in array
        form (an `IovChain`) when it qualifies."""
        if length == 0 or length % DESC_SIZE:
            raise BadIndirectTable(f"buffer {buf_id}: indirect table length {length} is not a non-zero multiple of 16")
        entries = length // DESC_SIZE
        if entries > self.size:
            raise BadIndirectTable(f"buffer {buf_id}: indirect table of {entries} entries exceeds queue size {self.size}")
        try:
            table = self.mem.read(addr, length, AreaKind.INDIRECT)
        except GuestMemoryError as e:
            raise BadBufferAddress(f"buffer {buf_id}: indirect table: {e}") from None
        if entries >= IOV_MIN_SEGMENTS and pos >= 0:
            # readable entries first, no INDIRECT (flags low byte; NEXT and
            # the wrap bits mean nothing in a table): bytes operations
            shape = _SHAPE.fullmatch(table[14::16].translate(_CLASSES))
            if shape is not None:
                ch = build_iov_chain(self.mem, buf_id, pos, 1, table, shape.end(1), self.payload)
                if ch is not None:
                    return ch
        for a, ln, _id, fl in PACKED_DESC.iter_unpack(table):
            if fl & _INDIRECT:
                raise NestedIndirect(f"buffer {buf_id}: INDIRECT inside an indirect table")
            segments.append((a, ln, bool(fl & _WRITE)))
        return None

    def fetch_one_eager(self) -> Chain | None:
        """Pre-seed behaviour: flags check then a separate body read per list
        (the head's flags are taken from the first read only)."""
        slot = self.next_avail
        f = self.desc.load16(slot * DESC_SIZE + PACKED_FLAGS)
        if (f & _BOTH) != (_AVAIL if self.avail_wrap else _USED):
            return None
        budget = self.size - self.in_flight_slots
        if budget <= 0:
            raise TooManyInFlight(f"slot {slot} made available while every slot is in flight")
        if _WEAK:
            _fence.acquire()
        body = self.desc.read(slot * DESC_SIZE, DESC_SIZE)
        chain, _ = self._walk_list(slot, [f], body, 0, 1, budget)
        self._advance(chain.slots)
        return chain

    def rebuild(self, pos: int, buf_id: int, slots: int,
                segments: tuple[tuple[int, int, bool], ...]) -> Chain:
        """An in-flight list from its saved segments (after restore)."""
        chain = build_chain(self.mem, buf_id, pos, slots, segments, self.payload)
        chain.segments = segments
        return chain

    # -- publish ---------------------------------------------------------------------

    def publish(self, items: Sequence[tuple[Chain | Bulk, Any]]) -> bool:
        """One 8-byte len|id|flags store per used list, the batch's first one
        last; a fence; one event read.

        The driver polls the first slot of the batch: storing it last (after a
        release barrier) makes the whole batch visible at once, so the buffers
        of one mergeable frame become used together (virtio 1.2 5.1.6.4).
        """
        q = self.size
        u = old = self.next_used
        wrap = self.used_wrap
        desc = self.desc
        used_flags = _BOTH if wrap else 0
        freed = 0
        head_at = -1  # byte offset of the batch's first store (none yet), and its value
        head = 0
        if HAVE_RING_SCAN and len(items) == 1 and type(items[0][0]) is Bulk:
            bulk, written = items[0]
            assert isinstance(bulk, Bulk)
            recs = bulk.recs
            if recs is not None and bulk.flags_at == PACKED_FLAGS:
                # one batch (the common case): the loop below in one C call, over the batch's records
                n = bulk.n
                head_at = u * DESC_SIZE + 8
                head = desc.packed_used(u, q, wrap, recs, written)
                u += n
                freed = n
                if u >= q:
                    u -= q
                    wrap = not wrap
                items = ()
        for obj, written in items:
            if type(obj) is Bulk:
                n = obj.n
                vals = (obj.ids.astype(np.uint64) << np.uint64(32)) | np.asarray(written, np.uint64)
                wmask = obj.flags & _WRITE
                if wmask.any():  # WRITE on the used descriptor only where data was writable
                    vals |= (np.where(obj.lens > 0, wmask, 0).astype(np.uint64) << np.uint64(48))
                first = min(n, q - u)
                seg = vals[:first] | np.uint64(used_flags << 48)
                skip = 0
                if head_at < 0:
                    head_at = u * DESC_SIZE + 8
                    head = int(seg[0])
                    skip = 1
                # one aligned 8-byte len|id|flags store per used descriptor
                if first > skip:
                    desc.np_store64_strided(2 * (u + skip) + 1, 2, seg[skip:])
                if first < n:  # the batch passes the ring end: the rest uses the other wrap
                    desc.np_store64_strided(1, 2, vals[first:] | np.uint64((used_flags ^ _BOTH) << 48))
                u += n  # the wrap toggle below applies once
                freed += n
            else:
                assert isinstance(obj, Chain)
                word = used_flags | _WRITE if obj.writable_len else used_flags
                value = written | (obj.id << 32) | (word << 48)
                if head_at < 0:
                    head_at = u * DESC_SIZE + 8
                    head = value
                else:
                    desc.store64(u * DESC_SIZE + 8, value)
                u += obj.slots
                freed += obj.slots
            if u >= q:
                u -= q
                wrap = not wrap
                used_flags = _BOTH if wrap else 0
        if head_at >= 0:
            if _WEAK:
                _fence.release()  # payload and the other used descriptors before the first one
            desc.store64(head_at, head)
        self.next_used = u
        self.used_wrap = wrap
        self.in_flight_slots -= freed
        # StoreLoad: the used flags must be visible before we read the
        # driver's event structure, or both sides miss (lost interrupt).
        self.mem.fence()
        if not self.signalled_valid:
            self.signalled_valid = True
            return True
        ev = self.driver_event.load32(0)
        mode = ev >> 16 & 3
        if mode == _DISABLE:
            return False
        if mode == _DESC and self.event_idx:
            return packed_need_event(ev & 0xFFFF, u, old, int(wrap), q)
        return True  # ENABLE, reserved 3, or DESC without EVENT_IDX
