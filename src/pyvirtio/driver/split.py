"""Split virtqueue, driver side (virtio 1.2 section 2.7).

Descriptors come from a free list chained through a shadow of their `next`
fields, as in Linux: a chain taken from the list is already linked, and a
reaped chain goes back in O(1) by pointing its tail at the old list head.
Indices are free-running u16; `start_index` lets tests begin near 65535.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pyvirtio import spec
from pyvirtio.driver.common import FREE, BufferPool, DeviceProtocolError, QueueFullError, VirtqueueDriver
from pyvirtio.fence import WEAK_ORDERING, acquire, release
from pyvirtio.memory import AreaKind, GuestMemory

log = logging.getLogger(__name__)

_pack = spec.SPLIT_DESC.pack
_iter_used = spec.USED_ELEM.iter_unpack
_NEXT = int(spec.DescFlags.NEXT)
_WRITE = int(spec.DescFlags.WRITE)
_INDIRECT = int(spec.DescFlags.INDIRECT)
_NEXT_WRITE = _NEXT | _WRITE
_NO_INTERRUPT = int(spec.AvailFlags.NO_INTERRUPT)
_NO_NOTIFY = int(spec.UsedFlags.NO_NOTIFY)
_AVAIL_IDX = spec.AVAIL_IDX
_AVAIL_RING = spec.AVAIL_RING
_USED_FLAGS = spec.USED_FLAGS
_USED_IDX = spec.USED_IDX
_USED_RING = spec.USED_RING


class SplitDriver(VirtqueueDriver):
    """Driver side of a split virtqueue; see `VirtqueueDriver` for the contract.

    `start_index` (0..65535) is the initial free-running index: `avail.idx`,
    `used.idx`, `used_event` and `avail_event` all start there, as if that
    many buffers had gone round already. Tell the device the same value
    (vhost-user SET_VRING_BASE; `vring_base()` returns it while idle).
    """

    __slots__ = (
        "_a",  # available ring (flags, idx, ring)
        "_ae",  # avail_event (device-written)
        "_avail_idx",  # next avail ring index to fill (staged entries included)
        "_count",  # per head: descriptors in its chain
        "_d",  # descriptor table
        "_free_head",
        "_in_flight",  # buffers published and not yet reaped
        "_in_len",  # per head: device-writable bytes
        "_intr_on",  # shadow: used-buffer notifications requested
        "_last_used",
        "_mask",
        "_next",  # per descriptor: shadow of `next` (free-list link, or chain link while in use)
        "_num_free",
        "_published",  # value of avail.idx as last stored
        "_staged",  # heads added since the last publish, in order
        "_stok",  # per head: token while staged
        "_table",  # per head: indirect table address or -1
        "_tail",  # per head: last descriptor of its chain
        "_token",  # per head: token while published, FREE otherwise
        "_u",  # used ring (flags, idx, ring)
        "_ue",  # used_event (driver-written)
    )

    def __init__(self, mem: GuestMemory, size: int, desc: int, driver_area: int, device_area: int, *,
                 event_idx: bool = False, indirect: bool = False, pool: BufferPool | None = None,
                 start_index: int = 0) -> None:
        super().__init__(mem, size, desc, driver_area, device_area, event_idx=event_idx,
                         indirect=indirect, pool=pool, start_index=start_index)
        if start_index > 0xFFFF:
            raise ValueError(f"split start index {start_index} is not a u16")
        q = size
        self._check_disjoint([("descriptor", desc, spec.desc_table_size(q)),
                              ("available", driver_area, spec.avail_size(q)),
                              ("used", device_area, spec.used_size(q))])
        self._d = mem.area(AreaKind.DESC, desc, spec.desc_table_size(q), spec.SPLIT_DESC_ALIGN)
        self._a = mem.area(AreaKind.AVAIL, driver_area, spec.AVAIL_RING + 2 * q, spec.SPLIT_AVAIL_ALIGN)
        self._u = mem.area(AreaKind.USED, device_area, spec.USED_RING + spec.USED_ELEM_SIZE * q,
                           spec.SPLIT_USED_ALIGN)
        self._ue = mem.area(AreaKind.EVENT, driver_area + spec.used_event_offset(q), 2, 2)
        self._ae = mem.area(AreaKind.EVENT, device_area + spec.avail_event_offset(q), 2, 2)

        # Fresh rings: zero, with every index at start_index.
        self._d.write(0, bytes(self._d.size))
        self._a.write(0, bytes(self._a.size))
        self._u.write(0, bytes(self._u.size))
        self._a.store16(spec.AVAIL_IDX, start_index)
        self._u.store16(spec.USED_IDX, start_index)
        self._ue.store16(0, start_index)
        self._ae.store16(0, start_index)

        self._mask = q - 1
        self._next = list(range(1, q + 1))  # the last link (q) is never followed
        self._free_head = 0
        self._num_free = q
        self._token: list[object] = [FREE] * q
        self._stok: list[object] = [None] * q
        self._count = [0] * q
        self._tail = [0] * q
        self._in_len = [0] * q
        self._table = [-1] * q
        self._staged: list[int] = []
        self._avail_idx = start_index
        self._published = start_index
        self._last_used = start_index
        self._in_flight = 0
        self._intr_on = True

    # -- state ------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def outstanding(self) -> int:
        return self._in_flight + len(self._staged)

    @property
    def avail_idx(self) -> int:
        """`avail.idx` as last published."""
        return self._published

    @property
    def last_used(self) -> int:
        """Free-running index of the next used ring entry to reap."""
        return self._last_used

    def vring_base(self) -> int:
        if self._staged or self._in_flight:
            raise RuntimeError("vring_base is only defined while no buffer is staged or outstanding")
        return self._published

    # -- hot path -----------------------------------------------------------------
    # add/publish/get_used are written for speed: attributes and bound methods
    # are read into locals once, no per-descriptor objects beyond the packed
    # bytes, used elements are read in one slice (two on wrap).

    def add(self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]], token: object = None,
            *, indirect: bool | None = None) -> int:
        n = len(out) + len(in_)
        use_table = False if (n == 1 and indirect is None) else self._use_indirect(n, indirect)
        nxt = self._next
        in_len = 0
        table = -1
        if use_table:
            if not self._num_free:
                raise QueueFullError("no free descriptor for an indirect buffer")
            parts = []
            i = 0
            for addr, ln in out:
                i += 1
                parts.append(_pack(addr, ln, _NEXT, i) if i < n else _pack(addr, ln, 0, 0))
            for addr, ln in in_:
                i += 1
                in_len += ln
                parts.append(_pack(addr, ln, _NEXT_WRITE, i) if i < n else _pack(addr, ln, _WRITE, 0))
            gpa = self._write_table(b"".join(parts))
            if gpa is None:
                if indirect:
                    raise MemoryError("the buffer pool has no room for an indirect table")
                log.debug("buffer pool full: adding a %d-segment buffer with direct descriptors", n)
                use_table = False
                in_len = 0
            else:
                table = gpa
                head = tail = self._free_head
                self._d.write(head << 4, _pack(table, n << 4, _INDIRECT, 0))
                self._free_head = nxt[head]
                self._num_free -= 1
                count = 1
        if not use_table:
            if n > self._num_free:
                raise QueueFullError(f"{n} descriptors needed, {self._num_free} free")
            write = self._d.write
            head = cur = tail = self._free_head
            left = n
            for addr, ln in out:
                left -= 1
                tail = cur
                cur = nxt[cur]
                write(tail << 4, _pack(addr, ln, _NEXT, cur) if left else _pack(addr, ln, 0, 0))
            for addr, ln in in_:
                left -= 1
                in_len += ln
                tail = cur
                cur = nxt[cur]
                write(tail << 4, _pack(addr, ln, _NEXT_WRITE, cur) if left else _pack(addr, ln, _WRITE, 0))
            self._free_head = cur
            self._num_free -= n
            count = n
        self._stok[head] = token
        self._count[head] = count
        self._tail[head] = tail
        self._in_len[head] = in_len
        self._table[head] = table
        self._staged.append(head)
        idx = self._avail_idx
        # The ring entry is invisible until publish() moves avail.idx past it.
        self._a.store16(_AVAIL_RING + ((idx & self._mask) << 1), head)
        self._avail_idx = (idx + 1) & 0xFFFF
        return head

    def publish(self) -> bool:
        staged = self._staged
        if not staged:
            return False
        token = self._token
        stok = self._stok
        for head in staged:
            token[head] = stok[head]
            stok[head] = None
        staged.clear()
        new = self._avail_idx
        old = self._published
        if WEAK_ORDERING:
            release()  # descriptors and ring entries before the avail.idx that exposes them
        self._a.store16(_AVAIL_IDX, new)
        self._published = new
        self._in_flight += (new - old) & 0xFFFF
        # StoreLoad: the avail.idx store must be visible before we read the
        # device's suppression state, else a device arming concurrently can
        # read our old idx while we read its old "no kick" (lost kick, section 5).
        self._fence()
        if self.event_idx:
            event = self._ae.load16(0)
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self._u.load16(_USED_FLAGS) & _NO_NOTIFY

    def get_used(self) -> list[tuple[object, int]]:
        u = self._u
        last = self._last_used
        idx = u.load16(_USED_IDX)
        n = (idx - last) & 0xFFFF
        if not n:
            return []
        if n > self._in_flight:
            raise DeviceProtocolError(
                f"used.idx moved from {last} to {idx} ({n} buffers), but only {self._in_flight} "
                "published buffers are outstanding")
        if WEAK_ORDERING:
            acquire()  # used.idx before the entries it covers
        size = self.size
        start = last & self._mask
        first = size - start
        if n <= first:
            raw = u.read(_USED_RING + (start << 3), n << 3)
        else:
            raw = u.read(_USED_RING + (start << 3), first << 3) + u.read(_USED_RING, (n - first) << 3)
        token = self._token
        in_len = self._in_len
        count = self._count
        tail = self._tail
        tables = self._table
        nxt = self._next
        free_head = self._free_head
        num_free = self._num_free
        done: list[tuple[object, int]] = []
        err = None
        for head, ln in _iter_used(raw):
            if head >= size:
                err = f"used id {head} is not a descriptor index (queue size {size})"
                break
            tok = token[head]
            if tok is FREE:
                err = f"used id {head} is not the head of an outstanding published buffer"
                break
            if ln > in_len[head]:
                err = f"used len {ln} for id {head} exceeds its {in_len[head]} device-writable bytes"
                break
            done.append((tok, ln))
            token[head] = FREE
            nxt[tail[head]] = free_head
            free_head = head
            num_free += count[head]
            table = tables[head]
            if table >= 0:
                tables[head] = -1
                self.pool.free(table)  # type: ignore[union-attr]
        k = len(done)
        self._free_head = free_head
        self._num_free = num_free
        self._last_used = last = (last + k) & 0xFFFF
        self._in_flight -= k
        if err is not None:
            raise DeviceProtocolError(f"{err} (used ring entry {(idx - n + k) & 0xFFFF})", done)
        if self._intr_on and self.event_idx:
            # Keep asking for the next completion (Linux does the same), and
            # order that store before the caller's next read of used.idx.
            self._ue.store16(0, last)
            self._fence()
        return done

    def pending_used(self) -> bool:
        return self._u.load16(_USED_IDX) != self._last_used

    # -- used-buffer notifications ----------------------------------------------------

    def enable_interrupts(self, delayed: bool = False) -> bool:
        last = self._last_used
        bufs = 0
        if self.event_idx:
            if delayed:
                bufs = (self._in_flight * 3) >> 2
            self._ue.store16(0, (last + bufs) & 0xFFFF)
        elif not self._intr_on:
            self._a.store16(spec.AVAIL_FLAGS, 0)
        self._intr_on = True
        # StoreLoad: the enable must be visible before we re-read used.idx; a
        # completion published meanwhile was decided against the old state
        # and would otherwise never be noticed.
        self._fence()
        return ((self._u.load16(_USED_IDX) - last) & 0xFFFF) > bufs

    def disable_interrupts(self) -> None:
        if not self._intr_on:
            return
        self._intr_on = False
        if self.event_idx:
            # Under EVENT_IDX avail.flags must stay 0 (spec 2.7.7.1); park the
            # event just behind last_used, the farthest point the device's
            # used.idx can reach (2^16 - 1 completions away).
            self._ue.store16(0, (self._last_used - 1) & 0xFFFF)
        else:
            self._a.store16(spec.AVAIL_FLAGS, _NO_INTERRUPT)
