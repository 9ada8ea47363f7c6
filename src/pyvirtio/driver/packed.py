"""Packed virtqueue, driver side (virtio 1.2 section 2.8).

Buffer ids come from a free list; descriptors are written at the driver's
`next_avail` slots with the id in every descriptor of a list (as Linux
does), and each list's first descriptor gets its flags only at `publish`,
after everything else it covers. Both wrap counters start at 1.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

from pyvirtio import spec
from pyvirtio.driver.common import FREE, BufferPool, DeviceProtocolError, QueueFullError, VirtqueueDriver
from pyvirtio.fence import WEAK_ORDERING, acquire, release
from pyvirtio.memory import AreaKind, GuestMemory

log = logging.getLogger(__name__)

_pack = spec.PACKED_DESC.pack
#: a descriptor without its flags (addr, len, id): written while the list's
#: first slot must not yet look available
_pack_head = struct.Struct("<QIH").pack
_NEXT = int(spec.PackedDescFlags.NEXT)
_WRITE = int(spec.PackedDescFlags.WRITE)
_INDIRECT = int(spec.PackedDescFlags.INDIRECT)
_AVAIL = int(spec.PackedDescFlags.AVAIL)
_USED = int(spec.PackedDescFlags.USED)
_BOTH = _AVAIL | _USED
_ENABLE = int(spec.EventFlags.ENABLE)
_DISABLE = int(spec.EventFlags.DISABLE)
_DESC = int(spec.EventFlags.DESC)
_FLAGS_OFF = spec.PACKED_FLAGS


class PackedDriver(VirtqueueDriver):
    """Driver side of a packed virtqueue; see `VirtqueueDriver` for the contract.

    `start_index` counts descriptor slots already gone round: both cursors
    start at slot `start_index % size` with wrap counter
    `1 ^ (start_index // size) & 1`, and the ring's flags are initialised as
    a ring that was used in order up to there. Tell the device the same
    position (`vring_base()` gives the vhost-user encoding while idle).
    """

    packed = True

    __slots__ = (
        "_avail_bits",  # AVAIL/USED bits that mark a descriptor available in the current lap
        "_d",  # descriptor ring
        "_dev",  # device event suppression (we read)
        "_drv",  # driver event suppression (we write)
        "_event_shadow",  # driver event flags as last written
        "_free_id",  # head of the buffer id free list
        "_head_flags",  # per id: flags of its first descriptor, stored at publish
        "_head_off",  # per id: byte offset of those flags
        "_id_next",  # per id: free-list link
        "_in_len",  # per id: device-writable bytes
        "_kick_old",  # next_avail at the previous kick decision
        "_last_used",  # slot of the next used descriptor to look at
        "_live",  # buffers added and not yet reaped
        "_next_avail",  # slot of the next descriptor to write
        "_nslots",  # per id: slots its list occupies
        "_num_free",  # free slots
        "_ring_bytes",
        "_staged",  # ids added since the last publish, in order
        "_staged_slots",
        "_stok",  # per id: token while staged
        "_table",  # per id: indirect table address or -1
        "_token",  # per id: token while published, FREE otherwise
        "_used_want",  # AVAIL|USED bits of a used descriptor in the current lap (0 or 0x8080)
    )

    def __init__(self, mem: GuestMemory, size: int, desc: int, driver_area: int, device_area: int, *,
                 event_idx: bool = False, indirect: bool = False, pool: BufferPool | None = None,
                 start_index: int = 0) -> None:
        super().__init__(mem, size, desc, driver_area, device_area, event_idx=event_idx,
                         indirect=indirect, pool=pool, start_index=start_index)
        q = size
        ev = spec.EVENT_SUPPRESS.size
        self._check_disjoint([("descriptor", desc, spec.desc_table_size(q)),
                              ("driver event", driver_area, ev), ("device event", device_area, ev)])
        self._d = mem.area(AreaKind.DESC, desc, spec.desc_table_size(q), spec.PACKED_DESC_ALIGN)
        self._drv = mem.area(AreaKind.EVENT, driver_area, ev, spec.PACKED_EVENT_ALIGN)
        self._dev = mem.area(AreaKind.EVENT, device_area, ev, spec.PACKED_EVENT_ALIGN)

        slot = start_index % q
        wrap = 1 ^ ((start_index // q) & 1)
        # Slots before `slot` hold this lap's used descriptors, the rest the
        # previous lap's: neither looks available to the device nor used to us.
        ring = bytearray(spec.desc_table_size(q))
        this_lap = _BOTH if wrap else 0
        for i in range(q):
            flags = this_lap if i < slot else this_lap ^ _BOTH
            if flags:
                struct.pack_into("<H", ring, (i << 4) + spec.PACKED_FLAGS, flags)
        self._d.write(0, ring)
        pos = slot | wrap << 15
        self._drv.write(0, spec.EVENT_SUPPRESS.pack(pos, _ENABLE))
        self._dev.write(0, spec.EVENT_SUPPRESS.pack(pos, _ENABLE))

        self._ring_bytes = q << 4
        self._next_avail = slot
        self._avail_bits = _AVAIL if wrap else _USED
        self._last_used = slot
        self._used_want = this_lap
        self._num_free = q
        self._id_next = list(range(1, q + 1))
        self._free_id = 0
        self._token: list[object] = [FREE] * q
        self._stok: list[object] = [None] * q
        self._nslots = [0] * q
        self._in_len = [0] * q
        self._table = [-1] * q
        self._head_off = [0] * q
        self._head_flags = [0] * q
        self._staged: list[int] = []
        self._staged_slots = 0
        self._live = 0
        self._kick_old = slot
        self._event_shadow = _ENABLE

    # -- state ------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def outstanding(self) -> int:
        return self._live

    @property
    def next_avail(self) -> int:
        return self._next_avail

    @property
    def avail_wrap(self) -> int:
        return 1 if self._avail_bits == _AVAIL else 0

    @property
    def last_used(self) -> int:
        return self._last_used

    @property
    def used_wrap(self) -> int:
        return 1 if self._used_want else 0

    def vring_base(self) -> int:
        """QEMU/vhost-user packed encoding: bits 0-14 avail slot, bit 15 avail
        wrap, bits 16-30 used slot, bit 31 used wrap."""
        if self._num_free != self.size:
            raise RuntimeError("vring_base is only defined while no buffer is staged or outstanding")
        return self._next_avail | self.avail_wrap << 15 | self._last_used << 16 | self.used_wrap << 31

    # -- hot path -----------------------------------------------------------------
    # add/publish/get_used are written for speed: attributes and bound methods
    # are read into locals once, a used descriptor's len/id/flags come in one
    # aligned 8-byte load.

    def add(self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]], token: object = None,
            *, indirect: bool | None = None) -> int:
        n = len(out) + len(in_)
        use_table = False if (n == 1 and indirect is None) else self._use_indirect(n, indirect)
        bid = self._free_id
        bits = self._avail_bits
        off = head_off = self._next_avail << 4
        in_len = 0
        table = -1
        if use_table:
            if not self._num_free:
                raise QueueFullError("no free slot for an indirect buffer")
            parts = []
            for addr, ln in out:
                parts.append(_pack(addr, ln, 0, 0))
            for addr, ln in in_:
                in_len += ln
                parts.append(_pack(addr, ln, 0, _WRITE))
            gpa = self._write_table(b"".join(parts))
            if gpa is None:
                if indirect:
                    raise MemoryError("the buffer pool has no room for an indirect table")
                log.debug("buffer pool full: adding a %d-segment buffer with direct descriptors", n)
                use_table = False
                in_len = 0
            else:
                table = gpa
                self._d.write(off, _pack_head(table, n << 4, bid))
                head_flags = bits | _INDIRECT
                off += 16
                count = 1
        if not use_table:
            if n > self._num_free:
                raise QueueFullError(f"{n} slots needed, {self._num_free} free")
            write = self._d.write
            ring_bytes = self._ring_bytes
            left = n
            for addr, ln in out:
                left -= 1
                flags = bits | _NEXT if left else bits
                if off == head_off:
                    write(off, _pack_head(addr, ln, bid))
                    head_flags = flags
                else:
                    write(off, _pack(addr, ln, bid, flags))
                off += 16
                if off == ring_bytes:
                    off = 0
                    bits ^= _BOTH
            for addr, ln in in_:
                left -= 1
                in_len += ln
                flags = bits | _NEXT | _WRITE if left else bits | _WRITE
                if off == head_off:
                    write(off, _pack_head(addr, ln, bid))
                    head_flags = flags
                else:
                    write(off, _pack(addr, ln, bid, flags))
                off += 16
                if off == ring_bytes:
                    off = 0
                    bits ^= _BOTH
            count = n
        elif off == self._ring_bytes:
            off = 0
            bits ^= _BOTH
        self._next_avail = off >> 4
        self._avail_bits = bits
        self._free_id = self._id_next[bid]
        self._num_free -= count
        self._staged_slots += count
        self._nslots[bid] = count
        self._in_len[bid] = in_len
        self._table[bid] = table
        self._head_off[bid] = head_off + _FLAGS_OFF
        self._head_flags[bid] = head_flags
        self._stok[bid] = token
        self._staged.append(bid)
        self._live += 1
        return bid

    def publish(self) -> bool:
        staged = self._staged
        if not staged:
            return False
        if WEAK_ORDERING:
            release()  # every staged descriptor body before the first head's flags
        store16 = self._d.store16
        head_off = self._head_off
        head_flags = self._head_flags
        token = self._token
        stok = self._stok
        for bid in staged:
            store16(head_off[bid], head_flags[bid])
            token[bid] = stok[bid]
            stok[bid] = None
        staged.clear()
        self._staged_slots = 0
        new = self._next_avail
        old = self._kick_old
        self._kick_old = new
        # StoreLoad: the flags stores must be visible before we read the
        # device's event structure, else a device arming concurrently can miss
        # our descriptors while we read its old DISABLE (lost kick, section 5).
        self._fence()
        event = self._dev.load32(0)  # off_wrap and flags in one snapshot
        flags = (event >> 16) & 3
        if flags == _DISABLE:
            return False
        if flags == _DESC and self.event_idx:
            wrap = 1 if self._avail_bits == _AVAIL else 0
            return spec.packed_need_event(event & 0xFFFF, new, old, wrap, self.size)
        return True  # ENABLE, reserved 3, or DESC without EVENT_IDX: kick to be safe

    def get_used(self) -> list[tuple[object, int]]:
        load64 = self._d.load64
        off = self._last_used << 4
        want = self._used_want
        ring_bytes = self._ring_bytes
        size = self.size
        token = self._token
        in_len = self._in_len
        nslots = self._nslots
        tables = self._table
        id_next = self._id_next
        free_id = self._free_id
        freed = 0
        done: list[tuple[object, int]] = []
        err = None
        while True:
            # len (bytes 8-11), id (12-13), flags (14-15): one aligned load is
            # single-copy atomic, and the device stores flags after id/len
            # (release), so seeing its flags means seeing its id and len.
            v = load64(off + 8)
            flags = v >> 48
            if flags & _BOTH != want:
                break
            if WEAK_ORDERING:
                acquire()  # the used flags before the buffer contents the caller reads
            bid = (v >> 32) & 0xFFFF
            if bid >= size:
                err = f"used id {bid} is out of range (queue size {size})"
                break
            tok = token[bid]
            if tok is FREE:
                err = f"used id {bid} is not an outstanding published buffer"
                break
            ln = v & 0xFFFFFFFF if flags & _WRITE else 0
            if ln > in_len[bid]:
                err = f"used len {ln} for id {bid} exceeds its {in_len[bid]} device-writable bytes"
                break
            done.append((tok, ln))
            token[bid] = FREE
            id_next[bid] = free_id
            free_id = bid
            count = nslots[bid]
            freed += count
            table = tables[bid]
            if table >= 0:
                tables[bid] = -1
                self.pool.free(table)  # type: ignore[union-attr]
            off += count << 4
            if off >= ring_bytes:
                off -= ring_bytes
                want ^= _BOTH
        self._free_id = free_id
        self._num_free += freed
        self._live -= len(done)
        self._last_used = last = off >> 4
        self._used_want = want
        if err is not None:
            raise DeviceProtocolError(f"{err} (slot {last})", done)
        if done and self._event_shadow == _DESC:
            # Keep asking for the next completion (Linux does the same), and
            # order that store before the caller's next look at the ring.
            self._drv.store16(spec.EVENT_OFF_WRAP, last | (0x8000 if want else 0))
            self._fence()
        return done

    def pending_used(self) -> bool:
        flags = self._d.load16((self._last_used << 4) + _FLAGS_OFF)
        return flags & _BOTH == self._used_want

    # -- used-buffer notifications ----------------------------------------------------

    def enable_interrupts(self, delayed: bool = False) -> bool:
        if self.event_idx:
            slot = self._last_used
            wrap = 1 if self._used_want else 0
            if delayed:
                slot += ((self.size - self._num_free - self._staged_slots) * 3) >> 2
                if slot >= self.size:
                    slot -= self.size
                    wrap ^= 1
            self._drv.store16(spec.EVENT_OFF_WRAP, slot | wrap << 15)
            if self._event_shadow != _DESC:
                if WEAK_ORDERING:
                    release()  # off_wrap before the DESC flags that make the device read it
                self._drv.store16(spec.EVENT_FLAGS, _DESC)
                self._event_shadow = _DESC
        elif self._event_shadow != _ENABLE:
            self._drv.store16(spec.EVENT_FLAGS, _ENABLE)
            self._event_shadow = _ENABLE
        # StoreLoad: the enable must be visible before we re-read the next used
        # slot; a completion published meanwhile was decided against the old
        # state and would otherwise never be noticed.
        self._fence()
        return self.pending_used()

    def disable_interrupts(self) -> None:
        if self._event_shadow != _DISABLE:
            self._drv.store16(spec.EVENT_FLAGS, _DISABLE)
            self._event_shadow = _DISABLE
