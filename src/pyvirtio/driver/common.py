"""What both driver-side ring formats share: errors, ring layout, the
guest-physical buffer allocator and the driver base class.

The driver is the *guest* half of a virtqueue. It is trusted by its caller
(tests, benchmarks, the vhost-user frontend) and distrusts the device: every
index and length the device writes is checked where it is read, and a
violation raises `DeviceProtocolError`.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from typing import Any, ClassVar, Self

from pyvirtio import spec
from pyvirtio.memory import AreaKind, GuestMemory

log = logging.getLogger(__name__)

#: Every ring area `ring_layout` hands out starts on a cache-line boundary.
LAYOUT_ALIGN = 64

#: Marker in per-buffer token tables for "no buffer outstanding here".
FREE: Any = object()


class DeviceProtocolError(Exception):
    """The device wrote something to the ring that a correct device cannot.

    Raised by `get_used` (a used id out of range or not outstanding, a used
    count larger than what was published, a length larger than the buffer's
    device-writable bytes). Buffers reaped before the bad element are not
    lost: they are in `reaped`, and the driver's state stays consistent (the
    offending element stays at the head of the used ring, so calling
    `get_used` again raises again).
    """

    def __init__(self, message: str, reaped: list[tuple[object, int]] | None = None) -> None:
        super().__init__(message)
        self.reaped: list[tuple[object, int]] = reaped if reaped is not None else []


class QueueFullError(RuntimeError):
    """Not enough free descriptors (split) or slots (packed) for a buffer now.

    Transient: reap used buffers with `get_used` and try again. A buffer that
    can never fit (more segments than the queue size) raises `ValueError`.
    """


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) & -a


def check_queue_size(packed: bool, size: int) -> None:
    """Raise `ValueError` unless `size` is a legal queue size for the format."""
    if not 1 <= size <= spec.MAX_QUEUE_SIZE:
        raise ValueError(f"queue size {size} is not in 1..{spec.MAX_QUEUE_SIZE}")
    if not packed and not spec.is_power_of_two(size):
        raise ValueError(f"split queue size {size} is not a power of two")


def ring_layout(packed: bool, size: int, base_gpa: int) -> tuple[int, int, int, int]:
    """Lay out one virtqueue's three areas consecutively from `base_gpa`.

    Returns `(desc_gpa, driver_area_gpa, device_area_gpa, end_gpa)`; `end_gpa`
    is the first byte after the device area. Every area starts on a 64-byte
    boundary, which satisfies the spec alignments (split: descriptor table 16,
    available ring 2, used ring 4; packed: descriptor ring 16, event
    structures 4) and keeps the driver-written and device-written areas on
    different cache lines. Split sizes include the event fields: the available
    ring is 6+2Q bytes (with `used_event`), the used ring 6+8Q (with
    `avail_event`); packed event structures are 4 bytes each.
    """
    check_queue_size(packed, size)
    if base_gpa < 0:
        raise ValueError(f"negative base address {base_gpa:#x}")
    desc = _align_up(base_gpa, LAYOUT_ALIGN)
    driver = _align_up(desc + spec.desc_table_size(size), LAYOUT_ALIGN)
    if packed:
        device = _align_up(driver + spec.EVENT_SUPPRESS.size, LAYOUT_ALIGN)
        end = device + spec.EVENT_SUPPRESS.size
    else:
        device = _align_up(driver + spec.avail_size(size), LAYOUT_ALIGN)
        end = device + spec.used_size(size)
    return desc, driver, device, end


class BufferPool:
    """Allocator of guest-physical ranges inside `[base, base+size)`.

    A bump pointer with exact-size free lists: drivers free and re-allocate
    tables and buffers of a few recurring sizes, which the free lists serve in
    O(1). When neither serves a request, freed blocks are coalesced and the
    request is carved first-fit from them. Blocks are `align`-aligned and
    sized in multiples of `align`. Not thread-safe; the memory is not cleared.
    """

    def __init__(self, mem: GuestMemory, base: int, size: int, align: int = 16) -> None:
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        if size <= 0:
            raise ValueError(f"pool size {size} is not positive")
        mem.translate(base, size)  # raises GuestMemoryError if not all in guest memory
        self.mem = mem
        self.base = base
        self.size = size
        self.align = align
        self._end = base + size
        self._top = _align_up(base, align)
        self._free: dict[int, list[int]] = {}  # rounded size -> free block addresses
        self._live: dict[int, int] = {}  # address -> rounded size

    @property
    def bytes_in_use(self) -> int:
        """Bytes currently allocated (rounded up to the alignment)."""
        return sum(self._live.values())

    def alloc(self, n: int) -> int:
        """Reserve `n` bytes; return the guest-physical address.

        Raises `MemoryError` when no block of that size is left and
        `ValueError` for `n <= 0`. Release with `free`.
        """
        if n <= 0:
            raise ValueError(f"cannot allocate {n} bytes")
        r = (n + self.align - 1) & -self.align
        blocks = self._free.get(r)
        if blocks:
            gpa = blocks.pop()
        elif self._top + r <= self._end:
            gpa = self._top
            self._top += r
        else:
            gpa = self._carve(r)
        self._live[gpa] = r
        return gpa

    def free(self, gpa: int) -> None:
        """Return a block from `alloc`. Raises `ValueError` for an address
        that is not an allocated block (including a double free)."""
        r = self._live.pop(gpa, None)
        if r is None:
            raise ValueError(f"{gpa:#x} is not an allocated block of this pool")
        self._free.setdefault(r, []).append(gpa)

    def _carve(self, r: int) -> int:
        """Coalesce the free blocks, then take `r` bytes first-fit."""
        spans = sorted((g, s) for s, gs in self._free.items() for g in gs)
        merged: list[list[int]] = []
        for g, s in spans:
            if merged and merged[-1][0] + merged[-1][1] == g:
                merged[-1][1] += s
            else:
                merged.append([g, s])
        if merged and merged[-1][0] + merged[-1][1] == self._top:
            self._top = merged.pop()[0]
        found = -1
        for span in merged:
            if span[1] >= r:
                found = span[0]
                span[0] += r
                span[1] -= r
                break
        if found < 0 and self._top + r <= self._end:
            found = self._top
            self._top += r
        self._free = {}
        for g, s in merged:
            if s:
                self._free.setdefault(s, []).append(g)
        if found < 0:
            raise MemoryError(
                f"buffer pool [{self.base:#x}, {self._end:#x}) has no free block of {r} bytes")
        return found


class VirtqueueDriver(abc.ABC):
    """The driver side of one virtqueue; `SplitDriver` and `PackedDriver`.

    Caller's contract, common to both formats:

    - `add` stages buffers, `publish` makes every staged buffer visible at
      once and says whether to notify (kick) the device; kick iff it returns
      True.
    - `get_used` reaps completions. Before sleeping for a used-buffer
      notification, call `enable_interrupts()` and sleep only if it returned
      False; or keep notifications enabled and, after each notification, call
      `get_used` until it returns an empty list. Either way no notification is
      lost.
    - One thread drives a queue; nothing here is thread-safe.

    Attributes handed to the device: `size`, `desc`, `driver_area`,
    `device_area`, and the negotiated `event_idx` / `indirect`.
    """

    __slots__ = (
        "_fence",
        "desc",
        "device_area",
        "driver_area",
        "event_idx",
        "indirect",
        "mem",
        "pool",
        "size",
        "start_index",
    )

    #: True for the packed ring format.
    packed: ClassVar[bool] = False

    def __init__(self, mem: GuestMemory, size: int, desc: int, driver_area: int, device_area: int, *,
                 event_idx: bool = False, indirect: bool = False, pool: BufferPool | None = None,
                 start_index: int = 0) -> None:
        check_queue_size(self.packed, size)
        if indirect and pool is None:
            raise ValueError("indirect descriptors need a BufferPool for their tables")
        if start_index < 0:
            raise ValueError(f"negative start index {start_index}")
        self.mem = mem
        self.size = size
        self.desc = desc
        self.driver_area = driver_area
        self.device_area = device_area
        self.event_idx = event_idx
        self.indirect = indirect
        self.pool = pool
        self.start_index = start_index
        # GuestMemory.fence is pyvirtio.fence.full(); a CountingMemory counts it.
        self._fence = mem.fence

    @staticmethod
    def _check_disjoint(areas: Sequence[tuple[str, int, int]]) -> None:
        for i, (na, ga, sa) in enumerate(areas):
            for nb, gb, sb in areas[i + 1:]:
                if ga < gb + sb and gb < ga + sa:
                    raise ValueError(f"{na} area [{ga:#x}, {ga + sa:#x}) overlaps "
                                     f"{nb} area [{gb:#x}, {gb + sb:#x})")

    def _use_indirect(self, n: int, indirect: bool | None) -> bool:
        """Decide whether a buffer of `n` segments goes into an indirect table."""
        if n == 0:
            raise ValueError("a buffer needs at least one segment")
        if n > self.size:
            raise ValueError(f"a buffer of {n} segments exceeds the queue size {self.size}")
        if indirect is None:
            return self.indirect and n > 1
        if indirect and not self.indirect:
            raise ValueError("indirect descriptors were not negotiated for this queue")
        return indirect

    def _write_table(self, data: bytes) -> int | None:
        """Put an indirect table in pool memory; None if the pool is full."""
        assert self.pool is not None
        try:
            gpa = self.pool.alloc(len(data))
        except MemoryError:
            return None
        self.mem.write(gpa, data, AreaKind.INDIRECT)
        return gpa

    @classmethod
    def at(cls, mem: GuestMemory, size: int, base_gpa: int, **kw: Any) -> Self:
        """A driver whose rings are laid out by `ring_layout` from `base_gpa`."""
        desc, driver, device, _ = ring_layout(cls.packed, size, base_gpa)
        return cls(mem, size, desc, driver, device, **kw)

    # -- the interface ---------------------------------------------------------

    @abc.abstractmethod
    def add(self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]], token: object = None,
            *, indirect: bool | None = None) -> int:
        """Stage one buffer: device-readable segments `out` (gpa, len), then
        device-writable segments `in_`. Not visible to the device until
        `publish`. `indirect=None` uses an indirect table when the queue was
        created with `indirect=True` and there is more than one segment (falling
        back to direct descriptors if the pool is full); True forces one
        (`MemoryError` if the pool is full), False forbids one.

        Returns the split head index / packed buffer id. Raises
        `QueueFullError` when the ring has no room now, `ValueError` for a
        buffer that can never be added. `token` comes back from `get_used`.
        """

    @abc.abstractmethod
    def publish(self) -> bool:
        """Make every staged buffer visible to the device, in `add` order.

        Returns True iff the device asked to be notified (the caller must
        kick). Publishing nothing returns False.
        """

    @abc.abstractmethod
    def get_used(self) -> list[tuple[object, int]]:
        """Reap every used buffer visible now, in used order, as
        `(token, written_len)`; frees their descriptors, ids and indirect
        tables. Raises `DeviceProtocolError` on a device bug."""

    @abc.abstractmethod
    def pending_used(self) -> bool:
        """True if `get_used` would return something (reads, never writes)."""

    @abc.abstractmethod
    def enable_interrupts(self, delayed: bool = False) -> bool:
        """Ask for used-buffer notifications again, then re-check.

        Returns True when used buffers are already pending: the caller must
        reap them instead of sleeping. `delayed=True` (with EVENT_IDX) asks for
        the notification only after about 3/4 of the outstanding buffers are
        used (Linux `virtqueue_enable_cb_delayed`); then True means the device
        already passed that point.
        """

    @abc.abstractmethod
    def disable_interrupts(self) -> None:
        """Tell the device used-buffer notifications are not needed (advisory:
        the device may still send some)."""

    @abc.abstractmethod
    def vring_base(self) -> int:
        """The ring position to give the device (vhost-user SET_VRING_BASE)
        while the queue is idle. Raises `RuntimeError` if buffers are staged
        or outstanding."""

    @property
    @abc.abstractmethod
    def num_free(self) -> int:
        """Free descriptors (split) / free slots (packed)."""

    @property
    @abc.abstractmethod
    def outstanding(self) -> int:
        """Buffers added (staged or published) and not yet reaped."""
