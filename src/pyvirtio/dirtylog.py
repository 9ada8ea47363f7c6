"""The dirty log of live migration: which guest pages the device wrote.

While a front-end migrates the VM it copies guest memory in rounds and must
learn of every page that changed behind its back. The vCPUs' writes it
tracks itself; the back-end's writes (used rings, packed descriptors, every
byte a device puts into a device-writable buffer) it learns from a shared
bitmap: one bit per 4 KiB guest-physical page (`VHOST_LOG_PAGE`), bit
`n % 8` of byte `n // 8` for page `n`. The front-end hands the bitmap over
with SET_LOG_BASE (an fd, a size and an offset) and turns logging on with
the `VHOST_F_LOG_ALL` feature; it reads and clears the bitmap with atomic
exchanges while we set bits, so a bit is set with an atomic OR, after the
write it stands for.

Where the marks come from: `Virtqueue` calls `mark_publish` after every
used-ring publication (each completed chain's device-writable buffers, all
of them, whatever length the device reported, and the ring area the device
writes) and `mark_ranges` after every write of its event fields. Nothing
else in a device writes guest memory outside a chain it then completes.
When logging is off the queue holds no log and pays one `is None` test per
publication.

A bitmap being replaced (the front-end resizes it when guest memory grows)
is `retire`d: a mark that raced with the replacement lands in the new one,
never in a bitmap the front-end already read for the last time.

`PYVIRTIO_TEST_SKIP_DIRTY_LOG=1` (tests only) makes every mark a no-op while
logging is still offered and accepted: the migration tests use it to show
that they catch a back-end that does not log.

`PYVIRTIO_TEST_DIRTY_TRACE=1` (tests only) also keeps, for the whole
process, every page a mark covered (with the skip switch too: the pages
it would have marked). The back-end's stats then list them
(`written_ranges`), so a migration test that finds a page differing after
the move can tell a page this back-end wrote (its fault: logged too late
or not at all) from one it never touched (the vCPUs' writes, which QEMU
tracks itself).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pyvirtio.memory import GuestMemory

log = logging.getLogger(__name__)

#: bytes per bit of the log (VHOST_LOG_PAGE)
LOG_PAGE = 0x1000
PAGE_SHIFT = 12

SKIP_ENV = "PYVIRTIO_TEST_SKIP_DIRTY_LOG"
TRACE_ENV = "PYVIRTIO_TEST_DIRTY_TRACE"

try:
    from pyvirtio._fence import address as _address  # type: ignore[import-not-found,unused-ignore]
    from pyvirtio._fence import log_mark as _log_mark  # type: ignore[import-not-found,unused-ignore]
    ATOMIC = True
except ImportError:  # pragma: no cover - exercised only without a C compiler
    ATOMIC = False
    _fallback_lock = threading.Lock()

    def _address(buf: Any) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))

    def _log_mark(bits: memoryview, first: int, last: int) -> None:
        # Without the C extension: a read-modify-write under one process-wide
        # lock. Our own writers cannot lose each other's bits; the front-end
        # only clears bits, and a clear racing with this store at worst
        # leaves a page marked again (sent once more), never unmarked.
        if first < 0 or first > last or last >= len(bits) * 8:
            raise IndexError(f"pages {first}..{last} are outside a log of {len(bits) * 8} pages")
        with _fallback_lock:
            page = first
            while page <= last:
                byte = page >> 3
                top = (byte << 3) + 7
                hi = min(last, top) & 7
                lo = page & 7
                bits[byte] |= ((1 << (hi - lo + 1)) - 1) << lo
                page = top + 1


def _gpa_of(view: memoryview, hosts: list[tuple[int, int, int]]) -> int:
    """The guest address of a view of guest memory, from (host start, host
    end, gpa) per region; a large negative number (counted as outside the
    log) if it is not guest memory."""
    h = _address(view)
    for start, end, gpa in hosts:
        if start <= h < end:
            return gpa + (h - start)
    return -(1 << 62)


def skip_requested() -> bool:
    return os.environ.get(SKIP_ENV, "") not in ("", "0")


#: every page a mark covered in this process (TRACE_ENV), else None
_trace: set[int] | None = set() if os.environ.get(TRACE_ENV, "") not in ("", "0") else None


def traced_ranges() -> list[tuple[int, int]] | None:
    """The pages marks covered so far, as sorted (first, last) page runs;
    None unless TRACE_ENV is set."""
    if _trace is None:
        return None
    out: list[tuple[int, int]] = []
    for page in sorted(_trace):
        if out and out[-1][1] == page - 1:
            out[-1] = (out[-1][0], page)
        else:
            out.append((page, page))
    return out


class DirtyLog:
    """One dirty bitmap of `size` bytes (covering `size * 8` pages).

    `buf` is the bitmap (a writable buffer: the front-end's shared mapping,
    or any bytearray in tests). `mem` translates the host addresses of views
    of guest memory back to guest-physical addresses. Thread-safe: every
    queue thread marks it concurrently.
    """

    def __init__(self, buf: Any, mem: GuestMemory, *, mapping: mmap.mmap | None = None,
                 skip: bool | None = None) -> None:
        self.bits = memoryview(buf).cast("B")
        if self.bits.readonly:
            raise ValueError("the dirty log must be writable")
        self.size = len(self.bits)
        self.pages = self.size * 8
        self.mem = mem
        self._mapping = mapping
        self.skip = skip_requested() if skip is None else skip
        self._lock = threading.Lock()
        self._retired = False
        self._successor: DirtyLog | None = None
        #: counters: ranges marked, pages covered, marks outside the bitmap or guest memory
        self.marks = 0
        self.pages_marked = 0
        self.out_of_range = 0

    @classmethod
    def map_fd(cls, fd: int, size: int, offset: int, mem: GuestMemory, *, skip: bool | None = None) -> DirtyLog:
        """Map `size` bytes of `fd` from `offset` (SET_LOG_BASE), shared."""
        if size <= 0:
            raise ValueError(f"log size {size} is not positive")
        file_size = os.fstat(fd).st_size
        if offset + size > file_size:
            raise ValueError(f"log of {size:#x} bytes at offset {offset:#x} reaches past the end of its "
                             f"file ({file_size:#x} bytes)")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(fd, size + offset - start, flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        return cls(memoryview(m)[offset - start: offset - start + size], mem, mapping=m, skip=skip)

    # -- marking ------------------------------------------------------------------

    def _target(self) -> DirtyLog:
        d = self
        while d._retired and d._successor is not None:
            d = d._successor
        return d

    def mark(self, gpa: int, length: int) -> None:
        """Mark the pages of [gpa, gpa + length)."""
        if length > 0:
            self.mark_ranges(((gpa, length),))

    def mark_ranges(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Mark the pages of each (gpa, length) range."""
        with self._lock:
            if self._retired:
                target = self._target()
                if target is self:
                    return
            else:
                self._mark_locked(ranges)
                return
        target.mark_ranges(ranges)

    def _mark_locked(self, ranges: Iterable[tuple[int, int]]) -> None:
        if _trace is not None:
            ranges = list(ranges)
            for gpa, length in ranges:
                if length > 0:
                    _trace.update(range(gpa >> PAGE_SHIFT, ((gpa + length - 1) >> PAGE_SHIFT) + 1))
        if self.skip:
            return
        bits, pages = self.bits, self.pages
        for gpa, length in ranges:
            if length <= 0:
                continue
            first = gpa >> PAGE_SHIFT
            last = (gpa + length - 1) >> PAGE_SHIFT
            if first < 0 or last >= pages:
                self._outside(gpa, length)
                continue
            _log_mark(bits, first, last)
            self.marks += 1
            self.pages_marked += last - first + 1

    def _outside(self, gpa: int, length: int) -> None:
        self.out_of_range += 1
        if self.out_of_range == 1:
            log.error("dirty log: guest range %#x+%#x is outside the %d pages the front-end's log covers; "
                      "that page will not be resent", gpa, length, self.pages)

    def mark_publish(self, items: Sequence[tuple[Any, Any]], ring_ranges: Sequence[tuple[int, int]]) -> None:
        """After a used-ring publication: every device-writable buffer of
        each completed chain (or `Bulk`), then the ring's device-written area."""
        ranges: list[tuple[int, int]] = list(ring_ranges)
        hosts: list[tuple[int, int, int]] | None = None  # per call: a new memory table may reuse addresses
        for chain, _written in items:
            writable = getattr(chain, "writable_len", None)
            if writable is None:  # a Bulk
                w = chain.writable
                if w.any():
                    ranges.extend(zip(chain.addrs[w].tolist(), chain.lens[w].tolist()))
                continue
            if not writable:
                continue
            gpas = getattr(chain, "gpas", None)
            if gpas is not None:  # an IovChain: guest addresses as lists, readable ones first
                nr = chain.nr
                ranges.extend(zip(gpas[nr:], chain.lens[nr:]))
                continue
            segs = chain.segments  # packed chains keep theirs
            if segs:
                ranges.extend((a, n) for a, n, w in segs if w)
                continue
            if hosts is None:
                hosts = [(r.host_addr, r.host_addr + r.size, r.gpa) for r in self.mem.regions]
            for v in chain.writable:
                ranges.append((_gpa_of(v, hosts), len(v)))
        self.mark_ranges(ranges)

    # -- life cycle ---------------------------------------------------------------

    def retire(self, successor: DirtyLog | None) -> None:
        """This bitmap is being replaced: later marks go to `successor`
        (dropped if None). Returns once no mark is writing this bitmap."""
        with self._lock:
            self._retired = True
            self._successor = successor

    def close(self) -> None:
        """Retire (if not yet) and unmap."""
        self.retire(self._successor)
        try:
            self.bits.release()
            if self._mapping is not None:
                self._mapping.close()
        except BufferError:  # pragma: no cover - a view still alive; GC unmaps it
            pass

    def stats(self) -> dict[str, Any]:
        return {"size": self.size, "marks": self.marks, "pages_marked": self.pages_marked,
                "out_of_range": self.out_of_range, "skip": self.skip}

    def dirty_pages(self) -> np.ndarray:
        """Indices of the pages marked (for tests and tools)."""
        return np.flatnonzero(np.unpackbits(np.frombuffer(self.bits, np.uint8), bitorder="little"))


__all__ = ["ATOMIC", "LOG_PAGE", "SKIP_ENV", "TRACE_ENV", "DirtyLog", "traced_ranges"]
