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

from collections.abc import Sequence
from typing import Final

import numpy as np

from pyvirtio.memory import (
    ring_fill,
    ring_fill_records,
    ring_forward,
    ring_forward_records,
    ring_gather,
    ring_scatter,
)
from pyvirtio.queue.chain import Chain

WRITE_FLAG: Final = 0x2  # VIRTQ_DESC_F_WRITE, the same bit in both formats

#: a split or packed descriptor as a numpy record (both are 16 bytes; the
#: last two fields are flags/next for split and id/flags for packed)
SPLIT_DESC_DTYPE: Final = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
PACKED_DESC_DTYPE: Final = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])


class Bulk:
    """`n` single-descriptor chains taken together.

    - `ids`: what completes each (split head / packed buffer id), uint32
    - `pos`: ring position each came from (split avail index / packed slot)
    - `addrs`, `lens`: guest address and length of each buffer
    - `writable`: bool per buffer (device-writable)
    - all buffers lie in one memory region, `region_gpa`/`region_mv`
    - `recs`: with the compiled engine, the batch's 16-byte descriptor
      records as read from the ring (addr u64, len u32, then packed: id u16,
      flags u16; split: flags u16, next u16); `flags_at` is the flags'
      offset in a record (14 packed, 12 split). None and 0 otherwise. The C
      batch calls take the records as one buffer (a numpy column costs a
      buffer export each), and a column not given (None) is made from them
      on first use: a batch that only goes through C calls (a loopback's
      forwarding round) makes no numpy array at all. A split batch's heads
      (its `ids`) may likewise come as `heads`, n u16 in a bytearray.
    """

    __slots__ = ("_addrs", "_flags", "_flags_and", "_ids", "_len_summary", "_lens", "_pos0", "_records", "_ring",
                 "flags_at", "heads", "n", "recs", "region_gpa", "region_mv")

    def __init__(self, ids: np.ndarray | None, pos0: int, ring: int, addrs: np.ndarray | None,
                 lens: np.ndarray | None, flags: np.ndarray | None, region_gpa: int, region_mv: memoryview,
                 len_summary: tuple[int, int, int] | None = None, flags_and: int = -1,
                 recs: bytearray | None = None, flags_at: int = 0, heads: bytearray | None = None) -> None:
        if recs is None:
            if ids is None or addrs is None or lens is None or flags is None or heads is not None:
                raise ValueError("a Bulk without descriptor records needs all four columns")
            flags_at = 0
        elif flags_at not in (12, 14) or len(recs) % 16:
            raise ValueError("descriptor records: 16 bytes each, flags at 12 (split) or 14 (packed)")
        elif flags_at == 14 and heads is not None:
            raise ValueError("packed records carry their ids")
        elif flags_at == 12 and ((ids is None) == (heads is None) or (heads is not None and 8 * len(heads) != len(recs))):
            raise ValueError("split records: the ids as a column or as heads (one u16 per record), one of the two")
        self.heads = heads
        self._ids = ids
        self._pos0 = pos0
        self._ring = ring  # positions wrap here (2^16 for split indices, Q for packed slots)
        self._addrs = addrs
        self._lens = lens
        self._flags = flags
        self.region_gpa = region_gpa
        self.region_mv = region_mv
        self.n = len(ids) if ids is not None else len(recs) // 16  # type: ignore[arg-type]
        self._len_summary = len_summary
        self._flags_and = flags_and
        self.recs = recs
        self.flags_at = flags_at
        self._records: np.ndarray | None = None

    # the columns: views of the records, made when first asked for

    def _view(self) -> np.ndarray:
        v = self._records
        if v is None:
            v = self._records = np.frombuffer(self.recs,  # type: ignore[arg-type]
                                              PACKED_DESC_DTYPE if self.flags_at == 14 else SPLIT_DESC_DTYPE)
        return v

    @property
    def ids(self) -> np.ndarray:
        """What completes each (split head / packed buffer id)."""
        a = self._ids
        if a is None:
            h = self.heads
            a = self._ids = self._view()["id"] if h is None else np.frombuffer(h, np.uint16)
        return a

    @property
    def addrs(self) -> np.ndarray:
        a = self._addrs
        if a is None:
            a = self._addrs = self._view()["addr"]
        return a

    @property
    def lens(self) -> np.ndarray:
        a = self._lens
        if a is None:
            a = self._lens = self._view()["len"]
        return a

    @property
    def flags(self) -> np.ndarray:
        a = self._flags
        if a is None:
            a = self._flags = self._view()["flags"]
        return a

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

    def flags_and(self) -> int:
        """The AND of every buffer's flags (WRITE set: all device-writable):
        free when the ring scan already took it (the C split scan), else one
        reduction."""
        f = self._flags_and
        if f < 0:
            f = self._flags_and = int(np.bitwise_and.reduce(self.flags)) if self.n else 0
        return f

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
        if lo < k or (self.n and not self.flags_and() & WRITE_FLAG):
            raise ValueError(f"{self!r}: a buffer is read-only or shorter than {k} bytes")
        recs = self.recs
        if ring_fill_records is not None and recs is not None:  # one record buffer, no columns made
            ring_fill_records(self.region_mv, recs, self.region_gpa, data)
            return
        if ring_fill is not None:
            ring_fill(self.region_mv, self.addrs, self.region_gpa, self.lens, data)  # columns read in place
            return
        mv = self.region_mv
        for o in (self.addrs - np.uint64(self.region_gpa)).tolist():
            mv[o : o + k] = data

    def frames(self, lo: int = 0, hi: int = 0xFFFFFFFF) -> tuple[list[bytes], int]:
        """A copy of every device-readable buffer whose length is in
        [lo, hi], in ring order (the others are left out), and the OR of
        the copies' first two bytes as a little-endian u16 (a virtio-net
        frame's header flags and gso_type: 0 when none asks for an
        offload). One C call with the compiled engine."""
        if ring_gather is not None:
            return ring_gather(self.region_mv, self.addrs, self.region_gpa, self.lens, self.flags, lo, hi)
        mv = self.region_mv
        offs = (self.addrs - np.uint64(self.region_gpa)).tolist()
        keep = (~self.writable).tolist()
        out = [mv[o : o + n].tobytes() for o, n, k in zip(offs, self.lens.tolist(), keep) if k and lo <= n <= hi]
        lead = 0
        for f in out:
            if len(f) >= 2:
                lead |= f[0] | f[1] << 8
        return out, lead

    def scatter(self, frames: Sequence[bytes], patch_at: int = -1, patch: bytes = b"") -> tuple[int, int, int] | None:
        """Copy `frames[i]` to the start of buffer `i` (one frame per buffer,
        `len(frames) == n`), then `patch` over each copy at `patch_at` when
        that is >= 0: a loopback's frames into a batch of receive buffers.
        Returns (shortest, longest, total) frame length; None, with nothing
        written, when a buffer is read-only or shorter than its frame (or a
        frame shorter than the patch). One C call with the compiled engine."""
        n = self.n
        if len(frames) != n:
            raise ValueError(f"{self!r}: {len(frames)} frames for {n} buffers")
        if ring_scatter is not None:
            return ring_scatter(self.region_mv, self.addrs, self.region_gpa, self.lens, self.flags, frames,
                                patch_at, patch)
        sizes = [len(f) for f in frames]
        need = patch_at + len(patch) if patch_at >= 0 else 0
        if n and (not self.writable.all() or (self.lens < np.array(sizes, np.uint64)).any() or min(sizes) < need):
            return None
        mv = self.region_mv
        for o, f in zip((self.addrs - np.uint64(self.region_gpa)).tolist(), frames):
            mv[o : o + len(f)] = f
            if patch_at >= 0:
                mv[o + patch_at : o + need] = patch
        return (min(sizes), max(sizes), sum(sizes)) if n else (0, 0, 0)

    def forward_into(self, dst: Bulk, lo: int = 0, hi: int = 0xFFFFFFFF, patch_at: int = -1,
                     patch: bytes = b"") -> tuple[int, int, int] | None:
        """Copy buffer `i` of this batch to the start of buffer `i` of `dst`
        (`dst.n == n`), then `patch` over each copy at `patch_at` when that
        is >= 0: a loopback's transmitted frames straight into receive
        buffers, with no copy in between. Returns (shortest, longest,
        total) length; None, with nothing written, unless every buffer here
        is device-readable, lo <= its length <= hi, at least 2 bytes long
        with its first two bytes zero (a virtio-net header that asks for no
        offload) and long enough for the patch, and every buffer of `dst`
        device-writable and long enough. One C call with the compiled
        engine. Buffers may overlap (the guest picks them): each copy
        reads its source whole before writing."""
        n = self.n
        if dst.n != n:
            raise ValueError(f"{self!r} into {dst!r}: one receive buffer per frame")
        if ring_forward_records is not None:
            src, dst_recs = self.recs, dst.recs
            if src is not None and dst_recs is not None:  # two record buffers instead of six columns
                return ring_forward_records(self.region_mv, src, self.region_gpa, self.flags_at, dst.region_mv,
                                            dst_recs, dst.region_gpa, dst.flags_at, lo, hi, patch_at, patch)
        if ring_forward is not None:
            return ring_forward(self.region_mv, self.addrs, self.region_gpa, self.lens, self.flags,
                                dst.region_mv, dst.addrs, dst.region_gpa, dst.lens, dst.flags, lo, hi, patch_at, patch)
        if not n:
            return (0, 0, 0)
        need = max(2, patch_at + len(patch) if patch_at >= 0 else 0)
        sizes = self.lens.tolist()
        if (self.flags & WRITE_FLAG).any() or not dst.writable.all() or (dst.lens < self.lens).any() \
                or min(sizes) < max(lo, need) or max(sizes) > hi:
            return None
        src_mv, dst_mv = self.region_mv, dst.region_mv
        src_offs = (self.addrs - np.uint64(self.region_gpa)).tolist()
        dst_offs = (dst.addrs - np.uint64(dst.region_gpa)).tolist()
        for s, d, k in zip(src_offs, dst_offs, sizes):
            if s + k > len(src_mv) or d + k > len(dst_mv) or src_mv[s] or src_mv[s + 1]:
                return None
        for s, d, k in zip(src_offs, dst_offs, sizes):
            dst_mv[d : d + k] = src_mv[s : s + k].tobytes()  # whole before writing: the buffers may overlap
            if patch_at >= 0:
                dst_mv[d + patch_at : d + patch_at + len(patch)] = patch
        return (min(sizes), max(sizes), sum(sizes))

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
