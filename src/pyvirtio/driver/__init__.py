"""The driver (guest) side of virtqueues: split and packed rings.

Used by the tests and benchmarks, by device authors in their own tests, and
by the vhost-user frontend. It follows the virtio 1.2 driver requirements and
checks everything the device writes (`DeviceProtocolError`).
"""

from pyvirtio.driver.common import (
    BufferPool,
    DeviceProtocolError,
    QueueFullError,
    VirtqueueDriver,
    ring_layout,
)
from pyvirtio.driver.packed import PackedDriver
from pyvirtio.driver.split import SplitDriver

__all__ = [
    "BufferPool",
    "DeviceProtocolError",
    "PackedDriver",
    "QueueFullError",
    "SplitDriver",
    "VirtqueueDriver",
    "ring_layout",
]
