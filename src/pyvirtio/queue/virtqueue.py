"""The format-independent device queue: notification policy, batching,
in-flight bookkeeping, failure latch, save/restore.

The device loop this is built for::

    while True:
        chains = vq.pop_batch()        # read-only check; suppresses kicks lazily
        if chains:
            for c in chains:
                vq.complete(c, handle(c))
            if vq.flush():             # one used.idx write, fence, one decision
                signal_call_fd()
            continue
        if vq.arm() is ArmResult.WORK: # enable kicks, full fence, one re-check
            continue                   # work slipped in while arming
        wait_for_kick()

Contract: when `pop_batch` returns nothing, the caller must call `arm()`
before sleeping and must not sleep unless it returns `ArmResult.SLEEP`.
`pyvirtio.runtime.QueueLoop` is that loop; devices run it rather than this.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

from pyvirtio.memory import GuestMemory, mypyc_attr
from pyvirtio.queue.bulk import WRITE_FLAG, Bulk
from pyvirtio.queue.chain import Chain
from pyvirtio.queue.errors import InvalidSavedState, QueueError
from pyvirtio.queue.packed import PackedRing
from pyvirtio.queue.split import SplitRing
from pyvirtio.queue.state import QueueState
from pyvirtio.spec import Feature

log = logging.getLogger(__name__)

Policy = Literal["lazy", "eager"]
DEFAULT_BATCH: Final = 64
U32_MAX: Final = (1 << 32) - 1


class ArmResult(enum.Enum):
    """What `Virtqueue.arm()` found at the sleep boundary."""

    WORK = "work"    #: work is available (or an error to report): do not sleep
    SLEEP = "sleep"  #: kicks are enabled and the re-check found nothing: sleep on the kick

    def __bool__(self) -> bool:  # a named result, never a truth value
        raise TypeError("ArmResult is a named result: compare it with `is`")


_WORK: Final = ArmResult.WORK
_SLEEP: Final = ArmResult.SLEEP


@dataclass(slots=True)
class QueueStats:
    """What the queue did, for counters and benchmarks."""

    chains: int = 0        # chains handed to the device
    completed: int = 0     # chains completed
    batches: int = 0       # non-empty pop_batch calls
    publishes: int = 0     # used-ring publications (flush or eager complete)
    interrupts: int = 0    # publications after which the driver wanted an interrupt
    arms: int = 0          # arm() calls that enabled kicks
    rearm_hits: int = 0    # arms whose re-check found work (lost wake-up avoided)
    suppressions: int = 0  # lazy kick suppressions (work found while armed)
    errors: int = 0        # ring violations (0 or 1: the queue retires on the first)


@mypyc_attr(allow_interpreted_subclasses=True)
class Virtqueue:
    """One device-side virtqueue over guest memory, split or packed.

    `features` are the negotiated feature bits (RING_PACKED, RING_EVENT_IDX,
    RING_INDIRECT_DESC matter here). `desc`, `driver`, `device` are the
    guest-physical addresses of the descriptor area, driver area (split
    avail ring / packed driver event) and device area (split used ring /
    packed device event). `state` resumes a saved queue.

    `policy="eager"` is the pre-optimisation behaviour, kept only as a
    benchmark baseline: every empty check enables kicks, every chain reloads
    avail.idx, every completion is published and decides an interrupt.
    """

    def __init__(self, mem: GuestMemory, size: int, desc: int, driver: int, device: int, *,
                 features: int = 0, policy: Policy = "lazy", state: QueueState | None = None,
                 name: str = "vq") -> None:
        if policy not in ("lazy", "eager"):
            raise ValueError(f"unknown policy {policy!r}")
        self.name = name
        self.mem = mem
        self.features = features
        self.policy = policy
        self.eager = policy == "eager"
        event_idx = bool(features & Feature.RING_EVENT_IDX)
        indirect = bool(features & Feature.RING_INDIRECT_DESC)
        self.packed = bool(features & Feature.RING_PACKED)
        ring_cls = PackedRing if self.packed else SplitRing
        self.ring: SplitRing | PackedRing = ring_cls(mem, size, desc, driver, device,
                                                     event_idx=event_idx, indirect=indirect)
        self.size = size
        self.event_idx = event_idx
        self.stats = QueueStats()
        self.failed: QueueError | None = None
        self._unreported: QueueError | None = None
        self.armed = False
        # chains handed out, in order; keyed by the object (ring positions
        # repeat after 2^16 pops, a chain may stay in flight that long)
        self.inflight: dict[Chain | Bulk, None] = {}
        self._pending: list[tuple[Chain, int]] = []
        self._restored: QueueState | None = None
        self._redeliver: list[Chain] = []
        #: the dirty log (`pyvirtio.dirtylog.DirtyLog`) while the front-end
        #: migrates the VM, else None; see `set_dirty_log`
        self.dirty: Any = None
        self.dirty_ranges: list[tuple[int, int]] = []
        if state is not None:
            self._restore(state)

    def set_dirty_log(self, dirty: Any, used_log: int | None = None) -> None:
        """Log every guest-memory write of this queue in `dirty` (a
        `DirtyLog`), or stop logging (None). `used_log`: the guest address
        the front-end gave for the used ring's log (split rings; vhost-user's
        `log_guest_addr`), else the ring's own address."""
        ring = self.ring
        if isinstance(ring, PackedRing):
            ranges = [(ring.desc.gpa, ring.desc.size), (ring.device_event.gpa, ring.device_event.size)]
        else:
            size = ring.used.size + (2 if self.event_idx else 0)  # avail_event follows the ring
            ranges = [(ring.used.gpa if used_log is None else used_log, size)]
        self.dirty_ranges = ranges
        self.dirty = dirty
        if dirty is not None:
            dirty.mark_ranges(ranges)  # what we wrote before logging began is the front-end's to copy; cheap

    def _log_ring(self) -> None:
        d = self.dirty
        if d is not None:
            d.mark_ranges(self.dirty_ranges)

    # -- fetch side ---------------------------------------------------------------

    def pop_batch(self, limit: int = DEFAULT_BATCH) -> list[Chain]:
        """Take up to `limit` available chains (bounded work per call).

        Read-only on guest memory except for the lazy kick suppression: if
        kicks were armed and work is found, they are disabled once.
        Raises the `QueueError` that retired the queue (once); after that,
        returns [] forever. Chains taken before an error are still returned.
        """
        if self.failed is not None:
            err, self._unreported = self._unreported, None
            if err is not None:
                raise err
            return []
        out: list[Chain] = []
        ring = self.ring
        try:
            if self._restored is not None or self._redeliver:
                self._take_redeliver(out, limit)
            if out:
                pass
            elif self.eager:
                self._fetch_eager(out, limit)
            else:
                ring.fetch(out, limit)
        except QueueError as e:
            self._fail(e)
            if not out:
                self._unreported = None
                raise
        if out:
            if self.armed and not self.eager:
                ring.disable_kicks()
                self.armed = False
                self.stats.suppressions += 1
                if self.dirty is not None:
                    self._log_ring()
            inflight = self.inflight
            for c in out:
                inflight[c] = None
            self.stats.chains += len(out)
            self.stats.batches += 1
        return out

    def pop_bulk(self, limit: int = DEFAULT_BATCH) -> Bulk | list[Chain]:
        """`pop_batch` with a vectorised fast path: a run of single-descriptor
        chains inside one memory region comes back as one `Bulk` (complete it
        with `complete_bulk`); anything else as a list of `Chain`s, exactly
        as `pop_batch` returns them. Same guest-memory accesses either way."""
        if self.eager or self.failed is not None or self._restored is not None or self._redeliver:
            return self.pop_batch(limit)
        chains: list[Chain] = []
        got: Bulk | None = None
        try:
            got = self.ring.fetch_bulk(chains, limit)
        except QueueError as e:
            self._fail(e)
            if not chains:
                self._unreported = None
                raise
        if got is None:
            if not chains:
                return chains
            self.inflight.update(dict.fromkeys(chains))
            n = len(chains)
        else:
            self.inflight[got] = None
            n = got.n
        if self.armed:
            self.ring.disable_kicks()
            self.armed = False
            self.stats.suppressions += 1
            if self.dirty is not None:
                self._log_ring()
        self.stats.chains += n
        self.stats.batches += 1
        return chains if got is None else got

    def complete_bulk(self, bulk: Bulk, written: int | np.ndarray = 0) -> bool:
        """Complete every chain of `bulk`, `written` bytes each (an int, or an
        array in bulk order). Lazy: queued until `flush()`, returns False."""
        w: int | np.ndarray
        if type(written) is int:
            # one length for all (a generator's frames): two reductions, no arrays
            if written and (written < 0 or not bulk.flags_and() & WRITE_FLAG
                            or written > bulk.len_summary()[0]):
                raise ValueError(f"{self.name}: written bytes exceed a buffer's writable length")
            w = written
        else:
            w = np.asarray(written, np.int64)
            if (w < 0).any() or (w > np.where(bulk.writable, bulk.lens, 0)).any():
                raise ValueError(f"{self.name}: written bytes exceed a buffer's writable length")
            w = w.astype(np.uint32)
        try:
            del self.inflight[bulk]
        except KeyError:
            raise ValueError(f"{self.name}: {bulk!r} is not in flight (completed twice?)") from None
        self.stats.completed += bulk.n
        if self.eager:
            return self._publish([(bulk, w)])  # type: ignore[list-item]
        self._pending.append((bulk, w))  # type: ignore[arg-type]
        return False

    def unbulk(self, bulk: Bulk) -> list[Chain]:
        """`bulk`'s buffers as `Chain`s, each in flight on its own: for
        device code that found it cannot use the whole batch at once.
        Complete them with `complete`/`complete_batch`; the `Bulk` itself is
        no longer in flight. No guest memory is read again."""
        try:
            del self.inflight[bulk]
        except KeyError:
            raise ValueError(f"{self.name}: {bulk!r} is not in flight") from None
        chains = bulk.chains()
        self.inflight.update(dict.fromkeys(chains))
        return chains

    def pop(self) -> Chain | None:
        """One chain, or None (see `pop_batch`)."""
        got = self.pop_batch(1)
        return got[0] if got else None

    def has_work(self) -> bool:
        """Is a chain available? Read-only; never writes guest memory."""
        if self.failed is not None:
            return False
        if self._restored is not None or self._redeliver:
            return True
        try:
            return self.ring.peek()
        except QueueError as e:
            self._fail(e)
            return True  # let pop_batch report it

    def _fetch_eager(self, out: list[Chain], limit: int) -> None:
        ring = self.ring
        while len(out) < limit:
            c = ring.fetch_one_eager()
            if c is None:
                # Every empty check arms, fences and re-checks.
                ring.enable_kicks_eager()
                self.armed = True
                self.stats.arms += 1
                if self.dirty is not None:
                    self._log_ring()
                self.mem.fence()
                if not ring.recheck():
                    return
                self.stats.rearm_hits += 1
                continue
            out.append(c)
            ring.disable_kicks_eager()
            self.armed = False
            if self.dirty is not None:
                self._log_ring()

    def arm(self) -> ArmResult:
        """Call at the sleep boundary. Enables kicks, issues a full fence and
        re-checks once. `ArmResult.WORK`: work is available, do not sleep;
        `ArmResult.SLEEP`: sleep until the driver kicks."""
        if self.failed is not None:
            return _WORK if self._unreported is not None else _SLEEP  # report it, then sleep forever
        if self._restored is not None or self._redeliver:
            return _WORK
        ring = self.ring
        if ring.unconsumed():
            return _WORK
        if self.armed or self.eager:
            # Still armed since the last sleep (a spurious or stale wake-up;
            # eager arms at every empty check): the driver kicks for anything
            # new, so no write and no fence, but look once, read-only, in case
            # the caller consumed that kick after its own empty check.
            try:
                return _WORK if ring.peek() else _SLEEP
            except QueueError as e:
                self._fail(e)
                return _WORK
        ring.enable_kicks()
        self.armed = True
        self.stats.arms += 1
        if self.dirty is not None:
            self._log_ring()
        # StoreLoad: the kick enable must be visible to the driver before we
        # look at its index again, or a publish in between is never kicked.
        self.mem.fence()
        try:
            work = ring.recheck()
        except QueueError as e:
            self._fail(e)
            return _WORK
        if work:
            self.stats.rearm_hits += 1
            return _WORK
        return _SLEEP

    def _fail(self, e: QueueError) -> None:
        if self.failed is None:
            self.failed = e
            self._unreported = e
            self.stats.errors += 1
            log.error("%s: queue retired: %s: %s", self.name, type(e).__name__, e)

    # -- completion side -------------------------------------------------------

    def complete(self, chain: Chain, written: int = 0) -> bool:
        """Return `chain` to the driver with `written` bytes in its writable part.

        Lazy: queued until `flush()`; returns False. Eager: published at once;
        returns True when the driver wants an interrupt now.
        """
        if not 0 <= written <= chain.writable_len:
            raise ValueError(f"{self.name}: written {written} is outside 0..{chain.writable_len}")
        try:
            del self.inflight[chain]
        except KeyError:
            raise ValueError(f"{self.name}: {chain!r} is not in flight (completed twice?)") from None
        written = min(written, U32_MAX)  # a used length is a u32; a device may underestimate
        self.stats.completed += 1
        if self.eager:
            return self._publish([(chain, written)])
        self._pending.append((chain, written))
        return False

    def complete_batch(self, items: Sequence[tuple[Chain, int]]) -> bool:
        """Complete many chains and publish them as one batch (with anything
        already pending), so that they become used together (the buffers of
        one mergeable frame must). Returns True when the driver wants an
        interrupt. The eager baseline publishes these together too."""
        inflight = self.inflight
        pending = self._pending
        for item in items:
            chain, written = item
            if not 0 <= written <= chain.writable_len:
                raise ValueError(f"{self.name}: written {written} is outside 0..{chain.writable_len}")
            try:
                del inflight[chain]
            except KeyError:
                raise ValueError(f"{self.name}: {chain!r} is not in flight (completed twice?)") from None
            if written > U32_MAX:
                item = (chain, U32_MAX)  # a used length is a u32; a device may underestimate
            pending.append(item)
        self.stats.completed += len(items)
        return self.flush()

    def flush(self) -> bool:
        """Publish every pending completion as one batch and decide once.
        Returns True when the driver wants an interrupt."""
        pending = self._pending
        if not pending:
            return False
        notify = self._publish(pending)
        self._pending = []
        return notify

    def _publish(self, items: list[tuple[Chain, int]]) -> bool:
        notify = self.ring.publish(items)
        d = self.dirty
        if d is not None:  # after the writes the marks stand for
            d.mark_publish(items, self.dirty_ranges)
        self.stats.publishes += 1
        if notify:
            self.stats.interrupts += 1
        return notify

    def give_back(self, chains: Sequence[Chain]) -> int:
        """Hand back chains taken but never written (net rx buffers waiting
        for frames when a ring stops): if they are the most recent ones
        taken, in order, the ring's cursor moves back so that the driver's
        next index to process is exact and they are taken again later;
        otherwise each is completed with 0 bytes. Returns how many were
        rewound."""
        if not chains:
            return 0
        chains = list(chains)
        ring = self.ring
        if self._pending or self._redeliver or self._restored is not None:
            ok = False
        elif self.packed:
            slots = sum(c.slots for c in chains)
            contiguous = all((a.pos + a.slots) % self.size == b.pos for a, b in itertools.pairwise(chains))
            ok = contiguous and ring.rewind(chains[0].pos, slots)
        else:
            contiguous = all((a.pos + 1) & 0xFFFF == b.pos for a, b in itertools.pairwise(chains))
            ok = contiguous and ring.rewind(chains[0].pos, len(chains))
        if ok:
            for c in chains:
                self.inflight.pop(c, None)
            self.stats.chains -= len(chains)
            return len(chains)
        log.warning("%s: %d held chains are not the last taken: completed empty", self.name, len(chains))
        self.complete_batch([(c, 0) for c in chains if c in self.inflight])
        return 0

    # -- state -------------------------------------------------------------------------

    def save(self) -> QueueState:
        """The queue's resumable state. Completions must be flushed first."""
        if self._pending:
            raise RuntimeError(f"{self.name}: flush() before save(): {len(self._pending)} completions pending")
        if self._restored is not None:
            return self._restored  # nothing was taken since the restore
        last, awrap, used, uwrap = self.ring.cursor()
        chains: list[Chain] = []
        for item in [*self.inflight, *self._redeliver]:
            if type(item) is Bulk:
                for i, (pos, cid, addr, ln, w) in enumerate(zip(
                        item.pos.tolist(), item.ids.tolist(), item.addrs.tolist(),
                        item.lens.tolist(), item.writable.tolist())):
                    c = Chain(cid, pos, 1, [], [], 0, 0)
                    c.segments = ((addr, ln, bool(w)),)
                    chains.append(c)
            else:
                assert isinstance(item, Chain)
                chains.append(item)
        lists = tuple((c.slots, c.segments) for c in chains) if self.packed else ()
        return QueueState(self.size, self.packed, last, awrap, used, uwrap,
                          tuple((c.pos, c.id) for c in chains), lists)

    def _restore(self, st: QueueState) -> None:
        if st.size != self.size or st.packed != self.packed:
            raise InvalidSavedState(f"state for a {'packed' if st.packed else 'split'} ring of {st.size} "
                                    f"restored into a {'packed' if self.packed else 'split'} ring of {self.size}")
        st.validate()
        self.ring.restore(st)
        self._restored = st

    def _take_redeliver(self, out: list[Chain], limit: int) -> None:
        """Hand out the chains that were in flight when the state was saved
        (walked again from the descriptor table for split, rebuilt from the
        saved segments for packed)."""
        st = self._restored
        if st is not None:
            self._restored = None
            ring = self.ring
            if isinstance(ring, PackedRing):
                self._redeliver = [ring.rebuild(pos, cid, slots, segs)
                                   for (pos, cid), (slots, segs) in zip(st.in_flight, st.in_flight_lists)]
            else:
                self._redeliver = [ring.rewalk(pos, head) for pos, head in st.in_flight]
        out.extend(self._redeliver[:limit])
        del self._redeliver[:limit]

    @property
    def in_flight(self) -> int:
        """Chains handed out and not yet completed."""
        restored = len(self._restored.in_flight) if self._restored is not None else 0
        held = sum(item.n if type(item) is Bulk else 1 for item in self.inflight)
        return held + len(self._redeliver) + restored
