"""Queue errors, each named for the driver behaviour that causes it.

A `QueueError` means the *guest driver* broke the ring protocol. It retires
the fetch side of that one queue (work already handed out may still be
completed); the device is expected to report DEVICE_NEEDS_RESET and wait for
the driver to reset it. Retrying would only hit the same corrupt state again,
so a failed queue never spins: it returns no more work and never re-arms.

Errors that are the *device author's* bug (completing a chain twice, saving
a queue with unpublished completions) are plain `ValueError`/`RuntimeError`.
"""

from __future__ import annotations


class QueueError(Exception):
    """The driver violated the virtqueue protocol; the queue's fetch side is retired."""


class InvalidQueueGeometry(QueueError):
    """Queue size or ring addresses are unusable (size 0, not a power of two
    for split, > 32768, misaligned or unmapped areas)."""


class InvalidSavedState(QueueError):
    """A saved/restored queue state is inconsistent (indices beyond the ring,
    in-flight entries that cannot exist)."""


class AvailIndexJump(QueueError):
    """`avail.idx` moved by more than the queue size (or backwards)."""


class HeadOutOfRange(QueueError):
    """The available ring names a descriptor head >= queue size."""


class DescriptorIndexOutOfRange(QueueError):
    """A `next` field points past the descriptor table (or the indirect table)."""


class ChainTooLong(QueueError):
    """A descriptor chain loops or has more descriptors than the queue size."""


class IndirectNotNegotiated(QueueError):
    """INDIRECT flag used although VIRTIO_F_INDIRECT_DESC was not negotiated."""


class NestedIndirect(QueueError):
    """An indirect table contains another INDIRECT descriptor."""


class IndirectWithNext(QueueError):
    """A descriptor has both INDIRECT and NEXT set."""


class BadIndirectTable(QueueError):
    """Indirect table length is zero, not a multiple of 16, or larger than allowed."""


class IndirectInList(QueueError):
    """A packed NEXT list contains an INDIRECT descriptor."""


class ReadableAfterWritable(QueueError):
    """A device-readable descriptor follows a device-writable one."""


class ChainTooLarge(QueueError):
    """The chain's total length exceeds 2^32 bytes."""


class BadBufferAddress(QueueError):
    """A descriptor names guest memory that does not exist (or wraps u64)."""


class TooManyInFlight(QueueError):
    """The driver made more buffers available than the ring can hold in flight
    (entries re-posted while the device still owns them)."""
