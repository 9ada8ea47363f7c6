"""The public device API: a virtio device as one small class, served with
`serve()` (or `serve_async()` from asyncio).

    class Echo(pyvirtio.Device):
        device_id = "echo"
        def handle(self, queue: int, chain: pyvirtio.Chain) -> int:
            return chain.write(chain.read())      # bytes written into the chain

    pyvirtio.serve(Echo(), socket_path="/tmp/echo.sock")

A `Device` says what it offers (`features`, `num_queues`, `config()`) and
answers requests: `handle(queue, chain)` reads the chain's device-readable
buffers (`chain.readable`, zero-copy memoryviews into guest memory, or
`chain.read()`), writes its device-writable ones (`chain.writable`,
`chain.write(data, offset)`) and returns how many bytes it wrote. pyvirtio
does the rest: the vhost-user protocol, guest memory, the rings (split and
packed, indirect descriptors, event index), one thread per queue that takes
requests in batches, publishes their completions as one batch and sleeps on
the kick only after arming it, multiqueue, and a guest that breaks the ring
protocol (that queue retires, nothing else does).

A handler that raises is logged and its request completed with 0 bytes, so
one bug does not stop the queue. Devices that need more (requests that
complete later, other wake-up sources, inflight tracking) implement
`pyvirtio.runtime.VirtioDevice` and a `pyvirtio.runtime.Service` directly,
as `pyvirtio.devices.blk` and `pyvirtio.devices.net` do; `serve()` accepts
those too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pyvirtio.queue import Chain, Policy
from pyvirtio.runtime import Completion, Queue, QueueLoop, Service, VirtioDevice, settle_heap
from pyvirtio.spec import Feature
from pyvirtio.vhost_user.backend import Backend
from pyvirtio.vhost_user.server import Server

log = logging.getLogger(__name__)

#: The ring features pyvirtio implements for every device.
RING_FEATURES = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX | Feature.RING_INDIRECT_DESC
                    | Feature.RING_PACKED)


class Device:
    """Subclass and override `handle` (and `config` if the device has a config space).

    Class attributes:

    - `device_id`: a short name for logs and stats;
    - `features`: feature bits offered (ring bits and the device's own);
    - `num_queues`: virtqueues served (QEMU's vhost-user-blk-pci asks one
      per vCPU unless told `num-queues=`).

    The transport learns the rest from these (a config space when
    `config()` is not empty; multiqueue).
    """

    device_id: str = "device"
    features: int = RING_FEATURES
    num_queues: int = 1

    def config(self) -> bytes:
        """The device configuration space (answered to GET_CONFIG)."""
        return b""

    def set_config(self, offset: int, data: bytes) -> bool:
        """The driver wrote `data` at `offset` of the config space; False refuses."""
        return False

    def set_features(self, features: int) -> None:
        """The driver acked `features` (called before any queue runs)."""

    def handle(self, queue: int, chain: Chain) -> int:
        """Serve one request from virtqueue `queue`; return the bytes written into it."""
        raise NotImplementedError

    def reset(self) -> None:
        """The driver reset the device or the front-end went away."""

    def stats(self) -> dict[str, Any]:
        """Device-level facts added to the stats JSON lines (plain data)."""
        return {}

    def queue_role(self, index: int) -> str:
        """A short name of virtqueue `index` for stats and thread names."""
        return f"q{index}"

    def close(self) -> None:
        """Release the device's resources (the back-end is closing)."""



class _HandlerService(Service):
    """Each request answered at once by `Device.handle`."""

    def __init__(self, queue: Queue, device: Device) -> None:
        super().__init__(queue)
        self.handle_one = device.handle

    def handle(self, chains: list[Chain], done: list[Completion]) -> None:
        handle = self.handle_one
        q = self.queue
        index = q.index
        for ch in chains:
            try:
                n = handle(index, ch)
            except Exception:
                log.exception("%s: handler failed; request completed with 0 bytes", q.name)
                n = 0
            done.append((ch, max(0, min(int(n or 0), ch.writable_len))))
        q.counters.packets += len(chains)


class _Adapter(VirtioDevice):
    """A `Device` as the runtime sees devices."""

    multiqueue = True

    def __init__(self, device: Device) -> None:
        self.device = device
        self.name = device.device_id
        self.features = int(device.features)
        self.num_queues = self.queue_num = device.num_queues
        self.config_space = bool(device.config())
        self.loops: dict[int, QueueLoop] = {}

    def config(self) -> bytes:
        return self.device.config()

    def set_config(self, offset: int, data: bytes, flags: int) -> bool:
        return self.device.set_config(offset, data)

    def set_features(self, features: int) -> None:
        self.device.set_features(features)

    def service(self, queue: Queue) -> Service:
        return _HandlerService(queue, self.device)

    def reset(self) -> None:
        self.stop_queues()
        self.device.reset()

    def stats(self) -> dict[str, Any]:
        return self.device.stats()

    def queue_role(self, index: int) -> str:
        return self.device.queue_role(index)

    def close(self) -> None:
        self.stop_queues()
        self.device.close()


def as_virtio_device(device: Device | VirtioDevice) -> VirtioDevice:
    """`device` as the runtime and transports see devices (a `Device` is
    wrapped: one loop per queue calling its `handle`)."""
    return device if isinstance(device, VirtioDevice) else _Adapter(device)


def _server(device: Device | VirtioDevice, socket_path: str | None, fd: int | None,
            policy: Policy) -> tuple[Server, Backend]:
    vdev = as_virtio_device(device)
    backend = Backend(vdev, policy=policy)
    try:
        return Server(backend, socket_path=socket_path, fd=fd), backend
    except BaseException:
        backend.close()
        raise


def serve(device: Device | VirtioDevice, *, socket_path: str | None = None, fd: int | None = None,
          policy: Policy = "lazy", handle_signals: bool = True) -> None:
    """Serve `device` over vhost-user until SIGTERM/SIGINT (or, with `fd` a
    connected socket, until the front-end hangs up).

    `socket_path`: create and listen on this unix socket (QEMU connects);
    `fd`: an inherited socket, listening or connected (QEMU's `--fd`).
    `handle_signals=False` when not called from the main thread.
    """
    server, backend = _server(device, socket_path, fd, policy)
    if handle_signals:  # the process's main thread: this process serves
        server.install_signal_handlers()
        settle_heap()
    try:
        server.serve_forever()
    finally:
        backend.close()


async def serve_async(device: Device | VirtioDevice, *, socket_path: str | None = None, fd: int | None = None,
                      policy: Policy = "lazy") -> None:
    """`serve` for asyncio programs: runs until cancelled (then stops cleanly)."""
    server, backend = _server(device, socket_path, fd, policy)
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(None, server.serve_forever)
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        server.stop()
        await fut
        raise
    finally:
        backend.close()


__all__ = ["RING_FEATURES", "Chain", "Device", "as_virtio_device", "serve", "serve_async"]
