"""A descriptor chain as the device sees it: a snapshot in host memory.

The ring code reads each descriptor once, validates it where it was read,
and builds a `Chain` whose buffers are zero-copy `memoryview`s into guest
memory (several per descriptor if a buffer spans memory regions).
Device code reads `readable` and writes `writable`; it never sees a guest
address again, so a driver that rewrites descriptors after the device read
them (a double-fetch attack) changes nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from operator import add as _add
from typing import Final

from pyvirtio.memory import AccessCounter, GuestMemory, GuestMemoryError, ring_iov_table
from pyvirtio.queue.errors import BadBufferAddress, ChainTooLarge, ReadableAfterWritable

CHAIN_MAX_BYTES: Final = 1 << 32
#: indirect tables at least this long are built in array form (`IovChain`):
#: block requests of 128 KiB and more; a network frame (at most ~19 segments)
#: stays a plain chain, which is cheaper to read as views
IOV_MIN_SEGMENTS: Final = 32


class Chain:
    """One available buffer: split descriptor chain or packed descriptor list.

    - `id`: what completes it (split: head index; packed: buffer id)
    - `pos`: where it was taken from (split: avail index; packed: first slot)
    - `slots`: ring slots it occupies (packed; 1 for split)
    - `readable` / `writable`: device-readable and device-writable views
    - `readable_len` / `writable_len`: their total sizes in bytes
    """

    __slots__ = (
        "_readable",
        "_segments",
        "_writable",
        "counter",
        "id",
        "pos",
        "readable_len",
        "slots",
        "writable_len",
    )

    def __init__(self, id: int, pos: int, slots: int, readable: list[memoryview],
                 writable: list[memoryview], readable_len: int, writable_len: int,
                 counter: AccessCounter | None = None) -> None:
        self.id = id
        self.pos = pos
        self.slots = slots
        self._readable: list[memoryview] | None = readable
        self._writable: list[memoryview] | None = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.counter = counter
        #: packed only: (addr, len, writable) per descriptor, for save()
        self._segments: tuple[tuple[int, int, bool], ...] | None = ()

    # Properties, not plain slots, so that an `IovChain` can make its views
    # on first use (a compiled, native class has no `__getattr__` fallback).
    @property
    def readable(self) -> list[memoryview]:
        r = self._readable
        if r is None:
            self._make_views()
            r = self._readable
            assert r is not None
        return r

    @readable.setter
    def readable(self, value: list[memoryview]) -> None:
        self._readable = value

    @property
    def writable(self) -> list[memoryview]:
        w = self._writable
        if w is None:
            self._make_views()
            w = self._writable
            assert w is not None
        return w

    @writable.setter
    def writable(self, value: list[memoryview]) -> None:
        self._writable = value

    @property
    def segments(self) -> tuple[tuple[int, int, bool], ...]:
        s = self._segments
        if s is None:
            s = self._segments = self._make_segments()
        return s

    @segments.setter
    def segments(self, value: tuple[tuple[int, int, bool], ...]) -> None:
        self._segments = value

    def _make_views(self) -> None:  # only an IovChain leaves its views unset
        self._readable = self._readable or []
        self._writable = self._writable or []

    def _make_segments(self) -> tuple[tuple[int, int, bool], ...]:
        return ()

    def __repr__(self) -> str:
        return (f"Chain(id={self.id}, pos={self.pos}, slots={self.slots}, "
                f"readable={self.readable_len}B/{len(self.readable)}, "
                f"writable={self.writable_len}B/{len(self.writable)})")

    def read(self, limit: int | None = None) -> bytes:
        """Copy the device-readable bytes (up to `limit`) out of guest memory."""
        views = self.readable
        c = self.counter
        if c is not None:
            c.reads += len(views)
        if limit is None:
            data = views[0].tobytes() if len(views) == 1 else b"".join(views)
        else:
            parts = []
            left = limit
            for v in views:  # never copy more than `limit` bytes
                if left <= 0:
                    break
                parts.append(v[:left])
                left -= len(parts[-1])
            data = b"".join(parts)
        if c is not None:
            c.bytes_read += len(data)
        return data

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy `data` into the device-writable buffers starting at `offset`;
        returns the number of bytes written (short if the buffers are smaller)."""
        mv = memoryview(data).cast("B")
        done = 0
        skip = offset
        c = self.counter
        for v in self.writable:
            n = len(v)
            if skip >= n:
                skip -= n
                continue
            take = min(n - skip, len(mv) - done)
            if take <= 0:
                break
            v[skip : skip + take] = mv[done : done + take]
            if c is not None:
                c.writes += 1
                c.bytes_written += take
            done += take
            skip = 0
        return done


def build_chain(mem: GuestMemory, chain_id: int, pos: int, slots: int,
                segments: Iterable[tuple[int, int, bool]], counter: AccessCounter | None) -> Chain:
    """Validate and translate (addr, len, writable) segments into a `Chain`.

    Readable segments must precede writable ones, the total must stay below
    2^32 bytes, and every byte must be guest memory. Zero-length segments are
    accepted and skipped without translation.
    """
    # Written for speed (a block request can carry ~128 segments): translate
    # through the last region that matched, the general path only on a miss.
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    rlen = wlen = 0
    seen_write = False
    hot_gpa = hot_end = 0
    hot_mv = None
    for addr, length, is_write in segments:
        if is_write:
            wlen += length
            seen_write = True
        elif seen_write:
            raise ReadableAfterWritable(
                f"chain {chain_id}: device-readable descriptor {addr:#x}+{length} after a writable one")
        else:
            rlen += length
        if not length:
            continue
        if hot_gpa <= addr and addr + length <= hot_end:
            off = addr - hot_gpa
            (writable if is_write else readable).append(hot_mv[off : off + length])  # type: ignore[index]
            continue
        r = mem.region_at(addr)
        if r is not None and addr + length <= r.gpa + r.size:
            hot_gpa, hot_end, hot_mv = r.gpa, r.gpa + r.size, r.mv
            off = addr - hot_gpa
            (writable if is_write else readable).append(hot_mv[off : off + length])
            continue
        try:
            views = mem.translate(addr, length)
        except GuestMemoryError as e:
            raise BadBufferAddress(f"chain {chain_id}: {e}") from None
        (writable if is_write else readable).extend(views)
    if rlen + wlen > CHAIN_MAX_BYTES:
        raise ChainTooLarge(f"chain {chain_id} is {rlen + wlen} bytes long (limit 2^32)")
    return Chain(chain_id, pos, slots, readable, writable, rlen, wlen, counter)


class IovChain(Chain):
    """A chain built in array form (a long indirect table whose buffers all
    lie in one memory region): what a block request of ~128 segments looks like.

    Besides everything a `Chain` offers, `iov` is a `struct iovec[]` as
    bytes: 16 bytes (host address u64, length u64) per segment, readable
    ones first (`nr` of them), ready for preadv(2)/pwritev(2) through ctypes
    (a `c_void_p` argument takes a bytes object as its address); `lens` and
    `gpas` are the lengths and guest addresses as lists. `gpas`, `lens`,
    `readable`, `writable` and `segments` are made on first use (from
    `table`, the snapshot of the indirect table the chain was built from).
    The chain holds a view of the region, so the mapping behind the host
    addresses stays valid while it lives.

    Only the addresses were validated (all inside the region): the device
    must use `iov` entries as they are, never grow a length.
    """

    __slots__ = ("_gpas", "_lens", "_region_gpa", "_region_mv", "host_delta", "iov", "nr", "table")

    def __init__(self, id: int, pos: int, slots: int, table: bytes, iov: bytes,
                 nr: int, readable_len: int, writable_len: int, region_mv: memoryview, region_gpa: int,
                 host_delta: int, counter: AccessCounter | None,
                 gpas: list[int] | None = None, lens: list[int] | None = None) -> None:
        self.id = id
        self.pos = pos
        self.slots = slots
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.counter = counter
        # views and segments are made on first use (Chain.readable and co.)
        self._readable = None
        self._writable = None
        self._segments = None
        self.table = table
        self.iov = iov
        self.nr = nr
        self._gpas = gpas
        self._lens = lens
        #: host address = guest address + host_delta
        self.host_delta = host_delta
        self._region_mv = region_mv
        self._region_gpa = region_gpa

    @property
    def gpas(self) -> list[int]:
        """Each segment's guest address (readable ones first)."""
        g = self._gpas
        if g is None:
            g = self._gpas = memoryview(self.table).cast("Q")[0::2].tolist()
        return g

    @property
    def lens(self) -> list[int]:
        """Each segment's length (readable ones first)."""
        n = self._lens
        if n is None:
            n = self._lens = memoryview(self.table).cast("I")[2::4].tolist()
        return n

    def _make_views(self) -> None:
        mv = self._region_mv
        g = self._region_gpa
        views = [mv[a - g : a - g + n] for a, n in zip(self.gpas, self.lens)]
        nr = self.nr
        self._readable = [v for v in views[:nr] if len(v)]
        self._writable = [v for v in views[nr:] if len(v)]

    def _make_segments(self) -> tuple[tuple[int, int, bool], ...]:
        nr = self.nr
        return tuple((a, n, i >= nr) for i, (a, n) in enumerate(zip(self.gpas, self.lens)))

    def view(self, index: int, start: int = 0, stop: int | None = None) -> memoryview:
        """A view of segment `index` (readable ones first), bytes [start, stop)."""
        a, n = _TABLE_ENTRY.unpack_from(self.table, 16 * index)
        off = a - self._region_gpa
        if stop is None or stop > n:
            stop = n
        return self._region_mv[off + start : off + stop]


#: an indirect table entry's address and length
_TABLE_ENTRY: Final = struct.Struct("<QI")


#: per table length n: (1 in every 16-byte entry, the addr and len fields of every entry set), as integers
_IOV_PATTERNS: dict[int, tuple[int, int]] = {}
MAX_IOV_PATTERN: Final = 1024


_ENTRY_ONE: Final = b"\x01" + bytes(15)
_ENTRY_MASK_BYTES: Final = b"\xff" * 12 + bytes(4)  # addr u64 and len u32 of a 16-byte descriptor


def _iov_patterns(n: int) -> tuple[int, int]:
    pat = (int.from_bytes(_ENTRY_ONE * n, "little"), int.from_bytes(_ENTRY_MASK_BYTES * n, "little"))
    # Bounded: every length up to 256 (<= 4 KiB each), and the first 32
    # longer ones seen (<= 16 KiB each: a virtio-fs 1 MiB READ is 258
    # segments, a block request up to the queue size), about 3 MiB at most.
    if n <= 256 or (n <= MAX_IOV_PATTERN and len(_IOV_PATTERNS) < 256 + 32):
        _IOV_PATTERNS[n] = pat
    return pat


def build_iov_chain(mem: GuestMemory, chain_id: int, pos: int, slots: int, table: bytes, nr: int,
                    counter: AccessCounter | None) -> IovChain | None:
    """`build_chain` for an indirect `table` (16-byte entries: addr u64,
    len u32, 4 more bytes), the first `nr` entries device-readable, the
    rest writable (the caller checked the order and the flags). None when the buffers are not all inside one memory
    region: the caller then builds the chain the general way (which says
    what is wrong, if anything)."""
    # Written for speed when cold (the first request after a sleep): a few
    # builtins over lists, and the iovecs in three big-integer operations
    # (the table as one integer: clear every entry's upper 32 bits, add the
    # host offset to every address; no carry crosses an entry since every
    # address is inside the region).
    r = mem.region_at(int.from_bytes(table[:8], "little"))
    if r is None:
        return None
    g = r.gpa
    delta = r.host_addr - g
    addrs: list[int] | None = None
    lens: list[int] | None = None
    if ring_iov_table is not None:  # the same checks and iovecs in one C pass (pyvirtio/_ringscan.c)
        got = ring_iov_table(table, nr, g, r.size, r.host_addr)
        if got is None:
            return None
        iov, rlen, total = got
    else:
        tv = memoryview(table)
        addrs = tv.cast("Q")[0::2].tolist()
        lens = tv.cast("I")[2::4].tolist()
        end = g + r.size
        if min(addrs) < g or max(addrs) + max(lens) > end and max(map(_add, addrs, lens)) > end:
            return None
        total = sum(lens)
        rlen = sum(lens[:nr])
        n = len(addrs)
        ones, mask = _IOV_PATTERNS.get(n) or _iov_patterns(n)
        t = int.from_bytes(table, "little") & mask
        t = t + delta * ones if delta >= 0 else t - -delta * ones
        iov = t.to_bytes(16 * n, "little")
    if total > CHAIN_MAX_BYTES:
        raise ChainTooLarge(f"chain {chain_id} is {total} bytes long (limit 2^32)")
    return IovChain(chain_id, pos, slots, table, iov, nr, rlen, total - rlen, r.mv[:], g, delta, counter,
                    addrs, lens)
