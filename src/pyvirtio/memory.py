"""Guest memory: regions, address translation, ring-area windows, counting.

Only this module touches raw buffers. The ring code sees guest memory
through `Area` windows (one per ring area, set up once when a queue starts)
and through `GuestMemory.read`/`translate` for scattered buffers (indirect
tables, payload). Every method of an `Area` is one access to guest memory;
`CountingMemory` counts them.

Ring fields are read and written as one aligned load or store of their
natural size through `memoryview.cast` views (CPython copies a cast item
with a fixed-size memcpy, which compiles to one instruction), so a 2-, 4- or
8-byte field never tears. Bulk slices are plain memcpy and are used only for
data that a barrier already ordered.
"""

from __future__ import annotations

import bisect
import enum
import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

import numpy as np

from pyvirtio import fence as _fence

_T = TypeVar("_T")

# mypyc reads this decorator (the other engine modules and the loop import
# it from here); pure Python runs without mypy_extensions installed
try:
    from mypy_extensions import mypyc_attr
except ImportError:  # pragma: no cover
    def mypyc_attr(*args: object, **kwargs: object) -> Callable[[_T], _T]:  # type: ignore[misc]
        return lambda cls: cls

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("pyvirtio's ring code assumes a little-endian host")

def _load_ring_c() -> Any:
    if os.environ.get("PYVIRTIO_PURE", "") not in ("", "0"):
        return None
    try:
        from pyvirtio import _ringscan  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    return _ringscan


#: the rings' batch scans in C (pyvirtio/_ringscan.c), with the compiled
#: engine only: PYVIRTIO_PURE=1 or a build without it keep the numpy scans.
#: (Module constants are `Final` throughout the engine: compiled code reads
#: them from C statics instead of looking them up in the module's dict.)
_ring_c: Final[Any] = _load_ring_c()
#: whether the C batch forms of `Area` (gather_split, put_used, packed_*) are available
HAVE_RING_SCAN: Final = _ring_c is not None
#: copy one payload into every buffer of a batch (`Bulk.fill`), or None
ring_fill: Final[Callable[[memoryview, np.ndarray, int, np.ndarray, bytes], None] | None] = (
    _ring_c.fill if _ring_c is not None else None)
#: the same with the batch given as its descriptor records (`Bulk.recs`), or None
ring_fill_records: Final[Callable[[memoryview, bytearray, int, bytes], None] | None] = (
    _ring_c.fill_records if _ring_c is not None else None)
#: one frame into each buffer of a batch (`Bulk.scatter`), or None
ring_scatter: Final[Callable[[memoryview, np.ndarray, int, np.ndarray, np.ndarray, Sequence[bytes], int, bytes],
                       tuple[int, int, int] | None] | None] = _ring_c.scatter if _ring_c is not None else None
#: copies of a batch's readable buffers (`Bulk.frames`), or None
ring_gather: Final[Callable[[memoryview, np.ndarray, int, np.ndarray, np.ndarray, int, int],
                      tuple[list[bytes], int]] | None] = _ring_c.gather if _ring_c is not None else None
#: one batch's readable buffers straight into another's writable ones (`Bulk.forward_into`), or None
ring_forward: Final[Callable[..., tuple[int, int, int] | None] | None] = _ring_c.forward if _ring_c is not None else None
#: the same with both batches given as their descriptor records (`Bulk.recs`), or None
ring_forward_records: Final[Callable[..., tuple[int, int, int] | None] | None] = (
    _ring_c.forward_records if _ring_c is not None else None)
#: a long indirect table as a `struct iovec[]` (`build_iov_chain`), or None
ring_iov_table: Final[Callable[[bytes, int, int, int, int], tuple[bytes, int, int] | None] | None] = (
    _ring_c.iov_table if _ring_c is not None else None)

U64_MAX: Final = (1 << 64) - 1
_full_fence: Final = _fence.full
_U64: Final = np.dtype(np.uint64)
_U16: Final = np.dtype(np.uint16)
SPLIT_DESC_SIZE: Final = 16


class GuestMemoryError(Exception):
    """An address or length that guest memory does not cover."""

    def __init__(self, message: str, addr: int = 0, length: int = 0) -> None:
        super().__init__(message)
        self.addr = addr
        self.length = length


class AreaKind(enum.Enum):
    """Which part of the virtio layout an access touched (for counting)."""

    DESC = "desc"          # split descriptor table / packed descriptor ring
    AVAIL = "avail"        # split available ring (Driver Area)
    USED = "used"          # split used ring (Device Area)
    EVENT = "event"        # used_event / avail_event / packed event structures
    INDIRECT = "indirect"  # indirect descriptor tables
    PAYLOAD = "payload"    # buffer contents

    # Members are equal only to themselves: hash them by identity, in C
    # (Enum's own __hash__ is Python code, run on every counted access).
    __hash__ = object.__hash__


@mypyc_attr(allow_interpreted_subclasses=True)
class Area:
    """A window onto one ring area of guest memory.

    Offsets are relative to the start of the area. Every method is one access;
    2/4/8-byte loads and stores are single aligned operations. Callers ensure
    offsets are in range (ring code computes them from validated indices).
    """

    __slots__ = ("_h", "_i", "_np", "_q", "gpa", "kind", "mv", "size")

    def __init__(self, kind: AreaKind, gpa: int, mv: memoryview) -> None:
        self.kind = kind
        self.gpa = gpa
        self.size = len(mv)
        self.mv = mv
        n = len(mv)
        # Cast views cover the area rounded down to each item size; the ring
        # code only uses a view whose alignment the area's start guarantees.
        self._h = mv[: n & ~1].cast("H")
        self._i = mv[: n & ~3].cast("I")
        self._q = mv[: n & ~7].cast("Q")
        self._np: dict[int, np.ndarray] = {}

    def load16(self, off: int) -> int:
        return self._h[off >> 1]

    def store16(self, off: int, value: int) -> None:
        self._h[off >> 1] = value

    def load32(self, off: int) -> int:
        return self._i[off >> 2]

    def store32(self, off: int, value: int) -> None:
        self._i[off >> 2] = value

    def load64(self, off: int) -> int:
        return self._q[off >> 3]

    def store64(self, off: int, value: int) -> None:
        self._q[off >> 3] = value

    def load16s(self, off: int, count: int) -> list[int]:
        """`count` consecutive u16 (one bulk read)."""
        base = off >> 1
        return self._h[base : base + count].tolist()

    def unpack(self, st: struct.Struct, off: int) -> tuple[int, ...]:
        """One snapshot read of a record (e.g. a 16-byte descriptor)."""
        return st.unpack_from(self.mv, off)

    def unpack_many(self, st: struct.Struct, offsets: list[int]) -> list[tuple[int, ...]]:
        """One snapshot read of a record at each offset (len(offsets) accesses)."""
        unpack, mv = st.unpack_from, self.mv
        return [unpack(mv, off) for off in offsets]

    # numpy batch forms: the same accesses, without a Python loop per element

    def _table(self, dtype: np.dtype) -> np.ndarray:
        # keyed by identity: the dtypes used are module constants or numpy's
        # builtin singletons, and hashing a dtype is slow
        t = self._np.get(id(dtype))
        if t is None:
            t = self._np[id(dtype)] = np.frombuffer(self.mv, dtype, self.size // dtype.itemsize)
        return t

    def np_load16s(self, off: int, count: int) -> np.ndarray:
        """`count` consecutive u16 as an array (one bulk read)."""
        return np.frombuffer(self.mv, np.uint16, count, off).copy()

    def np_gather(self, dtype: np.dtype, index: np.ndarray) -> np.ndarray:
        """Copy record `i` of a table of `dtype` for each i in `index`
        (one read per record)."""
        return self._table(dtype)[index]

    def put_used(self, start: int, q: int, ids: np.ndarray | bytearray, written: int | np.ndarray) -> None:
        """Write len(ids) used elements (id, written) from slot `start` of this
        used ring, wrapping at q (one bulk write, two when they wrap; as
        `np_write`). `ids` u16 (an array, or the bytes of one), `written` an
        int or one u32 each. Needs HAVE_RING_SCAN."""
        _ring_c.split_used(self.mv, start, q, ids, written)

    def gather_split(self, desc: Area, start: int, n: int, q: int, heads: np.ndarray | bytearray,
                     descs: np.ndarray | bytearray) -> tuple[int, int, int, int, int, int, int, int]:
        """This avail ring's `n` heads from slot `start` (one bulk read, two
        when they wrap, into `heads`) and, when every head is below `q`, each head's descriptor
        from `desc` (one read each, into `descs`): returns (-1, OR of the
        flags, lowest addr, highest addr + len, lowest len, highest len, sum
        of lens, AND of the flags), or (index of the first head >= q, 0, ...)
        having read no descriptor. Needs HAVE_RING_SCAN."""
        r: tuple[int, int, int, int, int, int, int, int] = _ring_c.split_gather(self.mv, desc.mv, start, n, q,
                                                                                  heads, descs)
        return r

    def count_reads(self, reads: int, nbytes: int) -> None:
        """Account for reads made outside this area's methods (none here)."""

    # the packed ring's batch forms in C (pyvirtio/_ringscan.c); need HAVE_RING_SCAN

    def packed_scan(self, slot: int, want: int, q: int, limit: int, budget: int, chunk: int, lists: int,
                    count_lists: bool, out: np.ndarray | memoryview) -> tuple[int, int, int, int]:
        """The flags of the slots after a probed one, read as
        `PackedRing._scan_vector` reads them (2 bytes a slot, the same slots):
        (run length, slots read, OR of the run's flags, AND of them)."""
        r: tuple[int, int, int, int] = _ring_c.packed_scan(self.mv, slot, want, q, limit, budget, chunk, lists,
                                                           count_lists, out)
        return r

    def packed_bodies(self, start: int, n: int, q: int, out: np.ndarray | bytearray,
                      flags: np.ndarray | memoryview) -> tuple[int, int, int, int, int]:
        """The n descriptors from slot `start`, wrapping (one bulk read, two
        when they wrap), each record's flags replaced by `flags[i]` (the
        scan's snapshot): (lowest addr, highest addr + len, lowest len,
        highest len, sum of lens)."""
        r: tuple[int, int, int, int, int] = _ring_c.packed_bodies(self.mv, start, n, q, out, flags)
        return r

    def packed_used(self, u: int, q: int, wrap: bool, recs: bytearray, written: int | np.ndarray) -> int:
        """Store the used descriptors of one batch (`recs`: its 16-byte
        descriptor records) from slot `u` but the first (one 8-byte store
        each); returns the first's value."""
        head: int = _ring_c.packed_used(self.mv, u, q, wrap, recs, written)
        return head

    def np_scatter64(self, word_index: np.ndarray, values: np.ndarray) -> None:
        """Store u64 `values[k]` at 8-byte word `word_index[k]`, one aligned
        8-byte store each, in order."""
        self._table(_U64)[word_index] = values

    def np_load16_strided(self, first: int, step: int, count: int) -> np.ndarray:
        """u16 words first, first+step, ... (`count` 2-byte reads), as a copy."""
        return self._table(_U16)[first : first + step * count : step].copy()

    def np_store64_strided(self, first: int, step: int, values: np.ndarray) -> None:
        """Store `values` at u64 words first, first+step, ... (one aligned
        8-byte store each, in order)."""
        self._table(_U64)[first : first + step * len(values) : step] = values

    def np_write(self, off: int, arr: np.ndarray) -> None:
        """Write an array at `off`, which must be aligned to its item size
        (one bulk write)."""
        i = off // arr.itemsize
        self._table(arr.dtype)[i : i + len(arr)] = arr

    def read(self, off: int, length: int) -> bytes:
        return bytes(self.mv[off : off + length])

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self.mv[off : off + len(data)] = data

    def release(self) -> None:
        self._np.clear()
        for v in (self._q, self._i, self._h, self.mv):
            v.release()


class Region:
    """One contiguous piece of guest memory.

    `gpa` is its guest-physical base, `uva` the frontend's virtual address of
    the same bytes (vhost-user ring addresses are frontend virtual
    addresses). `mv` is exactly `size` bytes of host memory.
    """

    __slots__ = ("_host", "_mmap", "gpa", "mv", "size", "uva")

    def __init__(self, gpa: int, size: int, uva: int, mv: memoryview, _mmap: mmap.mmap | None = None,
                 _host: int = -1) -> None:
        self.gpa = gpa
        self.size = size
        self.uva = uva
        self.mv = mv
        self._mmap = _mmap
        self._host = _host

    @property
    def host_addr(self) -> int:
        """This process's address of the region's first byte (for iovecs
        handed to the kernel; valid while a view of `mv` is alive)."""
        if self._host < 0:
            a = np.frombuffer(self.mv, np.uint8)
            self._host = a.ctypes.data
            del a
        return self._host

    @classmethod
    def from_fd(cls, fd: int, gpa: int, size: int, uva: int = 0, mmap_offset: int = 0) -> Region:
        """Map `size` bytes of `fd` starting at `mmap_offset` (shared).

        Refuses a region that reaches past the end of the file: touching such
        a page would kill the process with SIGBUS.
        """
        if size <= 0:
            raise GuestMemoryError(f"region size {size} is not positive", gpa, size)
        if gpa + size - 1 > U64_MAX or uva + size - 1 > U64_MAX or mmap_offset < 0:
            raise GuestMemoryError("region wraps the 64-bit address space", gpa, size)
        file_size = os.fstat(fd).st_size
        if mmap_offset + size > file_size:
            raise GuestMemoryError(
                f"region of {size:#x} bytes at file offset {mmap_offset:#x} "
                f"reaches past the end of its file ({file_size:#x} bytes)", gpa, size)
        page = mmap.ALLOCATIONGRANULARITY
        start = mmap_offset - mmap_offset % page
        m = mmap.mmap(fd, size + (mmap_offset - start), flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        mv = memoryview(m)[mmap_offset - start : mmap_offset - start + size]
        return cls(gpa, size, uva, mv, m)

    @classmethod
    def from_buffer(cls, buf: bytearray | memoryview | mmap.mmap, gpa: int, uva: int | None = None) -> Region:
        mv = memoryview(buf).cast("B")
        if mv.readonly:
            raise GuestMemoryError("guest memory buffer is read-only", gpa, len(mv))
        return cls(gpa, len(mv), gpa if uva is None else uva, mv)

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    def close(self) -> None:
        try:
            self.mv.release()
        except BufferError:  # a view derived from it is still alive; mmap GC closes it
            return
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass


@mypyc_attr(allow_interpreted_subclasses=True)
class GuestMemory:
    """A set of non-overlapping regions with address translation."""

    def __init__(self, regions: Iterable[Region] = ()) -> None:
        self._regions: list[Region] = []
        self._starts: list[int] = []
        for r in regions:
            self.add(r)

    # -- construction ---------------------------------------------------------

    @classmethod
    def anonymous(cls, size: int, gpa: int = 0, shared_fd: bool = True) -> GuestMemory:
        """One region of fresh zeroed memory, memfd-backed so that another
        process can map it (see `fd`)."""
        if shared_fd:
            fd = os.memfd_create("pyvirtio-guest", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                region = Region.from_fd(fd, gpa, size, gpa)
            finally:
                os.close(fd)
        else:
            region = Region.from_buffer(mmap.mmap(-1, size), gpa)
        return cls([region])

    def add(self, region: Region) -> None:
        for r in self._regions:
            if region.gpa < r.gpa_end and r.gpa < region.gpa_end:
                raise GuestMemoryError(
                    f"region [{region.gpa:#x}, {region.gpa_end:#x}) overlaps "
                    f"[{r.gpa:#x}, {r.gpa_end:#x})", region.gpa, region.size)
            if region.uva < r.uva + r.size and r.uva < region.uva + region.size:
                raise GuestMemoryError("region's frontend addresses overlap another region's",
                                       region.uva, region.size)
        i = bisect.bisect(self._starts, region.gpa)
        self._regions.insert(i, region)
        self._starts.insert(i, region.gpa)

    def remove(self, gpa: int, size: int) -> Region:
        for i, r in enumerate(self._regions):
            if r.gpa == gpa and r.size == size:
                del self._regions[i]
                del self._starts[i]
                return r
        raise GuestMemoryError(f"no region [{gpa:#x}, {gpa + size:#x}) to remove", gpa, size)

    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    def close(self) -> None:
        for r in self._regions:
            r.close()
        self._regions.clear()
        self._starts.clear()

    # -- translation ------------------------------------------------------------

    def region_at(self, gpa: int) -> Region | None:
        """The region containing `gpa`, or None."""
        return self._region(gpa)

    def _region(self, gpa: int) -> Region | None:
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            if gpa < r.gpa + r.size:
                return r
        return None

    def translate(self, gpa: int, length: int) -> list[memoryview]:
        """Zero-copy views covering [gpa, gpa+length); several when the
        buffer spans adjacent regions. No guest memory is accessed."""
        if length == 0:
            return []
        if length < 0 or gpa < 0 or gpa + length - 1 > U64_MAX:
            raise GuestMemoryError(f"buffer {gpa:#x}+{length:#x} wraps the address space", gpa, length)
        views = []
        addr, left = gpa, length
        while left:
            r = self._region(addr)
            if r is None:
                raise GuestMemoryError(
                    f"guest address {addr:#x} (buffer {gpa:#x}+{length:#x}) is not in guest memory",
                    gpa, length)
            off = addr - r.gpa
            n = min(left, r.size - off)
            views.append(r.mv[off : off + n])
            addr += n
            left -= n
        return views

    def view(self, gpa: int, length: int) -> memoryview:
        """One contiguous view; error if the range is unmapped or spans regions."""
        r = self._region(gpa)
        if r is None or length < 0 or gpa + length > r.gpa + r.size:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not in one memory region",
                                   gpa, length)
        off = gpa - r.gpa
        return r.mv[off : off + length]

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Translate a frontend virtual address (vhost-user ring addresses)."""
        for r in self._regions:
            if r.uva <= uva and uva + length <= r.uva + r.size:
                return r.gpa + (uva - r.uva)
        raise GuestMemoryError(f"frontend address {uva:#x}+{length:#x} is not in one memory region",
                               uva, length)

    # -- accesses ----------------------------------------------------------------

    def area(self, kind: AreaKind, gpa: int, size: int, align: int = 1) -> Area:
        """A window for one ring area; it must lie in one region and be aligned."""
        if align > 1 and gpa % align:
            raise GuestMemoryError(f"{kind.value} area at {gpa:#x} is not {align}-byte aligned", gpa, size)
        return Area(kind, gpa, self.view(gpa, size))

    def read(self, gpa: int, length: int, kind: AreaKind = AreaKind.PAYLOAD) -> bytes:
        """Copy guest bytes into host memory (one access per region touched)."""
        views = self.translate(gpa, length)
        if len(views) == 1:
            return bytes(views[0])
        return b"".join(views)

    def write(self, gpa: int, data: bytes | bytearray | memoryview, kind: AreaKind = AreaKind.PAYLOAD) -> None:
        pos = 0
        for v in self.translate(gpa, len(data)):
            v[:] = data[pos : pos + len(v)]
            pos += len(v)

    def fence(self) -> None:
        """Full (StoreLoad) memory barrier."""
        _full_fence()


# -- access counting ---------------------------------------------------------------


class AccessCounter:
    """Counts of accesses to one area kind."""

    __slots__ = ("bytes_read", "bytes_written", "reads", "writes")

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0
        self.bytes_read = 0
        self.bytes_written = 0

    def as_dict(self) -> dict[str, int]:
        return {"reads": self.reads, "writes": self.writes,
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written}


@mypyc_attr(allow_interpreted_subclasses=True)
class CountingArea(Area):
    """An `Area` that counts each call as one access."""

    __slots__ = ("c",)

    def __init__(self, kind: AreaKind, gpa: int, mv: memoryview, counter: AccessCounter) -> None:
        super().__init__(kind, gpa, mv)
        self.c = counter

    def load16(self, off: int) -> int:
        c = self.c
        c.reads += 1
        c.bytes_read += 2
        return self._h[off >> 1]

    def store16(self, off: int, value: int) -> None:
        c = self.c
        c.writes += 1
        c.bytes_written += 2
        self._h[off >> 1] = value

    def load32(self, off: int) -> int:
        c = self.c
        c.reads += 1
        c.bytes_read += 4
        return self._i[off >> 2]

    def store32(self, off: int, value: int) -> None:
        c = self.c
        c.writes += 1
        c.bytes_written += 4
        self._i[off >> 2] = value

    def load64(self, off: int) -> int:
        c = self.c
        c.reads += 1
        c.bytes_read += 8
        return self._q[off >> 3]

    def store64(self, off: int, value: int) -> None:
        c = self.c
        c.writes += 1
        c.bytes_written += 8
        self._q[off >> 3] = value

    def load16s(self, off: int, count: int) -> list[int]:
        c = self.c
        c.reads += 1
        c.bytes_read += 2 * count
        base = off >> 1
        return self._h[base : base + count].tolist()

    def unpack(self, st: struct.Struct, off: int) -> tuple[int, ...]:
        c = self.c
        c.reads += 1
        c.bytes_read += st.size
        return st.unpack_from(self.mv, off)

    def unpack_many(self, st: struct.Struct, offsets: list[int]) -> list[tuple[int, ...]]:
        c = self.c
        c.reads += len(offsets)
        c.bytes_read += st.size * len(offsets)
        unpack, mv = st.unpack_from, self.mv
        return [unpack(mv, off) for off in offsets]

    def np_load16s(self, off: int, count: int) -> np.ndarray:
        c = self.c
        c.reads += 1
        c.bytes_read += 2 * count
        return np.frombuffer(self.mv, np.uint16, count, off).copy()

    def np_gather(self, dtype: np.dtype, index: np.ndarray) -> np.ndarray:
        c = self.c
        c.reads += len(index)
        c.bytes_read += dtype.itemsize * len(index)
        return self._table(dtype)[index]

    def put_used(self, start: int, q: int, ids: np.ndarray | bytearray, written: int | np.ndarray) -> None:
        super().put_used(start, q, ids, written)
        n = len(ids) if not isinstance(ids, bytearray) else len(ids) >> 1
        c = self.c
        c.writes += 1 if start + n <= q else 2
        c.bytes_written += 8 * n

    def gather_split(self, desc: Area, start: int, n: int, q: int, heads: np.ndarray | bytearray,
                     descs: np.ndarray | bytearray) -> tuple[int, int, int, int, int, int, int, int]:
        r = super().gather_split(desc, start, n, q, heads, descs)
        c = self.c
        c.reads += 1 if start + n <= q else 2  # as the numpy scan: one bulk read, two when it wraps
        c.bytes_read += 2 * n
        if r[0] < 0:
            desc.count_reads(n, SPLIT_DESC_SIZE * n)
        return r

    def count_reads(self, reads: int, nbytes: int) -> None:
        c = self.c
        c.reads += reads
        c.bytes_read += nbytes

    def packed_scan(self, slot: int, want: int, q: int, limit: int, budget: int, chunk: int, lists: int,
                    count_lists: bool, out: np.ndarray | memoryview) -> tuple[int, int, int, int]:
        r = super().packed_scan(slot, want, q, limit, budget, chunk, lists, count_lists, out)
        c = self.c
        c.reads += r[1]
        c.bytes_read += 2 * r[1]
        return r

    def packed_bodies(self, start: int, n: int, q: int, out: np.ndarray | bytearray,
                      flags: np.ndarray | memoryview) -> tuple[int, int, int, int, int]:
        r = super().packed_bodies(start, n, q, out, flags)
        c = self.c
        c.reads += 1 if start + n <= q else 2
        c.bytes_read += 16 * n
        return r

    def packed_used(self, u: int, q: int, wrap: bool, recs: bytearray, written: int | np.ndarray) -> int:
        head = super().packed_used(u, q, wrap, recs, written)
        stores = len(recs) // 16 - 1
        c = self.c
        c.writes += stores
        c.bytes_written += 8 * stores
        return head

    def np_scatter64(self, word_index: np.ndarray, values: np.ndarray) -> None:
        c = self.c
        c.writes += len(word_index)
        c.bytes_written += 8 * len(word_index)
        self._table(_U64)[word_index] = values

    def np_load16_strided(self, first: int, step: int, count: int) -> np.ndarray:
        c = self.c
        c.reads += count
        c.bytes_read += 2 * count
        return self._table(_U16)[first : first + step * count : step].copy()

    def np_store64_strided(self, first: int, step: int, values: np.ndarray) -> None:
        c = self.c
        c.writes += len(values)
        c.bytes_written += 8 * len(values)
        self._table(_U64)[first : first + step * len(values) : step] = values

    def np_write(self, off: int, arr: np.ndarray) -> None:
        c = self.c
        c.writes += 1
        c.bytes_written += arr.nbytes
        i = off // arr.itemsize
        self._table(arr.dtype)[i : i + len(arr)] = arr

    def read(self, off: int, length: int) -> bytes:
        c = self.c
        c.reads += 1
        c.bytes_read += length
        return bytes(self.mv[off : off + length])

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        c = self.c
        c.writes += 1
        c.bytes_written += len(data)
        self.mv[off : off + len(data)] = data


@mypyc_attr(allow_interpreted_subclasses=True)
class CountingMemory(GuestMemory):
    """A view of another `GuestMemory` that counts every access.

    Shares the wrapped memory's regions (no copy). Counts: calls that read or
    write guest memory (one call = one access whatever its size), bytes moved,
    per `AreaKind`, and full fences.
    """

    def __init__(self, inner: GuestMemory) -> None:
        # share the region list so later add/remove on either side is seen
        self._regions = inner._regions
        self._starts = inner._starts
        self.inner = inner
        self.counters = {k: AccessCounter() for k in AreaKind}
        self.fences = 0

    def area(self, kind: AreaKind, gpa: int, size: int, align: int = 1) -> Area:
        if align > 1 and gpa % align:
            raise GuestMemoryError(f"{kind.value} area at {gpa:#x} is not {align}-byte aligned", gpa, size)
        return CountingArea(kind, gpa, self.view(gpa, size), self.counters[kind])

    def read(self, gpa: int, length: int, kind: AreaKind = AreaKind.PAYLOAD) -> bytes:
        views = self.translate(gpa, length)
        c = self.counters[kind]
        c.reads += len(views)
        c.bytes_read += length
        return views[0].tobytes() if len(views) == 1 else b"".join(views)

    def write(self, gpa: int, data: bytes | bytearray | memoryview, kind: AreaKind = AreaKind.PAYLOAD) -> None:
        views = self.translate(gpa, len(data))
        c = self.counters[kind]
        c.writes += len(views)
        c.bytes_written += len(data)
        pos = 0
        for v in views:
            v[:] = data[pos : pos + len(v)]
            pos += len(v)

    def fence(self) -> None:
        self.fences += 1
        _full_fence()

    def reset_counts(self) -> None:
        for c in self.counters.values():
            c.reads = c.writes = c.bytes_read = c.bytes_written = 0
        self.fences = 0

    def snapshot(self) -> dict[str, object]:
        """Totals and per-area counts; `metadata_*` exclude payload."""
        meta = [c for k, c in self.counters.items() if k is not AreaKind.PAYLOAD]
        return {
            "reads": sum(c.reads for c in self.counters.values()),
            "writes": sum(c.writes for c in self.counters.values()),
            "metadata_reads": sum(c.reads for c in meta),
            "metadata_writes": sum(c.writes for c in meta),
            "metadata_bytes_read": sum(c.bytes_read for c in meta),
            "metadata_bytes_written": sum(c.bytes_written for c in meta),
            "fences": self.fences,
            "areas": {k.value: c.as_dict() for k, c in self.counters.items()},
        }
