"""What a device gives the queue loop: a `Service` per ring, and the
`VirtioDevice` that makes them. Devices subclass these.

This module stays plain Python whichever engine runs: devices override the
class attributes below (`bulk`, `batch`, `eager_each`, a device's `name`
and `features`) in their own class bodies, which a compiled (native) base
class would not see. The compiled loop (`pyvirtio.runtime`) calls these
classes as it calls any Python object; `pyvirtio.runtime` re-exports them.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pyvirtio.spec import MAX_QUEUE_SIZE, Feature

if TYPE_CHECKING:
    from pyvirtio.runtime import LoopGroup, Queue, QueueLoop

log = logging.getLogger("pyvirtio.runtime")

#: What a device hands back for a chain (or a `Bulk`) it finished: the object
#: and the bytes it wrote into it (an int; for a `Bulk`, an int or an array).
Completion = tuple[Any, Any]


class Service:
    """What a device does with one queue. Subclass and override `handle`;
    the rest has defaults for a device that answers each request at once.
    The loop calls every method from its own thread."""

    #: chains per pop
    batch: int = 64
    #: accept a `Bulk` (a run of single-descriptor chains as arrays) from the engine
    bulk: bool = False
    #: completions gathered before they are published (a burst that ends,
    #: i.e. an empty ring, publishes earlier); 1 = after every batch
    publish_at: int = 1
    #: under the eager baseline policy, publish and decide an interrupt per
    #: completion (the pre-optimisation path); False keeps one publication
    #: per batch under both policies, which a batch whose buffers must
    #: become used together needs (a mergeable rx frame's buffers)
    eager_each: bool = False

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def take(self) -> int:
        """How many chains the device takes now (0: none; the loop then
        sleeps on the device's own wake sources, not on the kick)."""
        return self.batch if self.queue.enabled else 0

    def handle(self, chains: Any, done: list[Completion]) -> None:
        """Serve a batch (a list of `Chain`s, or a `Bulk` when `bulk`):
        append (chain, written) to `done` for what is finished now. A chain
        kept for later is either `queue.defer()`ed (completed later with
        `queue.deliver`, from any thread) or held by the device, which
        completes it in `progress`."""
        raise NotImplementedError

    def progress(self, done: list[Completion]) -> bool:
        """Work not driven by the ring (frames from a source into held
        chains, timers). Return True if anything happened."""
        return False

    def wake_fds(self) -> Sequence[int]:
        """Fds whose readability should wake the loop while it sleeps."""
        return ()

    def wake_write_fds(self) -> Sequence[int]:
        """Fds whose writability should wake the loop while it sleeps (a
        device holding bytes for a host socket that was full)."""
        return ()

    def timer(self) -> float | None:
        """Seconds until the device wants `progress` called again while the
        loop sleeps (a timer); None: no timer."""
        return None

    def before_sleep(self) -> bool:
        """About to sleep: announce it to the device's producers and
        re-check them; True cancels the sleep (something arrived)."""
        return False

    def after_sleep(self) -> None:
        """Woke up (by anything)."""

    def stopped(self) -> None:
        """The loop ended: release what the device holds for this queue
        (held chains are abandoned; the back-end offers them again)."""


class CallbackService(Service):
    """A service from one function: `handler(chains)` returns (chain,
    written) for every chain of the batch (with `bulk`, it may get a `Bulk`
    and return [(bulk, written)])."""

    eager_each = True

    def __init__(self, queue: Queue, handler: Callable[[Any], Sequence[Completion]], *,
                 batch: int = 64, bulk: bool = False) -> None:
        super().__init__(queue)
        self.handler = handler
        self.batch = batch
        self.bulk = bulk

    def take(self) -> int:
        return self.batch if self.queue.enabled else 0

    def handle(self, chains: Any, done: list[Completion]) -> None:
        done.extend(self.handler(chains))


class VirtioDevice(abc.ABC):
    """A virtio device, as any transport hosts it. Subclass and fill in.

    Class-level facts the transport reads:

    - `name`: for logs and stats;
    - `features`: the feature bits offered (device and ring bits);
    - `num_queues`: virtqueues the driver may use (indices 0..n-1);
    - `queue_num`: the number of queues announced (net: queue pairs; blk: queues);
    - `queue_size_max`: the largest ring accepted;
    - what the device needs from the transport, which maps it to its own
      protocol (vhost-user: protocol feature bits): `multiqueue` (more than
      one queue may run), `config_space` (the driver reads `config()`),
      `mtu_control` (the front-end may set the MTU: `set_mtu`),
      `inflight_tracking` (requests in flight survive a back-end restart),
      `announces` (after a live migration the device can tell the network
      where the guest now is: `announce`).

    Each started ring gets a `QueueLoop`; the device says what to do with
    its chains by returning a `Service` from `service(queue)`. The transport
    calls the other methods from its control thread.
    """

    name: str = "virtio"
    features: int = int(Feature.VERSION_1)
    num_queues: int = 1
    queue_num: int = 1
    queue_size_max: int = MAX_QUEUE_SIZE
    multiqueue: bool = False
    config_space: bool = False
    mtu_control: bool = False
    inflight_tracking: bool = False
    announces: bool = False

    #: ring index -> its running loop (the defaults below manage it)
    loops: dict[int, QueueLoop]

    #: Set by the transport hosting the device: tells the driver that
    #: `config()` changed on the device's own initiative (vhost-user: a
    #: CONFIG_CHANGE_MSG on the back-end channel). Any thread; returns the
    #: transport's receipt. None while no transport hosts the device.
    on_config_change: Callable[[], object] | None = None

    def config_changed(self) -> object:
        """Call after `config()` changed by itself (blk: the image grew) so
        the driver re-reads it. Returns the transport's receipt (vhost-user:
        a `pyvirtio.vhost_user.channel.Notice`), None without a transport."""
        notify = self.on_config_change
        if notify is None:
            log.warning("%s: config changed, but no transport hosts the device to tell the driver", self.name)
            return None
        return notify()

    def config(self) -> bytes:
        """The device config space."""
        return b""

    def set_config(self, offset: int, data: bytes, flags: int) -> bool:
        """The driver wrote the config space; return False to refuse (most is read-only)."""
        return False

    def set_features(self, features: int) -> None:
        """The driver acked `features`. No ring runs."""

    def set_mtu(self, mtu: int) -> bool:
        """The front-end set the MTU (`mtu_control`); return False to refuse."""
        return False

    def set_status(self, status: int) -> None:
        """The driver's status byte changed."""

    def announce(self, mac: bytes) -> bool:
        """The guest with this MAC address arrived here by live migration
        (`announces`; vhost-user: SEND_RARP): tell the network. Returns
        False when there is nothing to tell it through."""
        return False

    @abc.abstractmethod
    def service(self, queue: Queue) -> Service:
        """What serves ring `queue.index` (called when the ring starts)."""

    def start_queue(self, loop: QueueLoop) -> None:
        """Ring `loop.index` starts: attach its service and run its loop (in
        the thread of `queue_group(index)` when that names one)."""
        if not hasattr(self, "loops"):
            self.loops = {}
        loop.attach(self.service)
        self.loops[loop.index] = loop
        loop.start(self.queue_group(loop.index))

    def queue_group(self, index: int) -> LoopGroup | None:
        """The `LoopGroup` whose thread runs ring `index` beside other rings
        (None, the default: a thread of its own)."""
        return None

    def stop_queue(self, index: int) -> None:
        """Stop serving ring `index`; return only when nothing touches it any
        more. The loop finishes what was deferred and publishes every
        completion; chains the device holds untouched are abandoned (the
        transport offers them again on restart)."""
        loop = getattr(self, "loops", {}).pop(index, None)
        if loop is not None:
            loop.stop()

    def stop_queues(self) -> None:
        """Stop every ring (for `reset`)."""
        for i in list(getattr(self, "loops", {})):
            self.stop_queue(i)

    def enable_queue(self, index: int, enabled: bool) -> None:
        """The ring was enabled or disabled (a started ring keeps running;
        the service decides what disabled means: `queue.enabled`)."""
        loop = getattr(self, "loops", {}).get(index)
        if loop is not None:
            loop.set_enabled(enabled)

    def wake_all(self) -> None:
        """Every running loop looks at its service again (device state changed)."""
        for loop in list(getattr(self, "loops", {}).values()):
            loop.wake()

    def reset(self) -> None:
        """The driver reset the device or the front-end is gone; every ring is stopped."""

    def stats(self) -> dict[str, Any]:
        """Device-level facts for the stats JSON."""
        return {}

    def queue_role(self, index: int) -> str:
        """A short name of ring `index` for stats (net: rx0, tx0, ctrl)."""
        return f"q{index}"

    def close(self) -> None:
        """Release device resources (process exit)."""


__all__ = ["CallbackService", "Completion", "Service", "VirtioDevice"]
