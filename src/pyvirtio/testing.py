"""Test fixtures for device authors: a driver and a device queue on shared memory.

    pair = QueuePair("split", size=8, event_idx=True)
    buf = pair.pool.alloc(64)
    pair.driver.add([(buf, 64)], [], token="req")
    pair.driver.publish()
    (chain,) = pair.vq.pop_batch()
    pair.vq.complete(chain, 0); pair.vq.flush()
    assert pair.driver.get_used() == [("req", 0)]

`pair.mem` is what the device sees (a `CountingMemory`, so `pair.counts()`
tells how many accesses the device made); `pair.raw` is the same memory
uncounted, for a test to scribble on the ring like a hostile driver.
"""

from __future__ import annotations

from typing import Any

from pyvirtio.driver import BufferPool, PackedDriver, SplitDriver, ring_layout
from pyvirtio.memory import AreaKind, CountingMemory, GuestMemory
from pyvirtio.queue import QueueState, Virtqueue
from pyvirtio.spec import Feature


class QueuePair:
    """A driver model and a device `Virtqueue` over one guest memory."""

    def __init__(self, ring: str = "split", size: int = 16, *, event_idx: bool = False,
                 indirect: bool = False, policy: str = "lazy", mem_size: int = 1 << 20,
                 start_index: int = 0, extra_features: int = 0) -> None:
        self.packed = ring == "packed"
        self.size = size
        self.raw = GuestMemory.anonymous(mem_size)
        self.mem = CountingMemory(self.raw)
        self.desc, self.driver_area, self.device_area, end = ring_layout(self.packed, size, 0x1000)
        self.pool = BufferPool(self.raw, (end + 0xFFF) & ~0xFFF, mem_size - ((end + 0xFFF) & ~0xFFF))
        self.features = int(Feature.VERSION_1) | extra_features
        if self.packed:
            self.features |= Feature.RING_PACKED
        if event_idx:
            self.features |= Feature.RING_EVENT_IDX
        if indirect:
            self.features |= Feature.RING_INDIRECT_DESC
        cls = PackedDriver if self.packed else SplitDriver
        kw: dict[str, Any] = {"start_index": start_index} if start_index else {}
        self.driver = cls(self.raw, size, self.desc, self.driver_area, self.device_area,
                          event_idx=event_idx, indirect=indirect, pool=self.pool, **kw)
        state = None
        if start_index and not self.packed:
            state = QueueState(size, False, last_avail=start_index, used_idx=start_index)
        self.policy = policy
        self.vq = self.new_device(state)

    def new_device(self, state: QueueState | None = None, policy: str | None = None) -> Virtqueue:
        """A (new) device queue on the same rings, optionally resumed from `state`."""
        return Virtqueue(self.mem, self.size, self.desc, self.driver_area, self.device_area,
                         features=self.features, policy=policy or self.policy,  # type: ignore[arg-type]
                         state=state)

    def counts(self) -> dict[str, object]:
        return self.mem.snapshot()

    def area_counts(self, kind: AreaKind) -> tuple[int, int]:
        c = self.mem.counters[kind]
        return c.reads, c.writes

    def post(self, n: int, *, out: int = 64, in_: int = 0, segments: int = 1) -> list[int]:
        """Add `n` buffers (tokens 0..n-1) and publish them; returns their gpas."""
        gpas = []
        for i in range(n):
            outs = [(self.pool.alloc(out), out) for _ in range(segments)] if out else []
            ins = [(self.pool.alloc(in_), in_)] if in_ else []
            gpas.append(outs[0][0] if outs else ins[0][0])
            self.driver.add(outs, ins, token=i)
        self.driver.publish()
        return gpas

    def serve(self, written: int = 0, limit: int = 1024) -> int:
        """Device: drain everything, complete each chain, publish; returns the count."""
        total = 0
        while True:
            chains = self.vq.pop_batch(limit)
            if not chains:
                break
            for c in chains:
                self.vq.complete(c, min(written, c.writable_len))
            self.vq.flush()
            total += len(chains)
        return total
