"""A batch of simple chains as arrays: the vectorised fast path.

Most traffic from a fast driver (DPDK's virtio-user, a guest sending small
packets) is one descriptor per request. For such a run the ring code reads
the same descriptors as the per-chain path (one 16-byte read each; the
counts are identical) but hands them out as numpy arrays instead of one
Python object per request, and publishes their completions with array
stores. A device then does per-batch work (sum the lengths, write the
buffers with `os.writev(fd, bulk.views())`) instead of per-request work.

A `Bulk` is all-or-nothing: `Virtqueue.pop_bulk` returns one only when every
chain of the run is a single descriptor inside one memory region; anything
else comes back as ordinary `Chain`s, in ring order.
"""

from __future__ import annotations

import numpy as np

from pyvirtio.memory import ring_fill
from pyvirtio.queue.chain import Chain

WRITE_FLAG = 0x2  # VIRTQ_DESC_F_WRITE, the same bit in both formats

#: a split or packed descriptor as a numpy record (both are 16 bytes; the
#: last two fields are flags/next for split and id/flags for packed)
SPLIT_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
PACKED_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])


class Bulk:
    """`n` single-descriptor chains taken together.

    - `ids`: what completes each (split head / packed buffer id), uint32
    - `pos`: ring position each came from (split avail index / packed slot)
    - `addrs`, `lens`: guest address and length of each buffer
    - `writable`: bool per buffer (device-writable)
    - all buffers lie in one memory region, `region_gpa`/`region_mv`
    """

    __slots__ = ("_len_summary", "_pos0", "_ring", "addrs", "flags", "ids", "lens", "n", "region_gpa", "region_mv")

    def __init__(self, ids: np.ndarray, pos0: int, ring: int, addrs: np.ndarray, lens: np.ndarray,
                 flags: np.ndarray, region_gpa: int, region_mv: memoryview,
                 len_summary: tuple[int, int, int] | None = None) -> None:
        self.ids = ids
        self._pos0 = pos0
        self._ring = ring  # positions wrap here (2^16 for split indices, Q for packed slots)
        self.addrs = addrs
        self.lens = lens
        self.flags = flags
        self.region_gpa = region_gpa
        self.region_mv = region_mv
        self.n = len(ids)
        self._len_summary = len_summary

    # computed on demand: the hot path never needs them for device-readable runs

    @property
    def pos(self) -> np.ndarray:
        return (np.arange(self._pos0, self._pos0 + self.n, dtype=np.int64) % self._ring).astype(np.uint32)

    @property
    def writable(self) -> np.ndarray:
        return (self.flags & WRITE_FLAG) != 0

    def len_summary(self) -> tuple[int, int, int]:
        """(shortest, longest, total) buffer length: free when the ring scan
        already summed them (the C scan), else three reductions."""
        s = self._len_summary
        if s is None:
            lens = self.lens
            s = self._len_summary = (int(np.minimum.reduce(lens)), int(np.maximum.reduce(lens)),
                                     int(np.add.reduce(lens, dtype=np.uint64)))
        return s

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Bulk(n={self.n}, bytes={int(self.lens.sum())})"

    def view(self, i: int) -> memoryview:
        """Zero-copy view of buffer `i`."""
        off = int(self.addrs[i]) - self.region_gpa
        return self.region_mv[off : off + int(self.lens[i])]

    def fill(self, data: bytes) -> None:
        """Copy `data` to the start of every buffer (a generator's frame into
        a batch of receive buffers): one C call with the compiled engine, one
        slice assignment per buffer otherwise. Every buffer must be writable
        and at least len(data) long (ValueError, nothing written)."""
        k = len(data)
        lo = self.len_summary()[0] if self.n else k
        if lo < k or (self.n and not int(np.bitwise_and.reduce(self.flags)) & WRITE_FLAG):
            raise ValueError(f"{self!r}: a buffer is read-only or shorter than {k} bytes")
        if ring_fill is not None:
            ring_fill(self.region_mv, np.ascontiguousarray(self.addrs), self.region_gpa,
                      np.ascontiguousarray(self.lens), data)
            return
        mv = self.region_mv
        for o in (self.addrs - np.uint64(self.region_gpa)).tolist():
            mv[o : o + k] = data

    def views(self) -> list[memoryview]:
        """Zero-copy views of every buffer, in ring order."""
        mv = self.region_mv
        offs = (self.addrs - np.uint64(self.region_gpa)).tolist()
        return [mv[o : o + ln] for o, ln in zip(offs, self.lens.tolist())]

    def chains(self) -> list[Chain]:
        """The same buffers as `Chain` objects (for generic device code).
        Complete them with `Virtqueue.complete_bulk(bulk, ...)`, not one by one."""
        out = []
        for i, (cid, pos, ln, w) in enumerate(zip(self.ids.tolist(), self.pos.tolist(),
                                                  self.lens.tolist(), self.writable.tolist())):
            v = [self.view(i)] if ln else []
            if w:
                out.append(Chain(cid, pos, 1, [], v, 0, ln))
            else:
                out.append(Chain(cid, pos, 1, v, [], ln, 0))
        return out
