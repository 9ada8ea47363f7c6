"""Split virtqueue, device side (virtio 1.2 section 2.7).

Access discipline (each line is one guest-memory access):
- discovery: `avail.idx` is loaded once into `shadow` and every entry it covers
  is drained before it is loaded again; the heads come in one slice read
  (two when the slice wraps); each chain costs one 16-byte descriptor read;
- publication: the batch's used elements in one slice write (two on wrap),
  one `used.idx` store, a full fence, one event read for the interrupt
  decision;
- kick control writes only on change (a shadow of `used.flags`), never reads
  back a device-owned field.
"""

from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from pyvirtio import fence as _fence
from pyvirtio.memory import HAVE_RING_SCAN, AreaKind, GuestMemory, GuestMemoryError
from pyvirtio.queue.bulk import SPLIT_DESC_DTYPE, Bulk
from pyvirtio.queue.chain import IOV_MIN_SEGMENTS, Chain, build_chain, build_iov_chain
from pyvirtio.queue.errors import (
    AvailIndexJump,
    BadBufferAddress,
    BadIndirectTable,
    ChainTooLong,
    DescriptorIndexOutOfRange,
    HeadOutOfRange,
    IndirectNotNegotiated,
    IndirectWithNext,
    InvalidQueueGeometry,
    NestedIndirect,
    TooManyInFlight,
)
from pyvirtio.queue.state import QueueState
from pyvirtio.spec import (
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    SPLIT_AVAIL_ALIGN,
    SPLIT_DESC,
    SPLIT_DESC_ALIGN,
    SPLIT_USED_ALIGN,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    AvailFlags,
    DescFlags,
    UsedFlags,
    avail_event_offset,
    is_power_of_two,
    used_event_offset,
    vring_need_event,
)

_NEXT: Final = int(DescFlags.NEXT)
_FLAGS_AT: Final = 12  # byte offset of `flags` in a split descriptor (addr u64, len u32, flags, next)
# numpy reductions called as ufunc methods: a few microseconds less per batch
# than ndarray.max()/.any(), which go through numpy's Python-level wrappers
_MAX: Final = np.maximum.reduce
_MIN: Final = np.minimum.reduce
_OR: Final = np.bitwise_or.reduce
_WRITE: Final = int(DescFlags.WRITE)
_INDIRECT: Final = int(DescFlags.INDIRECT)
_NO_INTERRUPT: Final = int(AvailFlags.NO_INTERRUPT)
_NO_NOTIFY: Final = int(UsedFlags.NO_NOTIFY)
_WEAK: Final = _fence.WEAK_ORDERING
_U16: Final = np.dtype(np.uint16)
_USED_STRUCTS: dict[int, struct.Struct] = {}
#: a sequential indirect table's `next` fields (entry i links to i + 1), low and high bytes
_SEQ_LO: Final = bytes((i + 1) & 0xFF for i in range(MAX_QUEUE_SIZE))
_SEQ_HI: Final = bytes((i + 1) >> 8 & 0xFF for i in range(MAX_QUEUE_SIZE))
_ZEROS: Final = bytes(MAX_QUEUE_SIZE)
#: flags (low byte) -> class: n = NEXT (readable), N = NEXT|WRITE, e = last readable, E = last writable
_CLASSES: Final = bytes({_NEXT: ord("n"), _NEXT | _WRITE: ord("N"), 0: ord("e"), _WRITE: ord("E")}.get(f, ord("?"))
                 for f in range(256))
_SHAPE: Final = re.compile(rb"(n*)(?:e|N*E)")
_LAST_READABLE: Final = ord("e")


def _used_struct(k: int) -> struct.Struct:
    st = _USED_STRUCTS.get(k)
    if st is None:
        st = _USED_STRUCTS[k] = struct.Struct(f"<{2 * k}I")
    return st


def guest_used_idx(mem: GuestMemory, used_gpa: int) -> int:
    """Read `used.idx` from guest memory (to resume a ring whose saved state
    carries only the avail index, as vhost-user SET_VRING_BASE does)."""
    return mem.area(AreaKind.USED, used_gpa, 4, SPLIT_USED_ALIGN).load16(USED_IDX)


class SplitRing:
    """Device side of one split ring. Used through `Virtqueue`."""

    packed = False

    def __init__(self, mem: GuestMemory, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool, indirect: bool) -> None:
        if not (1 <= size <= MAX_QUEUE_SIZE and is_power_of_two(size)):
            raise InvalidQueueGeometry(f"split queue size {size} is not a power of two in 1..32768")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        try:
            self.desc = mem.area(AreaKind.DESC, desc, DESC_SIZE * size, SPLIT_DESC_ALIGN)
            self.avail = mem.area(AreaKind.AVAIL, avail, AVAIL_RING + 2 * size, SPLIT_AVAIL_ALIGN)
            self.used = mem.area(AreaKind.USED, used, USED_RING + 8 * size, SPLIT_USED_ALIGN)
            if event_idx:
                self.used_event = mem.area(AreaKind.EVENT, avail + used_event_offset(size), 2, 2)
                self.avail_event = mem.area(AreaKind.EVENT, used + avail_event_offset(size), 2, 2)
        except GuestMemoryError as e:
            raise InvalidQueueGeometry(f"split ring areas: {e}") from None
        spans = sorted([(desc, DESC_SIZE * size), (avail, 6 + 2 * size), (used, 6 + 8 * size)])
        for (a, alen), (b, _) in itertools.pairwise(spans):
            if a + alen > b:
                raise InvalidQueueGeometry(f"split ring areas overlap at {b:#x}")
        self.payload = getattr(mem, "counters", {}).get(AreaKind.PAYLOAD)
        self.last_avail = 0       # next avail index to consume
        self.shadow = 0           # last avail.idx loaded
        self.used_idx = 0         # last used.idx published
        self.kick_flags: int | None = None  # shadow of used.flags; None = unknown
        self.signalled_valid = False

    # -- state ---------------------------------------------------------------

    def restore(self, st: QueueState) -> None:
        self.last_avail = self.shadow = st.last_avail
        self.used_idx = st.used_idx
        self.signalled_valid = False

    def cursor(self) -> tuple[int, bool, int, bool]:
        return self.last_avail, True, self.used_idx, True

    def in_flight(self) -> int:
        return (self.last_avail - self.used_idx) & 0xFFFF

    def rewind(self, pos: int, count: int) -> bool:
        """Un-take the last `count` chains, the first at avail index `pos`
        (they must be the most recent ones taken): the next fetch takes them
        again. Returns False (nothing changed) when they are not."""
        if (pos + count - self.last_avail) & 0xFFFF or count > self.in_flight():
            return False
        self.last_avail = pos
        return True

    # -- availability (read-only) ------------------------------------------------

    def _load_idx(self) -> int:
        """Load avail.idx; validate it; return how many entries are new."""
        idx = self.avail.load16(AVAIL_IDX)
        n = (idx - self.last_avail) & 0xFFFF
        if n > self.size:
            raise AvailIndexJump(
                f"avail.idx jumped from {self.last_avail} to {idx} on a ring of {self.size}")
        if ((idx - self.shadow) & 0xFFFF) > self.size:
            raise AvailIndexJump(f"avail.idx moved back from {self.shadow} to {idx}")
        if n and ((idx - self.used_idx) & 0xFFFF) > self.size:
            raise TooManyInFlight(
                f"avail.idx {idx} is {(idx - self.used_idx) & 0xFFFF} ahead of used.idx "
                f"{self.used_idx}: more buffers than the ring holds")
        self.shadow = idx
        if n and _WEAK:
            _fence.acquire()  # ring entries and descriptors are read after the index
        return n

    def peek(self) -> bool:
        """Is there work? Loads avail.idx only when the cached batch is drained."""
        if self.shadow != self.last_avail:
            return True
        return self._load_idx() != 0

    def unconsumed(self) -> bool:
        return self.shadow != self.last_avail

    def recheck(self) -> bool:
        """After arming and a full fence: did the driver publish past the shadow?"""
        idx = self.avail.load16(AVAIL_IDX)
        if idx == self.shadow:
            return False
        return self._load_idx() != 0

    # -- kick control ---------------------------------------------------------------

    def enable_kicks(self) -> None:
        if self.event_idx:
            # Ask for a kick once the driver publishes past what we have seen.
            self.avail_event.store16(0, self.shadow)
        elif self.kick_flags != 0:
            self.used.store16(USED_FLAGS, 0)
            self.kick_flags = 0

    def disable_kicks(self) -> None:
        # With EVENT_IDX a stale avail_event is the suppression: no write.
        if not self.event_idx and self.kick_flags != _NO_NOTIFY:
            self.used.store16(USED_FLAGS, _NO_NOTIFY)
            self.kick_flags = _NO_NOTIFY

    def enable_kicks_eager(self) -> None:
        if self.event_idx:
            self.avail_event.store16(0, self.last_avail)
        else:
            self.used.store16(USED_FLAGS, 0)
        self.kick_flags = 0

    def disable_kicks_eager(self) -> None:
        if not self.event_idx:
            self.used.store16(USED_FLAGS, _NO_NOTIFY)
            self.kick_flags = _NO_NOTIFY

    # -- fetch -----------------------------------------------------------------------

    def fetch(self, out: list[Chain], limit: int) -> None:
        """Append up to `limit` chains. Reads avail.idx only if the cache is empty.

        On a `QueueError` the chains appended so far stay in `out` and are
        consumed; the offending entry is consumed too.
        """
        # Hot path: written for speed (locals, no helper calls for the common case).
        last = self.last_avail
        n = (self.shadow - last) & 0xFFFF
        if n == 0:
            n = self._load_idx()
            if n == 0:
                return
        n = min(n, limit)
        q = self.size
        start = last & (q - 1)
        if start + n <= q:
            heads = self.avail.load16s(AVAIL_RING + 2 * start, n)
        else:
            first = q - start
            heads = self.avail.load16s(AVAIL_RING + 2 * start, first)
            heads += self.avail.load16s(AVAIL_RING, n - first)
        self._consume(out, heads, last)

    def _consume(self, out: list[Chain], heads: list[int], last: int,
                 descs: list[tuple[int, int, int, int]] | None = None) -> None:
        """Turn avail entries [last, last+len(heads)) into chains."""
        q = self.size
        if max(heads) >= q:
            bad = next(i for i, h in enumerate(heads) if h >= q)
            self._fetch_chains(out, heads[:bad], last, None if descs is None else descs[:bad])
            self.last_avail = (last + bad + 1) & 0xFFFF
            raise HeadOutOfRange(f"avail ring entry {(last + bad) & 0xFFFF} names head {heads[bad]} "
                                 f"on a ring of {q}")
        self._fetch_chains(out, heads, last, descs)

    def fetch_bulk(self, out: list[Chain], limit: int) -> Bulk | None:
        """Like `fetch`, but a run of single-descriptor chains in one memory
        region comes back as one `Bulk` (same accesses, array form)."""
        last = self.last_avail
        n = (self.shadow - last) & 0xFFFF
        if n == 0:
            n = self._load_idx()
            if n == 0:
                return None
        n = min(n, limit)
        q = self.size
        start = last & (q - 1)
        avail = self.avail
        if HAVE_RING_SCAN:
            return self._fetch_bulk_scan(out, last, start, n)
        if start + n <= q:
            heads = avail.np_load16s(AVAIL_RING + 2 * start, n)
        else:
            first = q - start
            heads = np.concatenate((avail.np_load16s(AVAIL_RING + 2 * start, first),
                                    avail.np_load16s(AVAIL_RING, n - first)))
        if int(_MAX(heads)) >= q:
            self._consume(out, heads.tolist(), last)  # raises HeadOutOfRange
        descs = self.desc.np_gather(SPLIT_DESC_DTYPE, heads)
        flags = descs["flags"]
        addrs = descs["addr"]
        lens = descs["len"]
        r = self.mem.region_at(int(addrs[0]))
        if r is not None and not int(_OR(flags)) & (_NEXT | _INDIRECT):
            g, end = r.gpa, r.gpa + r.size
            # every buffer inside the region (addrs <= end first, so that
            # addr + len cannot wrap); anything else takes the chain path
            if int(_MIN(addrs)) >= g and int(_MAX(addrs)) <= end and int(_MAX(addrs + lens)) <= end:
                self.last_avail = (last + n) & 0xFFFF
                return Bulk(heads, last, 0x10000, addrs, lens, flags, g, r.mv)
        self._consume(out, heads.tolist(), last, descs.tolist())
        return None

    def _fetch_bulk_scan(self, out: list[Chain], last: int, start: int, n: int) -> Bulk | None:
        """`fetch_bulk`'s scan in one C call (the numpy lines above are the
        reference it must match: same reads, same outcome)."""
        q = self.size
        # bytearrays: the C calls take them as cheap buffers (numpy's are views)
        heads_raw = bytearray(2 * n)
        raw = bytearray(DESC_SIZE * n)
        bad, flags_or, amin, emax, lmin, lmax, lsum, flags_and = self.avail.gather_split(self.desc, start, n, q,
                                                                                        heads_raw, raw)
        if bad >= 0:
            self._consume(out, np.frombuffer(heads_raw, np.uint16).tolist(), last)  # raises HeadOutOfRange
        if not flags_or & (_NEXT | _INDIRECT):
            r = self.mem.region_at(amin)
            # every buffer inside one region (emax saturates when addr + len wraps)
            if r is not None and emax <= r.gpa + r.size:
                self.last_avail = (last + n) & 0xFFFF
                # the columns are made from the heads and records when first asked for
                return Bulk(None, last, 0x10000, None, None, None, r.gpa, r.mv, (lmin, lmax, lsum), flags_and, raw,
                            _FLAGS_AT, heads_raw)
        rows: Any = np.frombuffer(raw, SPLIT_DESC_DTYPE).tolist()  # (addr, len, flags, next) tuples
        self._consume(out, np.frombuffer(heads_raw, np.uint16).tolist(), last, rows)
        return None

    def _fetch_chains(self, out: list[Chain], heads: list[int], last: int,
                      descs: list[tuple[int, int, int, int]] | None = None) -> None:
        """Read each head's descriptor (one 16-byte read each, unless `descs`
        already holds them) and build chains."""
        # Hot path: written for speed. The common single-descriptor chain is
        # built inline, translating through the last region that matched.
        if descs is None:
            descs = self.desc.unpack_many(SPLIT_DESC, [h << 4 for h in heads])  # type: ignore[assignment]
        assert descs is not None
        mem = self.mem
        payload = self.payload
        append = out.append
        hot_gpa = hot_end = 0
        hot_mv = None
        for head, (addr, length, flags, nxt) in zip(heads, descs):
            pos = last
            last = (last + 1) & 0xFFFF
            if flags & (_NEXT | _INDIRECT):
                try:
                    append(self._walk(head, pos, addr, length, flags, nxt))
                except Exception:
                    self.last_avail = last
                    raise
                continue
            if length:
                if hot_gpa <= addr and addr + length <= hot_end:
                    off = addr - hot_gpa
                    views = [hot_mv[off : off + length]]  # type: ignore[index]
                else:
                    r = mem.region_at(addr)
                    if r is not None and addr + length <= r.gpa + r.size:
                        hot_gpa, hot_end, hot_mv = r.gpa, r.gpa + r.size, r.mv
                        off = addr - hot_gpa
                        views = [hot_mv[off : off + length]]
                    else:
                        try:
                            views = mem.translate(addr, length)
                        except GuestMemoryError as e:
                            self.last_avail = last
                            raise BadBufferAddress(f"chain {head}: {e}") from None
            else:
                views = []
            if flags & _WRITE:
                append(Chain(head, pos, 1, [], views, 0, length, payload))
            else:
                append(Chain(head, pos, 1, views, [], length, 0, payload))
        self.last_avail = last

    def fetch_one_eager(self) -> Chain | None:
        """Pre-seed behaviour: load avail.idx for every chain."""
        last = self.last_avail
        if self._load_idx() == 0:
            return None
        q = self.size
        head = self.avail.load16(AVAIL_RING + 2 * (last & (q - 1)))
        self.last_avail = (last + 1) & 0xFFFF
        if head >= q:
            raise HeadOutOfRange(f"avail ring entry {last} names head {head} on a ring of {q}")
        addr, length, flags, nxt = self.desc.unpack(SPLIT_DESC, head << 4)
        return self._walk(head, last, addr, length, flags, nxt)

    def rewalk(self, pos: int, head: int) -> Chain:
        """Walk an in-flight chain again (after restore)."""
        addr, length, flags, nxt = self.desc.unpack(SPLIT_DESC, head << 4)
        return self._walk(head, pos, addr, length, flags, nxt)

    def _walk(self, head: int, pos: int, addr: int, length: int, flags: int, nxt: int) -> Chain:
        """Walk a chain starting from its (already read) head descriptor."""
        q = self.size
        segments: list[tuple[int, int, bool]] = []
        count = 1
        while True:
            if flags & _INDIRECT:
                if not self.indirect:
                    raise IndirectNotNegotiated(f"chain {head}: INDIRECT without VIRTIO_F_INDIRECT_DESC")
                if flags & _NEXT:
                    raise IndirectWithNext(f"chain {head}: descriptor has both INDIRECT and NEXT")
                if count == 1:
                    ch = self._walk_indirect(head, addr, length, 0, segments, pos)
                    if ch is not None:
                        return ch
                else:
                    self._walk_indirect(head, addr, length, count - 1, segments)
                break
            segments.append((addr, length, bool(flags & _WRITE)))
            if not flags & _NEXT:
                break
            if nxt >= q:
                raise DescriptorIndexOutOfRange(f"chain {head}: next {nxt} >= queue size {q}")
            if count >= q:
                raise ChainTooLong(f"chain {head}: more than {q} descriptors (loop?)")
            count += 1
            addr, length, flags, nxt = self.desc.unpack(SPLIT_DESC, nxt << 4)
        return build_chain(self.mem, head, pos, 1, segments, self.payload)

    def _walk_indirect(self, head: int, addr: int, length: int, direct: int,
                       segments: list[tuple[int, int, bool]], pos: int = -1) -> Chain | None:
        """Read an indirect table (one access) and append its segments; or,
        for a long table that is the whole chain (`pos` given), return it
        built in array form (an `IovChain`) when it qualifies."""
        q = self.size
        if length == 0 or length % DESC_SIZE:
            raise BadIndirectTable(f"chain {head}: indirect table length {length} is not a non-zero multiple of 16")
        entries = length // DESC_SIZE
        if entries > q:
            raise BadIndirectTable(f"chain {head}: indirect table of {entries} entries exceeds queue size {q}")
        try:
            table = self.mem.read(addr, length, AreaKind.INDIRECT)  # one snapshot of the table
        except GuestMemoryError as e:
            raise BadBufferAddress(f"chain {head}: indirect table: {e}") from None
        if pos >= 0 and entries >= IOV_MIN_SEGMENTS and entries <= q:
            # Fast path for the table every driver writes: entry i links to
            # i + 1, the last one ends the chain, readable entries first, no
            # INDIRECT inside. Checked with bytes operations (cheap even when
            # the caches are cold, as they are after a sleep).
            m = entries - 1
            if (table[14:16 * m:16] == _SEQ_LO[:m] and table[15:16 * m:16] == _SEQ_HI[:m]
                    and table[13::16] == _ZEROS[:entries]):
                classes = table[12::16].translate(_CLASSES)
                shape = _SHAPE.fullmatch(classes)
                if shape is not None:
                    nr = shape.end(1) + (classes[-1] == _LAST_READABLE)
                    ch = build_iov_chain(self.mem, head, pos, 1, table, nr, self.payload)
                    if ch is not None:
                        return ch
        i = 0
        count = 0
        while True:
            a, ln, fl, nxt = SPLIT_DESC.unpack_from(table, i * DESC_SIZE)
            count += 1
            if fl & _INDIRECT:
                raise NestedIndirect(f"chain {head}: INDIRECT inside an indirect table")
            segments.append((a, ln, bool(fl & _WRITE)))
            if not fl & _NEXT:
                return None
            if nxt >= entries:
                raise DescriptorIndexOutOfRange(f"chain {head}: indirect next {nxt} >= {entries} entries")
            if count >= entries or direct + count >= q:
                raise ChainTooLong(f"chain {head}: indirect chain loops or exceeds {q} descriptors")
            i = nxt

    # -- publish ---------------------------------------------------------------------

    def publish(self, items: Sequence[tuple[Chain | Bulk, Any]]) -> bool:
        """Write the used elements, one used.idx store, fence, decide once.

        Returns True when the driver wants an interrupt.
        """
        q = self.size
        old = self.used_idx
        start = old & (q - 1)
        used = self.used
        one = items[0][0] if len(items) == 1 else None
        if HAVE_RING_SCAN and type(one) is Bulk and (one.heads is not None or one.ids.dtype == _U16):
            k = one.n
            # one C call (the numpy lines below are its reference), over the heads as the scan left them
            used.put_used(start, q, one.heads if one.heads is not None else one.ids, items[0][1])
        elif type(one) is Bulk or any(type(obj) is Bulk for obj, _ in items):
            elems = _used_array(items)
            k = len(elems) >> 1
            if start + k <= q:
                used.np_write(USED_RING + 8 * start, elems)
            else:
                first = q - start
                used.np_write(USED_RING + 8 * start, elems[: 2 * first])
                used.np_write(USED_RING, elems[2 * first :])
        else:
            k = len(items)
            flat: list[int] = []
            for chain, written in items:
                flat.append(chain.id)  # type: ignore[union-attr]
                flat.append(written)
            if start + k <= q:
                used.write(USED_RING + 8 * start, _used_struct(k).pack(*flat))
            else:
                first = q - start
                used.write(USED_RING + 8 * start, _used_struct(first).pack(*flat[: 2 * first]))
                used.write(USED_RING, _used_struct(k - first).pack(*flat[2 * first :]))
        if _WEAK:
            _fence.release()  # used elements before the index that publishes them
        new = (old + k) & 0xFFFF
        used.store16(USED_IDX, new)
        self.used_idx = new
        # StoreLoad: our used.idx store must be visible before we read the
        # driver's interrupt suppression, or both sides miss (lost interrupt).
        self.mem.fence()
        if not self.signalled_valid:
            self.signalled_valid = True
            return True
        if self.event_idx:
            return vring_need_event(self.used_event.load16(0), new, old)
        return not self.avail.load16(AVAIL_FLAGS) & _NO_INTERRUPT


def _used_array(items: Sequence[tuple[Chain | Bulk, Any]]) -> np.ndarray:
    """Used elements (id, len pairs) of chains and bulks, in order, as u32."""
    parts = []
    flat: list[int] = []
    for obj, written in items:
        if type(obj) is Bulk:
            if flat:
                parts.append(np.array(flat, np.uint32))
                flat = []
            a = np.empty(2 * obj.n, np.uint32)
            a[0::2] = obj.ids
            a[1::2] = written
            parts.append(a)
        else:
            flat.append(obj.id)  # type: ignore[union-attr]
            flat.append(written)
    if flat:
        parts.append(np.array(flat, np.uint32))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
