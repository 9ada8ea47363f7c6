"""A descriptor chain as the device sees it: a snapshot in host memory.

The ring code reads each descriptor once, validates it where it was read,
and builds a `Chain` whose buffers are zero-copy `memoryview`s into guest
memory (several per descriptor if a buffer spans memory regions).
Device code reads `readable` and writes `writable`; it never sees a guest
address again, so a driver that rewrites descriptors after the device read
them (a double-fetch attack) changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from pyvirtio.memory import AccessCounter, GuestMemory, GuestMemoryError
from pyvirtio.queue.errors import BadBufferAddress, ChainTooLarge, ReadableAfterWritable

CHAIN_MAX_BYTES = 1 << 32


class Chain:
    """One available buffer: split descriptor chain or packed descriptor list.

    - `id`: what completes it (split: head index; packed: buffer id)
    - `pos`: where it was taken from (split: avail index; packed: first slot)
    - `slots`: ring slots it occupies (packed; 1 for split)
    - `readable` / `writable`: device-readable and device-writable views
    - `readable_len` / `writable_len`: their total sizes in bytes
    """

    __slots__ = (
        "counter",
        "id",
        "pos",
        "readable",
        "readable_len",
        "segments",
        "slots",
        "writable",
        "writable_len",
    )

    def __init__(self, id: int, pos: int, slots: int, readable: list[memoryview],
                 writable: list[memoryview], readable_len: int, writable_len: int,
                 counter: AccessCounter | None = None) -> None:
        self.id = id
        self.pos = pos
        self.slots = slots
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.counter = counter
        #: packed only: (addr, len, writable) per descriptor, for save()
        self.segments: tuple[tuple[int, int, bool], ...] = ()

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
