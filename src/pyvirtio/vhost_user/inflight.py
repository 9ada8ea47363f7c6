"""Inflight I/O tracking: the shared buffer that lets a restarted back-end
resubmit the requests it was serving when it died.

The vhost-user specification ("Inflight I/O tracking") defines the buffer a
back-end hands the front-end with GET_INFLIGHT_FD and gets back, after a
crash and a reconnect, with SET_INFLIGHT_FD: one *queue region* per
virtqueue, in the split or the packed layout. QEMU keeps the memfd alive
across back-end restarts; the back-end records in it, as it works, which
chains it has taken from the ring and which it has returned, so that the
next back-end process knows exactly what was in flight and in which order it
was taken, even though requests complete out of order and the ring itself
no longer holds that information.

This module is the region logic only, written to the spec's layouts and
steps (comments quote the step numbers):

- `InflightRegion`: the whole buffer (allocate a zeroed memfd, or attach to
  the one the front-end sends back) and its per-queue slices;
- `SplitTracker` / `PackedTracker`: one queue region, driven from the queue's
  own thread: `resume()` at ring start (repairs a half-finished publication
  and returns the `QueueState` whose in-flight chains the engine re-delivers
  first, in fetch order), `fetched()` after every pop, `publish()` around
  every publication of used entries;
- `TrackedVirtqueue`: a `Virtqueue` that calls those hooks, so a device
  needs no code of its own to be tracked.

Crash safety rests on program order: every field is one aligned store
(memoryview casts, never struct packing), a killed process leaves all its
earlier stores in the shared memfd, and each step leaves the region in a
state the resume rules can repair.

Packed rings are published one list at a time here: the engine writes the
used descriptors of a batch in ring order, so a crash inside a batch could
leave its first descriptors visible to the driver and the rest not, and
the spec's repair rule (look at the first descriptor of the batch) would
then commit completions the driver never saw. One list per publication
makes that rule exact. Split publications stay batched (one `used.idx`
store publishes the whole batch atomically).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from pyvirtio.memory import AreaKind, GuestMemory, GuestMemoryError
from pyvirtio.queue import Chain, QueueState, Virtqueue
from pyvirtio.queue.virtqueue import DEFAULT_BATCH, Policy
from pyvirtio.spec import DESC_SIZE, MAX_QUEUE_SIZE, PACKED_DESC, PackedDescFlags

log = logging.getLogger(__name__)

#: the region layout version this module writes (0 = never initialised)
VERSION = 1
SPLIT_HEADER = 16
SPLIT_ENTRY = 16
PACKED_HEADER = 32
PACKED_ENTRY = 32

_AVAIL = int(PackedDescFlags.AVAIL)
_USED = int(PackedDescFlags.USED)
_INDIRECT = int(PackedDescFlags.INDIRECT)
_WRITE = int(PackedDescFlags.WRITE)


def _align64(n: int) -> int:
    return (n + 63) & ~63


def queue_region_size(queue_size: int, packed: bool) -> int:
    """Bytes of one queue region (64-byte aligned, as DPDK sizes them)."""
    if packed:
        return _align64(PACKED_HEADER + PACKED_ENTRY * queue_size)
    return _align64(SPLIT_HEADER + SPLIT_ENTRY * queue_size)


class InflightRegion:
    """The shared inflight buffer: `num_queues` queue regions of `queue_size`
    entries each, split or packed layout.

    `fd` stays open until `close()` (the GET_INFLIGHT_FD reply sends it after
    the handler returns). Raises `ValueError` for sizes or an fd that cannot
    hold the regions.
    """

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int,
                 packed: bool) -> None:
        if not 1 <= num_queues <= 0xFFFF or not 1 <= queue_size <= MAX_QUEUE_SIZE:
            raise ValueError(f"inflight buffer for {num_queues} queues of {queue_size} is impossible")
        per_queue = queue_region_size(queue_size, packed)
        if mmap_size < per_queue * num_queues:
            raise ValueError(f"inflight buffer of {mmap_size} bytes cannot hold {num_queues} "
                             f"{'packed' if packed else 'split'} queue regions of {per_queue} bytes")
        if mmap_offset < 0 or mmap_offset % mmap.ALLOCATIONGRANULARITY:
            raise ValueError(f"inflight buffer offset {mmap_offset} is not page aligned")
        if os.fstat(fd).st_size < mmap_offset + mmap_size:
            raise ValueError(f"inflight fd holds {os.fstat(fd).st_size} bytes, "
                             f"not {mmap_offset + mmap_size}")
        self.fd = fd
        self.mmap_size = mmap_size
        self.mmap_offset = mmap_offset
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.packed = packed
        self.per_queue = per_queue
        self._map = mmap.mmap(fd, mmap_size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset)
        self.mv = memoryview(self._map)

    @classmethod
    def allocate(cls, num_queues: int, queue_size: int, packed: bool) -> InflightRegion:
        """A fresh zeroed memfd (GET_INFLIGHT_FD)."""
        size = queue_region_size(queue_size, packed) * num_queues
        fd = os.memfd_create("pyvirtio-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, 0, num_queues, queue_size, packed)
        except BaseException:
            os.close(fd)
            raise

    def queue(self, index: int) -> memoryview:
        """The queue region of virtqueue `index`."""
        if not 0 <= index < self.num_queues:
            raise IndexError(f"inflight buffer has {self.num_queues} queue regions, not {index + 1}")
        off = index * self.per_queue
        return self.mv[off:off + self.per_queue]

    def tracker(self, index: int, size: int, packed: bool, mem: GuestMemory,
                desc_gpa: int) -> SplitTracker | PackedTracker | None:
        """The tracker of ring `index` (size `size`), or None when this buffer
        does not fit that ring (then it runs untracked; logged)."""
        if packed != self.packed or size != self.queue_size or index >= self.num_queues:
            log.warning("ring %d (%s, %d entries) does not match the inflight buffer (%s, %d queues of %d): "
                        "not tracked", index, "packed" if packed else "split", size,
                        "packed" if self.packed else "split", self.num_queues, self.queue_size)
            return None
        if packed:
            return PackedTracker(self.queue(index), size, mem, desc_gpa, name=f"ring {index}")
        return SplitTracker(self.queue(index), size, name=f"ring {index}")

    def close(self) -> None:
        try:
            self.mv.release()
            self._map.close()
        except BufferError:  # a tracker still holds a view: the map goes with the last one
            pass
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


# --- split -----------------------------------------------------------------------


class SplitTracker:
    """One split queue region (spec: `QueueRegionSplit`).

    Header: features u64 @0, version u16 @8, desc_num u16 @10,
    last_batch_head u16 @12, used_idx u16 @14; then `desc_num` entries of
    16 bytes indexed by head: inflight u8 @0, next u16 @6, counter u64 @8.
    """

    def __init__(self, mv: memoryview, size: int, *, name: str = "ring") -> None:
        if len(mv) < queue_region_size(size, False):
            raise ValueError("split queue region too small")
        self.size = size
        self.name = name
        self.b = mv.cast("B")
        self.h = mv.cast("H")
        self.q = mv.cast("Q")
        self.counter = 0
        self.used = 0          # our shadow of the ring's used.idx (= region used_idx)
        self.reconnected = False
        self.resubmitted = 0
        self._redeliver = 0    # chains the engine hands out again before new ones

    # field access: entry i starts at byte 16 + 16 i
    def inflight(self, i: int) -> int:
        return self.b[16 + 16 * i]

    def entry_counter(self, i: int) -> int:
        return self.q[3 + 2 * i]

    @property
    def version(self) -> int:
        return self.h[4]

    @property
    def last_batch_head(self) -> int:
        return self.h[6]

    @property
    def used_idx(self) -> int:
        return self.h[7]

    def _init(self, used: int) -> None:
        n = queue_region_size(self.size, False)
        self.b[0:n] = bytes(n)
        self.h[5] = self.size
        self.h[7] = used
        self.h[4] = VERSION  # last: a region with version 0 is re-initialised

    def resume(self, default: QueueState) -> QueueState:
        """At ring start. `default` is what the ring would resume from without
        tracking (its `used_idx` is the guest's `used->idx`). A fresh region is
        initialised and `default` returned; an initialised one is repaired and
        its in-flight heads come back in counter order."""
        used = default.used_idx
        self.used = used
        if self.version != VERSION or self.h[5] != self.size:
            if self.version != 0:
                log.error("%s: inflight region version %d with %d entries is not ours; starting afresh",
                          self.name, self.version, self.h[5])
            self._init(used)
            return default
        self.reconnected = True
        q = self.size
        region_used = self.h[7]
        if region_used != used:
            # 1. the last batch reached used->idx but its entries were not
            # retired: walk the batch list from last_batch_head, clear them
            batch = (used - region_used) & 0xFFFF
            if batch > q:
                log.error("%s: used->idx %d is %d ahead of the inflight record %d; starting afresh",
                          self.name, used, batch, region_used)
                self._init(used)
                return default
            i = self.h[6]
            for _ in range(batch):
                if i >= q:
                    break
                self.b[16 + 16 * i] = 0
                i = self.h[11 + 8 * i]
            self.h[7] = used
        # 2. resubmit the in-flight heads in the order they were fetched
        heads = [i for i in range(q) if self.b[16 + 16 * i] == 1]
        heads.sort(key=self.entry_counter)
        self.counter = max((self.entry_counter(i) for i in heads), default=-1) + 1
        self.resubmitted = self._redeliver = len(heads)
        if heads:
            log.warning("%s: resubmitting %d request(s) that were in flight when the previous back-end "
                        "stopped (heads %s)", self.name, len(heads), heads[:16])
        return QueueState(q, False, last_avail=(used + len(heads)) & 0xFFFF, used_idx=used,
                          in_flight=tuple(((used + k) & 0xFFFF, h) for k, h in enumerate(heads)))

    def fetched(self, chains: Sequence[Chain]) -> None:
        """After a pop, in ring order: 2.-4. counter, then inflight = 1."""
        skip = min(self._redeliver, len(chains))
        self._redeliver -= skip
        b, qv = self.b, self.q
        c = self.counter
        for chain in chains[skip:] if skip else chains:
            i = chain.id
            qv[3 + 2 * i] = c
            b[16 + 16 * i] = 1
            c += 1
        self.counter = c

    def publish(self, items: Sequence[tuple[Chain, int]], publish: Callable[[Any], bool]) -> bool:
        """Around one publication of used entries (the engine's `_publish`)."""
        h, b = self.h, self.b
        # 1.-4. link the batch: desc[i].next = last_batch_head; last_batch_head = i
        for chain, _ in items:
            i = chain.id
            h[11 + 8 * i] = h[6]
            h[6] = i
        # 5. used elements and used->idx (one store publishes the batch)
        notify = publish(items)
        # 6. retire the batch, 7. record the new used->idx
        for chain, _ in items:
            b[16 + 16 * chain.id] = 0
        self.used = (self.used + len(items)) & 0xFFFF
        h[7] = self.used
        return notify


# --- packed -------------------------------------------------------------------------


_RAW = struct.Struct("<QIHH")  # addr, len, id, flags (a packed ring descriptor)


class PackedTracker:
    """One packed queue region (spec: `QueueRegionPacked`).

    Header: features u64 @0, version u16 @8, desc_num u16 @10, free_head
    u16 @12, old_free_head u16 @14, used_idx u16 @16, old_used_idx u16 @18,
    used_wrap_counter u8 @20, old_used_wrap_counter u8 @21; then `desc_num`
    entries of 32 bytes: inflight u8 @0, next u16 @2, last u16 @4, num u16
    @6, counter u64 @8, id u16 @16, flags u16 @18, len u32 @20, addr u64 @24.
    Entries hold copies of the ring descriptors of in-flight lists, taken
    from a free list; `old_*` are the last committed values.
    """

    def __init__(self, mv: memoryview, size: int, mem: GuestMemory, desc_gpa: int, *,
                 name: str = "ring") -> None:
        if len(mv) < queue_region_size(size, True):
            raise ValueError("packed queue region too small")
        self.size = size
        self.name = name
        self.mem = mem
        self.desc_gpa = desc_gpa
        self.b = mv.cast("B")
        self.h = mv.cast("H")
        self.i32 = mv.cast("I")
        self.q = mv.cast("Q")
        self.counter = 0
        self.used = 0
        self.used_wrap = True
        self.reconnected = False
        self.resubmitted = 0
        self._entries: dict[Chain, int] = {}
        self._redeliver: deque[int] = deque()

    # entry j starts at byte 32 + 32 j; u16 index of field at byte off: (32 + 32 j + off) // 2
    @property
    def version(self) -> int:
        return self.h[4]

    def entry_counter(self, j: int) -> int:
        return self.q[5 + 4 * j]

    def _init(self, used: int, wrap: bool) -> None:
        n = queue_region_size(self.size, True)
        q = self.size
        h = self.h
        self.b[0:n] = bytes(n)
        h[5] = q
        for j in range(q):
            h[16 + 16 * j + 1] = j + 1  # free list 0 -> 1 -> ... -> q-1 -> q (end)
        h[6] = h[7] = 0
        h[8] = h[9] = used
        self.b[20] = self.b[21] = int(wrap)
        h[4] = VERSION

    def _ring_flags(self, slot: int) -> int:
        return int.from_bytes(self.mem.read(self.desc_gpa + slot * DESC_SIZE + 14, 2, AreaKind.DESC), "little")

    def resume(self, default: QueueState) -> QueueState:
        """At ring start; see `SplitTracker.resume`. `default` carries the
        front-end's SET_VRING_BASE cursors, used for a fresh region only (after
        a crash QEMU has no better packed state than the one it last set)."""
        q = self.size
        h = self.h
        if self.version != VERSION or h[5] != q:
            if self.version != 0:
                log.error("%s: inflight region version %d with %d entries is not ours; starting afresh",
                          self.name, self.version, h[5])
            self._init(default.used_idx, default.used_wrap)
            self.used, self.used_wrap = default.used_idx, default.used_wrap
            return default
        self.reconnected = True
        try:
            state, heads = self._repair()
        except (ValueError, GuestMemoryError) as e:
            log.error("%s: inflight region is inconsistent (%s); starting afresh from the front-end's state",
                      self.name, e)
            self._init(default.used_idx, default.used_wrap)
            self.used, self.used_wrap = default.used_idx, default.used_wrap
            return default
        self.used, self.used_wrap = state.used_idx, state.used_wrap
        self._redeliver = deque(heads)
        self.resubmitted = len(heads)
        self.counter = max((self.entry_counter(j) for j in heads), default=-1) + 1
        if heads:
            log.warning("%s: resubmitting %d request(s) that were in flight when the previous back-end "
                        "stopped (buffer ids %s)", self.name, len(heads), [i for _, i in state.in_flight][:16])
        return state

    def _repair(self) -> tuple[QueueState, list[int]]:
        q = self.size
        h, b = self.h, self.b
        for what, v in (("free_head", h[6]), ("old_free_head", h[7]), ("used_idx", h[8]),
                        ("old_used_idx", h[9])):
            if v > q or (what.endswith("used_idx") and v >= q):
                raise ValueError(f"{what} {v} on a ring of {q}")
        # 1. a publication was under way: did its descriptor reach the ring?
        if h[8] != h[9] or b[20] != b[21]:
            old, old_wrap = h[9], bool(b[21])
            avail_pattern = _AVAIL if old_wrap else _USED
            if self._ring_flags(old) & (_AVAIL | _USED) != avail_pattern:
                # the driver can see it: commit the in-progress update
                h[7], h[9], b[21] = h[6], h[8], b[20]
        # 2. roll back anything uncommitted
        h[6], h[8], b[20] = h[7], h[9], b[21]
        # 3. entries on the free list are not in flight, whatever they say
        j = h[6]
        for _ in range(q):
            if j >= q:
                break
            b[32 + 32 * j] = 0
            j = h[16 + 16 * j + 1]
        else:
            if j < q:
                raise ValueError("the free list loops")
        # 4. the in-flight lists, in fetch order
        heads = [j for j in range(q) if b[32 + 32 * j] == 1]
        heads.sort(key=self.entry_counter)
        used, used_wrap = h[9], bool(b[21])
        pos, wrap = used, used_wrap
        in_flight: list[tuple[int, int]] = []
        lists: list[tuple[int, tuple[tuple[int, int, bool], ...]]] = []
        total = 0
        for e in heads:
            num, last = h[16 + 16 * e + 3], h[16 + 16 * e + 2]
            if not 1 <= num <= q:
                raise ValueError(f"entry {e} records a list of {num} descriptors")
            segs: list[tuple[int, int, bool]] = []
            j = e
            buf_id = 0
            for k in range(num):
                if j >= q:
                    raise ValueError(f"entry {e}: list runs off the entries")
                base = 16 + 16 * j
                buf_id, flags = h[base + 8], h[base + 9]
                length, addr = self.i32[8 * j + 13], self.q[4 * j + 7]
                self._expand(addr, length, flags, segs)
                if k == num - 1 and j != last:
                    raise ValueError(f"entry {e}: last entry {j} is not the recorded {last}")
                j = h[base + 1]
            in_flight.append((pos, buf_id))
            lists.append((num, tuple(segs)))
            total += num
            pos += num
            while pos >= q:
                pos -= q
                wrap = not wrap
        if total > q:
            raise ValueError(f"{total} slots in flight on a ring of {q}")
        state = QueueState(q, True, last_avail=pos, avail_wrap=wrap, used_idx=used, used_wrap=used_wrap,
                           in_flight=tuple(in_flight), in_flight_lists=tuple(lists))
        state.validate()
        return state, heads

    def _expand(self, addr: int, length: int, flags: int, segs: list[tuple[int, int, bool]]) -> None:
        """A recorded ring descriptor as data segments (an indirect table is
        read again from guest memory: the driver may not touch it in flight)."""
        if not flags & _INDIRECT:
            segs.append((addr, length, bool(flags & _WRITE)))
            return
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > self.size:
            raise ValueError(f"indirect table of {length} bytes")
        table = self.mem.read(addr, length, AreaKind.INDIRECT)
        for a, ln, _id, fl in PACKED_DESC.iter_unpack(table):
            if fl & _INDIRECT:
                raise ValueError("nested indirect table")
            segs.append((a, ln, bool(fl & _WRITE)))

    def fetched(self, chains: Sequence[Chain]) -> None:
        """After a pop, in ring order: copy each list's ring descriptors into
        free entries (receiving steps 1-7)."""
        entries = self._entries
        k = 0
        red = self._redeliver
        while red and k < len(chains):
            entries[chains[k]] = red.popleft()
            k += 1
        if k == len(chains):
            return
        q = self.size
        h, b, qv, i32 = self.h, self.b, self.q, self.i32
        # the new lists are one contiguous run of slots: read their descriptors at once
        start = chains[k].pos
        slots = sum(c.slots for c in chains[k:])
        gpa = self.desc_gpa
        if start + slots <= q:
            raw = self.mem.read(gpa + start * DESC_SIZE, slots * DESC_SIZE, AreaKind.DESC)
        else:
            first = q - start
            raw = (self.mem.read(gpa + start * DESC_SIZE, first * DESC_SIZE, AreaKind.DESC)
                   + self.mem.read(gpa, (slots - first) * DESC_SIZE, AreaKind.DESC))
        off = 0
        c = self.counter
        for chain in chains[k:]:
            e = h[7]  # old_free_head: this list's head entry
            fh = h[6]
            hb = 16 + 16 * e
            h[hb + 3] = 0              # 2a. num = 0
            qv[5 + 4 * e] = c          # 2b. counter
            c += 1
            b[32 + 32 * e] = 1         # 2d. inflight
            n = chain.slots
            for s in range(n):
                if fh >= q:
                    raise RuntimeError(f"{self.name}: inflight free list exhausted")
                addr, length, buf_id, flags = _RAW.unpack_from(raw, off)
                off += DESC_SIZE
                if s == n - 1:
                    h[hb + 2] = fh     # 3. last
                h[hb + 3] += 1         # 4. num
                fb = 16 + 16 * fh      # 5. copy the descriptor
                qv[4 * fh + 7] = addr
                i32[8 * fh + 13] = length
                h[fb + 8] = buf_id
                h[fb + 9] = flags
                fh = h[fb + 1]         # 6. free_head = next
                h[6] = fh
            h[7] = fh                  # 7. old_free_head = free_head
            entries[chain] = e
        self.counter = c

    def publish(self, items: Sequence[tuple[Chain, int]], publish: Callable[[Any], bool]) -> bool:
        """Publish `items` one list at a time (see the module docstring)."""
        h, b = self.h, self.b
        q = self.size
        notify = False
        for item in items:
            chain = item[0]
            e = self._entries.pop(chain)
            last = h[16 + 16 * e + 2]
            h[16 + 16 * last + 1] = h[6]   # 3. desc[e.last].next = free_head
            h[6] = e                       # 4. free_head = e
            u = self.used + chain.slots    # 6. used_idx / wrap advance
            if u >= q:
                u -= q
                self.used_wrap = not self.used_wrap
                b[20] = int(self.used_wrap)
            self.used = u
            h[8] = u
            notify |= publish([item])      # 7. the used descriptor's flags
            b[32 + 32 * e] = 0             # 8. retire
            h[7] = h[6]                    # 9. commit
            h[9] = u
            b[21] = b[20]
        return notify


Tracker = SplitTracker | PackedTracker


class TrackedVirtqueue(Virtqueue):
    """A `Virtqueue` that records every chain it hands out and returns in an
    inflight queue region. Same API; the vectorised `pop_bulk` path is off
    (it returns what `pop_batch` does), since every chain must be recorded."""

    def __init__(self, mem: GuestMemory, size: int, desc: int, driver: int, device: int, *, tracker: Tracker,
                 features: int = 0, policy: Policy = "lazy", state: QueueState | None = None,
                 name: str = "vq") -> None:
        self.tracker = tracker
        super().__init__(mem, size, desc, driver, device, features=features, policy=policy, state=state,
                         name=name)

    def pop_batch(self, limit: int = DEFAULT_BATCH) -> list[Chain]:
        out = super().pop_batch(limit)
        if out:
            self.tracker.fetched(out)
        return out

    def pop_bulk(self, limit: int = DEFAULT_BATCH) -> list[Chain]:
        return self.pop_batch(limit)

    def _publish(self, items: list[tuple[Chain, int]]) -> bool:
        return self.tracker.publish(items, self._publish_untracked)

    def _publish_untracked(self, items: list[tuple[Chain, int]]) -> bool:
        return super()._publish(items)

    def give_back(self, chains: Sequence[Chain]) -> int:
        """Rewinding would leave the chains marked in flight in the shared
        buffer (a restarted back-end would resubmit them): complete them
        empty instead, which the tracker records."""
        self.complete_batch([(c, 0) for c in chains if c in self.inflight])
        return 0


__all__ = [
    "PACKED_ENTRY",
    "PACKED_HEADER",
    "SPLIT_ENTRY",
    "SPLIT_HEADER",
    "VERSION",
    "InflightRegion",
    "PackedTracker",
    "SplitTracker",
    "TrackedVirtqueue",
    "Tracker",
    "queue_region_size",
]
