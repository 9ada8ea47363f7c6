"""The plain saved state of a device queue, separate from the live queue."""

from __future__ import annotations

from dataclasses import dataclass

from pyvirtio.queue.errors import InvalidSavedState
from pyvirtio.spec import MAX_QUEUE_SIZE, is_power_of_two


@dataclass(slots=True, frozen=True)
class QueueState:
    """Everything needed to resume a queue where it stopped.

    Split: `last_avail` and `used_idx` are the free-running u16 indices;
    the wrap fields are unused (True). Packed: they are slot numbers < size
    with their wrap counters. `in_flight` lists the chains handed to the
    device and not yet completed, oldest first, as (position, id): split
    (avail index it was taken from, head), packed (first slot, buffer id).
    A restored queue hands those chains out again before new work.
    """

    size: int
    packed: bool
    last_avail: int = 0
    avail_wrap: bool = True
    used_idx: int = 0
    used_wrap: bool = True
    in_flight: tuple[tuple[int, int], ...] = ()
    #: packed only, one entry per `in_flight` item: (slots, segments) with
    #: segments as (addr, len, device_writable). A packed ring's used
    #: descriptors overwrite the slots of other lists, so in-flight lists
    #: cannot be re-read from the ring.
    in_flight_lists: tuple[tuple[int, tuple[tuple[int, int, bool], ...]], ...] = ()

    def validate(self) -> None:
        """Raise `InvalidSavedState` unless the state can exist."""
        q = self.size
        if not 1 <= q <= MAX_QUEUE_SIZE or (not self.packed and not is_power_of_two(q)):
            raise InvalidSavedState(f"queue size {q} is invalid")
        if len(self.in_flight) > q:
            raise InvalidSavedState(f"{len(self.in_flight)} chains in flight on a ring of {q}")
        # Positions need not be unique: a packed slot freed by an out-of-order
        # completion is reused while an older list from it is in flight, and a
        # split index repeats after 2^16 pops while one chain is held.
        if self.packed:
            if not (0 <= self.last_avail < q and 0 <= self.used_idx < q):
                raise InvalidSavedState(f"packed cursor beyond ring of {q} slots")
            for pos, buf_id in self.in_flight:
                if not 0 <= pos < q or not 0 <= buf_id <= 0xFFFF:
                    raise InvalidSavedState(f"in-flight entry ({pos}, {buf_id}) is out of range")
            if len(self.in_flight_lists) != len(self.in_flight):
                raise InvalidSavedState("packed state needs the segments of every in-flight list")
            a = self.last_avail + (0 if self.avail_wrap else q)
            u = self.used_idx + (0 if self.used_wrap else q)
            slots = sum(n for n, _ in self.in_flight_lists)
            if any(n < 1 for n, _ in self.in_flight_lists) or slots != (a - u) % (2 * q):
                raise InvalidSavedState(f"in-flight lists occupy {slots} slots but the cursors are "
                                        f"{(a - u) % (2 * q)} apart")
        else:
            if not (0 <= self.last_avail <= 0xFFFF and 0 <= self.used_idx <= 0xFFFF):
                raise InvalidSavedState("split indices must be u16")
            outstanding = (self.last_avail - self.used_idx) & 0xFFFF
            if outstanding != len(self.in_flight):
                raise InvalidSavedState(
                    f"last_avail {self.last_avail} - used_idx {self.used_idx} = {outstanding} "
                    f"but {len(self.in_flight)} chains are listed in flight")
            for pos, head in self.in_flight:
                if not 0 <= head < q or not 0 <= pos <= 0xFFFF:
                    raise InvalidSavedState(f"in-flight head {head} (at {pos}) is out of range")
