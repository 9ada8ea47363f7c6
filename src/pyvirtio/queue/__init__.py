"""Device-side virtqueues: split and packed rings behind one `Virtqueue`."""

from pyvirtio.queue.chain import Chain
from pyvirtio.queue.errors import (
    AvailIndexJump,
    BadBufferAddress,
    BadIndirectTable,
    ChainTooLarge,
    ChainTooLong,
    DescriptorIndexOutOfRange,
    HeadOutOfRange,
    IndirectInList,
    IndirectNotNegotiated,
    IndirectWithNext,
    InvalidQueueGeometry,
    InvalidSavedState,
    NestedIndirect,
    QueueError,
    ReadableAfterWritable,
    TooManyInFlight,
)
from pyvirtio.queue.split import guest_used_idx
from pyvirtio.queue.state import QueueState
from pyvirtio.queue.virtqueue import DEFAULT_BATCH, Policy, QueueStats, Virtqueue

__all__ = [
    "DEFAULT_BATCH",
    "AvailIndexJump",
    "BadBufferAddress",
    "BadIndirectTable",
    "Chain",
    "ChainTooLarge",
    "ChainTooLong",
    "DescriptorIndexOutOfRange",
    "HeadOutOfRange",
    "IndirectInList",
    "IndirectNotNegotiated",
    "IndirectWithNext",
    "InvalidQueueGeometry",
    "InvalidSavedState",
    "NestedIndirect",
    "Policy",
    "QueueError",
    "QueueState",
    "QueueStats",
    "ReadableAfterWritable",
    "TooManyInFlight",
    "Virtqueue",
    "guest_used_idx",
]
