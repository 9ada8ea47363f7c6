"""Device-side virtqueues: split and packed rings behind one `Virtqueue`."""

from pyvirtio.queue.chain import IOV_MIN_SEGMENTS, Chain, IovChain
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
from pyvirtio.queue.virtqueue import DEFAULT_BATCH, ArmResult, Policy, QueueStats, Virtqueue

__all__ = [
    "DEFAULT_BATCH",
    "IOV_MIN_SEGMENTS",
    "ArmResult",
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
    "IovChain",
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
