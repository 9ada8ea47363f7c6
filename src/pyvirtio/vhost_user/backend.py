"""The device-independent vhost-user back-end: a state machine over decoded messages.

`Backend.handle(message)` applies one front-end request (feature and
protocol-feature negotiation, memory table, per-ring setup, status, config)
and returns the reply to send, if the request calls for one. It never touches
a socket: `pyvirtio.vhost_user.server` owns the connection and feeds it.

A device plugs in as a `pyvirtio.runtime.VirtioDevice`: it offers feature
bits, a config space and what it needs from the transport (multiqueue,
config, MTU, inflight tracking: mapped here to protocol features). Each
started ring runs in a `pyvirtio.runtime.QueueLoop` built here from the ring's
kick and call eventfds; the device only supplies the loop's `Service`.

Ring life cycle (see `reference/vhost-user.md` 2.4). Each ring has two
independent flags:

- *started*: it has a size (SET_VRING_NUM), addresses (SET_VRING_ADDR), a
  kick (SET_VRING_KICK, an eventfd or NOFD for polling) and guest memory; a
  worker serves it. GET_VRING_BASE stops it again (and closes its kick fd).
- *enabled*: SET_VRING_ENABLE. Once VHOST_USER_F_PROTOCOL_FEATURES (bit 30)
  is acked, rings start disabled until SET_VRING_ENABLE 1; without it they
  are enabled. A started but disabled ring is still served by its worker;
  the device decides what "disabled" means (net: drop tx, deliver no rx).

Split rings resume from SET_VRING_BASE's avail index and the used index read
from guest memory; when they differ the buffers in between are offered again
(last_avail := used->idx, as DPDK and libvhost-user do). GET_VRING_BASE
answers the used position for the same reason: chains the device holds but
never completed (rx buffers waiting for frames) are handed back, not lost.

The back-end request channel (BACKEND_REQ, offered with a config space):
SET_BACKEND_REQ_FD hands over a socket, kept per connection as a
`pyvirtio.vhost_user.channel.BackendChannel`. The device's
`config_changed()` lands in `notify_config_change`, which sends
CONFIG_CHANGE_MSG on it (NEED_REPLY with REPLY_ACK; the server thread
collects the ack, bounded by `channel_timeout`), or logs that the driver
cannot be told when the front-end set up no channel. While no ring runs
(no driver, or a guest rebooting) the message is held back and sent when a
ring starts: QEMU 7.2 acks but ignores it for a stopped vhost-user-blk
device and would keep handing the driver its old copy of the config.

RESET_DEVICE (offered) and the deprecated RESET_OWNER return the device to
its initial state on the same connection: every ring stopped and disabled,
ring sizes, addresses, bases and saved state forgotten, device state reset
(`VirtioDevice.reset`), features and status cleared. Ownership, the
negotiated protocol features, the memory table, the call/err eventfds and
the back-end channel are the connection's and stay; the front-end sets the
rest up again before it starts a ring.

Whose fault: anything the front-end asked for that cannot be done (a ring
address outside its memory, a feature it was never offered, a region past
the end of its file) raises `FrontendProtocolError`, and the server drops
the connection. A guest's broken ring (`QueueError`) only retires that ring.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from pyvirtio.dirtylog import DirtyLog, traced_ranges
from pyvirtio.memory import CountingMemory, GuestMemory, GuestMemoryError, Region
from pyvirtio.queue import Policy, QueueError, QueueState, Virtqueue, guest_used_idx
from pyvirtio.queue.virtqueue import QueueStats
from pyvirtio.runtime import Kick, QueueCounters, QueueLoop, VirtioDevice
from pyvirtio.spec import (
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    Feature,
    avail_size,
    is_power_of_two,
    used_size,
)
from pyvirtio.vhost_user.channel import ACK_TIMEOUT, BackendChannel, ChannelCounters, Notice, Outcome
from pyvirtio.vhost_user.codec import (
    U64,
    BackendReqFd,
    Config,
    Decoder,
    Features,
    FrontendProtocolError,
    InflightInfo,
    LogFd,
    LogInfo,
    MemoryRegion,
    MemRegMsg,
    Message,
    Rarp,
    SetMemTable,
    Status,
    VringAddr,
    VringFd,
    VringState,
    encode_ack,
    encode_inflight_reply,
    encode_reply,
    join_packed_vring_base,
    needs_reply,
    split_packed_vring_base,
)
from pyvirtio.vhost_user.inflight import InflightRegion, TrackedVirtqueue
from pyvirtio.vhost_user.protocol import (
    MAX_CONFIG_SIZE,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendRequest,
    ProtocolFeature,
    Request,
    VringAddrFlags,
)

log = logging.getLogger(__name__)

#: Protocol features the back-end itself implements for every device.
#: LOG_SHMFD (with the VHOST_F_LOG_ALL feature bit) is live migration: the
#: front-end's dirty bitmap, marked for every guest-memory write (dirtylog).
BASE_PROTOCOL_FEATURES = (ProtocolFeature.REPLY_ACK | ProtocolFeature.STATUS
                          | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.RESET_DEVICE
                          | ProtocolFeature.LOG_SHMFD)
#: feature bits that belong to the transport, not to the device
_TRANSPORT_FEATURES = VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL
#: Memory slots offered with CONFIGURE_MEM_SLOTS (libvhost-user's number).
MAX_MEM_SLOTS = 32

Reply = tuple[bytes, tuple[int, ...]]

#: requests a front-end may send only after negotiating a protocol feature
_NEEDS_PROTOCOL_FEATURE = {
    Request.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.REM_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.SET_STATUS: ProtocolFeature.STATUS,
    Request.GET_STATUS: ProtocolFeature.STATUS,
    Request.SET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
}


def _add_stats(total: QueueStats, s: QueueStats) -> None:
    for f in fields(QueueStats):
        setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))


def protocol_features_for(device: VirtioDevice) -> int:
    """The vhost-user protocol features a device's declared needs map to."""
    proto = 0
    if device.multiqueue or device.num_queues > 1:
        proto |= ProtocolFeature.MQ
    if device.config_space:  # a config space the device may change: the channel tells the driver
        proto |= ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ
    if device.mtu_control:
        proto |= ProtocolFeature.NET_MTU
    if device.inflight_tracking:
        proto |= ProtocolFeature.INFLIGHT_SHMFD
    if device.announces:
        proto |= ProtocolFeature.RARP
    return int(proto)


# --- per-ring back-end state --------------------------------------------------------


class _Ring:
    """The back-end's view of one vring (whether or not it runs)."""

    __slots__ = (
        "addr",
        "base",
        "call_fd",
        "counters",
        "enabled",
        "err_fd",
        "failed",
        "index",
        "kick_fd",
        "kick_set",
        "loop",
        "mem",
        "num",
        "retired_fds",
        "saved",
        "totals",
        "vq",
    )

    def __init__(self, index: int, mem: CountingMemory, counters: QueueCounters, totals: QueueStats) -> None:
        self.index = index
        self.mem = mem
        self.counters = counters
        self.totals = totals
        self.num: int | None = None
        self.addr: VringAddr | None = None
        self.base = 0
        self.kick_fd: int | None = None
        self.kick_set = False
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.vq: Virtqueue | None = None
        self.loop: QueueLoop | None = None
        self.failed = False
        self.retired_fds: list[int] = []
        self.saved: QueueState | None = None  # state of a ring paused for a memory change

    @property
    def started(self) -> bool:
        return self.vq is not None

    def close_fds(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd, *self.retired_fds):
            if fd is not None:
                _close(fd)
        self.kick_fd = self.call_fd = self.err_fd = None
        self.kick_set = False
        self.retired_fds.clear()


def _caller(ring: _Ring) -> Callable[[], None]:
    """A used-buffer notification on the ring's current call eventfd (the
    front-end may replace it at any time)."""
    def call() -> None:
        fd = ring.call_fd
        if fd is None:
            return
        try:
            os.eventfd_write(fd, 1)
        except OSError as e:  # closed by the front-end: the interrupt is lost, not fatal
            log.warning("ring %d: call eventfd write failed: %s", ring.index, e)
    return call


def _same_region(a: MemoryRegion, b: MemoryRegion) -> bool:
    return (a.guest_phys_addr, a.memory_size, a.userspace_addr, a.mmap_offset) == (
        b.guest_phys_addr, b.memory_size, b.userspace_addr, b.mmap_offset)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        log.debug("closing fd %d failed", fd, exc_info=True)


# --- the back-end ----------------------------------------------------------------


@dataclass(slots=True)
class _Session:
    """Per-connection negotiated state."""

    features: int = 0
    features_set: bool = False
    protocol_features: int = 0
    owner: bool = False
    status: int = 0
    slots: list[MemoryRegion] = field(default_factory=list)
    channel: BackendChannel | None = None  # SET_BACKEND_REQ_FD


class Backend:
    """vhost-user back-end state machine for one device.

    Usage: for each connection, `decoder()` gives a fresh `Decoder`; feed it
    and call `handle(msg)` for every message, sending back the returned reply
    (bytes and fds) in one `sendmsg`. `disconnect()` when the connection
    ends. Not thread-safe: one control thread drives it.
    """

    def __init__(self, device: VirtioDevice, *, policy: Policy = "lazy",
                 channel_timeout: float = ACK_TIMEOUT) -> None:
        if policy not in ("lazy", "eager"):
            raise ValueError(f"unknown policy {policy!r}")
        self.device = device
        self.policy = policy
        #: seconds a back-end request waits for the front-end's ack
        self.channel_timeout = channel_timeout
        self.channel_counters = ChannelCounters()
        #: called (from any thread) when the back-end channel changed or has a
        #: new deadline: the server re-reads `channel` and its sleep
        self.on_channel_change: Callable[[], None] | None = None
        self._notify_lock = threading.Lock()
        self._config_pending = False  # a config change no running driver was told of yet
        device.on_config_change = self.notify_config_change
        self.mem = GuestMemory()
        self.offered_features = int(device.features) | VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL
        self.offered_protocol = int(BASE_PROTOCOL_FEATURES) | protocol_features_for(device)
        self.session = _Session()
        self._rings = [_Ring(i, CountingMemory(self.mem), QueueCounters(), QueueStats())
                       for i in range(device.num_queues)]
        self._started_at = time.monotonic()
        self.connections = 0
        self._inflight: InflightRegion | None = None  # GET/SET_INFLIGHT_FD buffer (INFLIGHT_SHMFD)
        self._dirty: DirtyLog | None = None  # SET_LOG_BASE (LOG_SHMFD): the migration's dirty bitmap
        self._log_fd: int | None = None  # SET_LOG_FD
        self._dirty_totals = {"bases": 0, "pages_marked": 0, "marks": 0, "out_of_range": 0}
        self._handlers: dict[int, Callable[[Message], Any]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_device,
            Request.RESET_DEVICE: self._reset_device,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
            Request.NET_SET_MTU: self._net_set_mtu,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
            Request.SEND_RARP: self._send_rarp,
        }

    # -- connection life cycle ------------------------------------------------------

    def decoder(self) -> Decoder:
        """A decoder for a new connection (vring indices checked against the device)."""
        self.connections += 1
        return Decoder(max_queues=self.device.num_queues)

    def disconnect(self) -> None:
        """The front-end is gone: stop every ring, close its fds, unmap its memory."""
        for ring in self._rings:
            self._stop_ring(ring)
            ring.close_fds()
            ring.num = None
            ring.addr = None
            ring.base = 0
            ring.enabled = False
            ring.failed = False
            ring.saved = None
        self.device.reset()
        self._replace_dirty(None)
        if self._log_fd is not None:
            _close(self._log_fd)
            self._log_fd = None
        self._unmap_all()
        self._replace_inflight(None)
        self._replace_channel(None)
        self.session = _Session()

    def close(self) -> None:
        self.disconnect()
        self.device.close()

    # -- dispatch -------------------------------------------------------------------------

    def handle(self, msg: Message) -> Reply | None:
        """Apply one request; return the reply (bytes, fds) or None.

        Raises `FrontendProtocolError` when the front-end asked for
        something impossible; the caller must drop the connection (after
        `disconnect()`). The message's fds are owned here from now on.
        """
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s: %s", _name(msg.request), msg.body)
        kind = needs_reply(msg.request, msg.flags, self.session.protocol_features)
        needed = _NEEDS_PROTOCOL_FEATURE.get(Request(msg.request)) if msg.request in _NEEDS_PROTOCOL_FEATURE else None
        if needed is not None and not self.session.protocol_features & needed:
            msg.close_fds()
            raise FrontendProtocolError(f"{_name(msg.request)} without the negotiated {needed.name} "
                                        "protocol feature", msg.request)
        handler = self._handlers.get(msg.request)
        if handler is None:
            msg.close_fds()
            log.warning("frontend sent %s, which this back-end does not implement",
                        _name(msg.request))
            if kind == "ack":
                return encode_ack(msg, ok=False), ()
            if kind == "response":
                raise FrontendProtocolError(f"{_name(msg.request)}: not offered, cannot answer it",
                                            msg.request)
            return None
        result = handler(msg)
        if kind == "response":
            if isinstance(result, tuple):
                return result
            return encode_reply(msg, result), ()
        ok = result is not False
        if kind == "ack":
            return encode_ack(msg, ok), ()
        if not ok:
            log.warning("%s failed (the frontend did not ask for an ack)", _name(msg.request))
        return None

    # -- features ----------------------------------------------------------------

    def _get_features(self, msg: Message) -> int:
        return self.offered_features

    def _set_features(self, msg: Message) -> None:
        assert isinstance(msg.body, Features)
        value = msg.body.value
        extra = value & ~self.offered_features
        if extra:
            raise FrontendProtocolError(f"SET_FEATURES acks bits {extra:#x} that were never offered",
                                        msg.request)
        s = self.session
        device_bits = value & ~_TRANSPORT_FEATURES
        running = any(r.started for r in self._rings)
        if running and device_bits != s.features & ~_TRANSPORT_FEATURES:
            raise FrontendProtocolError(
                f"SET_FEATURES changes the features from {s.features:#x} to {value:#x} while rings run",
                msg.request)
        log_toggled = s.features_set and (value ^ s.features) & VHOST_F_LOG_ALL
        s.features = value
        s.features_set = True
        if log_toggled:  # migration starts or ends: the device sees no change
            log.info("%s: dirty logging %s", self.device.name, "on" if value & VHOST_F_LOG_ALL else "off")
            self._apply_logging()
            if running:
                return
        self.device.set_features(device_bits)
        # Without bit 30 every ring is enabled; with it, enabled rings stay so.
        for ring in self._rings:
            if ring.started:
                self.device.enable_queue(ring.index, self._effective_enabled(ring))

    def _get_protocol_features(self, msg: Message) -> int:
        return self.offered_protocol

    def _set_protocol_features(self, msg: Message) -> None:
        assert isinstance(msg.body, Features)
        value = msg.body.value
        extra = value & ~self.offered_protocol
        if extra:
            raise FrontendProtocolError(
                f"SET_PROTOCOL_FEATURES acks bits {extra:#x} that were never offered", msg.request)
        self.session.protocol_features = value

    def _set_owner(self, msg: Message) -> None:
        if self.session.owner:
            log.debug("SET_OWNER again on the same connection")
        self.session.owner = True

    def _reset_device(self, msg: Message) -> None:
        # RESET_DEVICE: "disable all rings and reset all internal device state
        # to the initial state, ready to be reinitialized"; the back-end keeps
        # ownership. RESET_OWNER (deprecated) gets the same treatment.
        for ring in self._rings:
            self._stop_ring(ring)
            ring.saved = None
            ring.failed = False
            ring.base = 0
            ring.num = None
            ring.addr = None
            ring.enabled = False
            if ring.kick_fd is not None:
                _close(ring.kick_fd)
            ring.kick_fd = None
            ring.kick_set = False
        self.device.reset()
        self.session.features = 0
        self.session.features_set = False
        self.session.status = 0
        log.info("%s: device reset (%s)", self.device.name, _name(msg.request))

    # -- the back-end request channel ---------------------------------------------

    @property
    def channel(self) -> BackendChannel | None:
        """This connection's back-end channel, if the front-end set one up."""
        return self.session.channel

    def _set_backend_req_fd(self, msg: Message) -> bool:
        assert isinstance(msg.body, BackendReqFd)
        if not self.session.protocol_features & ProtocolFeature.BACKEND_REQ:
            msg.close_fds()
            log.warning("SET_BACKEND_REQ_FD without the negotiated BACKEND_REQ protocol feature: refused")
            return False
        try:
            channel = BackendChannel(msg.body.fd, ack_timeout=self.channel_timeout,
                                     need_reply=bool(self.session.protocol_features & ProtocolFeature.REPLY_ACK),
                                     counters=self.channel_counters)
        except (OSError, ValueError) as e:
            msg.close_fds()
            log.warning("SET_BACKEND_REQ_FD: unusable socket (%s): refused", e)
            return False
        self._replace_channel(channel)
        log.info("back-end channel set up (acks %s)", "awaited" if channel.need_reply else "not asked")
        return True

    def _replace_channel(self, channel: BackendChannel | None) -> None:
        old, self.session.channel = self.session.channel, channel
        if old is not None:
            old.close()
        if channel is not None or old is not None:
            notify = self.on_channel_change
            if notify is not None:
                notify()

    def notify_config_change(self) -> Notice:
        """Tell the driver the device config changed: CONFIG_CHANGE_MSG on the
        back-end channel (thread-safe). The returned `Notice` says what became
        of it; `wait()` on it for the ack. While no ring runs the message is
        deferred to the next ring start (DEFERRED). Without a channel this is
        logged: the driver sees the new config only when it reads it again."""
        with self._notify_lock:
            if not any(r.started for r in self._rings):
                self._config_pending = True
                self.channel_counters.count(Outcome.DEFERRED)
                log.info("%s: config changed while no ring runs: CONFIG_CHANGE_MSG deferred until the "
                         "driver starts one", self.device.name)
                return Notice.final(BackendRequest.CONFIG_CHANGE_MSG, Outcome.DEFERRED)
            self._config_pending = False
        channel = self.session.channel
        if channel is None or channel.closed:
            self.channel_counters.count(Outcome.NO_CHANNEL)
            log.warning("%s: config changed, but the front-end set up no back-end channel (BACKEND_REQ): "
                        "the driver is not told until it reads the config again", self.device.name)
            return Notice.final(BackendRequest.CONFIG_CHANGE_MSG, Outcome.NO_CHANNEL)
        return channel.send(BackendRequest.CONFIG_CHANGE_MSG)

    # -- the dirty log (live migration) ---------------------------------------------

    def _set_log_base(self, msg: Message) -> int | None:
        assert isinstance(msg.body, LogInfo) and msg.body.fd is not None
        b = msg.body
        if not self.session.protocol_features & ProtocolFeature.LOG_SHMFD:
            msg.close_fds()
            log.warning("SET_LOG_BASE without the negotiated LOG_SHMFD protocol feature: ignored "
                        "(this back-end logs only into a shared-memory log)")
            return None
        try:
            assert b.fd is not None  # the decoder requires one
            dirty = DirtyLog.map_fd(b.fd, b.mmap_size, b.mmap_offset, self.mem)
        except (ValueError, OSError) as e:
            raise FrontendProtocolError(f"SET_LOG_BASE: cannot map the log: {e}", msg.request) from None
        finally:
            msg.close_fds()  # the map holds its own reference
        self._dirty_totals["bases"] += 1
        self._replace_dirty(dirty)
        log.info("%s: dirty log of %d bytes (covers %d MiB of guest memory)%s", self.device.name, dirty.size,
                 dirty.pages >> 8, "; TEST SWITCH: marks are skipped" if dirty.skip else "")
        return 0

    def _set_log_fd(self, msg: Message) -> None:
        assert isinstance(msg.body, LogFd)
        old, self._log_fd = self._log_fd, msg.body.fd
        if old is not None:
            _close(old)

    def _replace_dirty(self, dirty: DirtyLog | None) -> None:
        old, self._dirty = self._dirty, dirty
        self._apply_logging()
        if old is not None:
            old.retire(dirty)  # a mark racing with this lands in the new log
            for k in ("pages_marked", "marks", "out_of_range"):
                self._dirty_totals[k] += getattr(old, k)
            old.close()

    @property
    def logging(self) -> bool:
        """Is every guest-memory write being marked in a dirty log?"""
        return self._dirty is not None and bool(self.session.features & VHOST_F_LOG_ALL)

    def _apply_logging(self) -> None:
        for ring in self._rings:
            self._apply_ring_logging(ring)

    def _apply_ring_logging(self, ring: _Ring) -> None:
        vq = ring.vq
        if vq is None:
            return
        a = ring.addr
        used_log = a.log if a is not None and a.flags & VringAddrFlags.LOG else None
        vq.set_dirty_log(self._dirty if self.logging else None, used_log)

    def _dirty_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"active": self.logging, **self._dirty_totals}
        d = self._dirty
        if d is not None:
            for k in ("pages_marked", "marks", "out_of_range"):
                out[k] += getattr(d, k)
            out["size"] = d.size
            out["skip"] = d.skip
        written = traced_ranges()
        if written is not None:
            out["written_ranges"] = written
        return out

    def _send_rarp(self, msg: Message) -> bool:
        assert isinstance(msg.body, Rarp)
        if not self.session.protocol_features & ProtocolFeature.RARP:
            log.warning("SEND_RARP without the negotiated RARP protocol feature: ignored")
            return False
        mac = msg.body.mac
        done = self.device.announce(mac)
        log.info("%s: guest %s arrived (SEND_RARP): %s", self.device.name, mac.hex(":"),
                 "announced to the network" if done else "nothing to announce it to")
        return done

    def _get_queue_num(self, msg: Message) -> int:
        return self.device.queue_num

    # -- status and config --------------------------------------------------------

    def _set_status(self, msg: Message) -> None:
        assert isinstance(msg.body, Status)
        self.session.status = msg.body.value
        self.device.set_status(msg.body.value)

    def _get_status(self, msg: Message) -> int:
        return self.session.status

    def _get_config(self, msg: Message) -> Config | None:
        assert isinstance(msg.body, Config)
        c = msg.body
        space = self.device.config()
        if c.offset + c.size > len(space) or c.size > MAX_CONFIG_SIZE:
            log.warning("GET_CONFIG of %d bytes at %d: config space is %d bytes", c.size, c.offset, len(space))
            return None  # an empty reply: the front-end sees a failed read
        return Config(c.offset, c.size, c.flags, space[c.offset:c.offset + c.size])

    def _set_config(self, msg: Message) -> bool:
        assert isinstance(msg.body, Config)
        c = msg.body
        return self.device.set_config(c.offset, c.payload, c.flags)

    def _net_set_mtu(self, msg: Message) -> bool:
        assert isinstance(msg.body, U64)
        return self.device.set_mtu(msg.body.value)

    def _get_inflight_fd(self, msg: Message) -> Reply:
        assert isinstance(msg.body, InflightInfo)
        b = msg.body
        if not self.session.protocol_features & ProtocolFeature.INFLIGHT_SHMFD:
            return encode_inflight_reply(msg, InflightInfo(0, 0, b.num_queues, b.queue_size))  # "not supported"
        if b.num_queues > self.device.num_queues:
            raise FrontendProtocolError(f"GET_INFLIGHT_FD for {b.num_queues} queues; the device has "
                                        f"{self.device.num_queues}", msg.request)
        try:
            region = InflightRegion.allocate(b.num_queues, b.queue_size,
                                             bool(self.session.features & Feature.RING_PACKED))
        except ValueError as e:
            raise FrontendProtocolError(f"GET_INFLIGHT_FD: {e}", msg.request) from None
        self._replace_inflight(region)
        return encode_inflight_reply(msg, InflightInfo(region.mmap_size, 0, b.num_queues, b.queue_size, region.fd))

    def _set_inflight_fd(self, msg: Message) -> None:
        assert isinstance(msg.body, InflightInfo)
        b = msg.body
        assert b.fd is not None  # the decoder requires one
        try:
            fd = os.dup(b.fd)
        finally:
            msg.close_fds()
        try:
            region = InflightRegion(fd, b.mmap_size, b.mmap_offset, b.num_queues, b.queue_size,
                                    bool(self.session.features & Feature.RING_PACKED))
        except (ValueError, OSError) as e:
            os.close(fd)  # InflightRegion did not take it
            raise FrontendProtocolError(f"SET_INFLIGHT_FD: {e}", msg.request) from None
        self._replace_inflight(region)

    def _replace_inflight(self, region: InflightRegion | None) -> None:
        old, self._inflight = self._inflight, region
        if old is not None:
            old.close()  # running rings keep their views of the old map alive

    # -- memory ------------------------------------------------------------------------

    def _map(self, r: MemoryRegion, fd: int) -> Region:
        try:
            return Region.from_fd(fd, r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        except (GuestMemoryError, OSError, ValueError) as e:
            raise FrontendProtocolError(
                f"cannot map memory region gpa {r.guest_phys_addr:#x} size {r.memory_size:#x} "
                f"offset {r.mmap_offset:#x}: {e}") from None

    def _unmap_all(self) -> None:
        self.mem.close()  # clears the region lists shared with every CountingMemory
        self.session.slots = []
        gc.collect()  # chains and ring windows of stopped queues hold views into the maps

    def _pause_all(self) -> list[_Ring]:
        paused = []
        for ring in self._rings:
            if ring.started:
                ring.saved = self._stop_ring(ring)
                paused.append(ring)
        return paused

    def _resume(self, rings: list[_Ring]) -> None:
        for ring in rings:
            self._maybe_start(ring)

    def _set_mem_table(self, msg: Message) -> None:
        assert isinstance(msg.body, SetMemTable)
        table = msg.body
        paused = self._pause_all()
        try:
            self._unmap_all()
            regions = [self._map(r, fd) for r, fd in zip(table.regions, table.fds)]
        finally:
            msg.close_fds()  # the maps hold their own references to the files
        try:
            for region in regions:
                self.mem.add(region)
        except GuestMemoryError as e:
            for region in regions:
                region.close()
            self._unmap_all()
            raise FrontendProtocolError(f"SET_MEM_TABLE: {e}", msg.request) from None
        self.session.slots = list(table.regions)
        log.info("memory table: %s", ", ".join(
            f"gpa {r.guest_phys_addr:#x}+{r.memory_size:#x} uva {r.userspace_addr:#x}" for r in table.regions))
        self._resume(paused)

    def _get_max_mem_slots(self, msg: Message) -> int:
        return MAX_MEM_SLOTS

    def _add_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.body, MemRegMsg) and msg.body.fd is not None
        r = msg.body.region
        if any(_same_region(s, r) for s in self.session.slots):
            # QEMU 7.2 sends every region once per vhost_dev, i.e. once per net queue pair
            # (ADD_MEM_REG is not one of its "one time" requests): the same mapping, counted.
            msg.close_fds()
            self.session.slots.append(r)
            return
        if len({(s.guest_phys_addr, s.memory_size) for s in self.session.slots}) >= MAX_MEM_SLOTS:
            msg.close_fds()
            raise FrontendProtocolError(f"ADD_MEM_REG beyond the {MAX_MEM_SLOTS} slots offered", msg.request)
        try:
            region = self._map(r, msg.body.fd)
        finally:
            msg.close_fds()
        paused = self._pause_all()
        try:
            self.mem.add(region)
        except GuestMemoryError as e:
            region.close()
            raise FrontendProtocolError(f"ADD_MEM_REG: {e}", msg.request) from None
        self.session.slots.append(r)
        self._resume(paused)

    def _rem_mem_reg(self, msg: Message) -> bool:
        assert isinstance(msg.body, MemRegMsg)
        r = msg.body.region
        match = [s for s in self.session.slots if (s.guest_phys_addr, s.userspace_addr, s.memory_size)
                 == (r.guest_phys_addr, r.userspace_addr, r.memory_size)]
        if not match:
            log.warning("REM_MEM_REG of gpa %#x size %#x: no such region", r.guest_phys_addr, r.memory_size)
            return False
        if len(match) > 1:  # added by several vhost_devs (queue pairs): still in use
            self.session.slots.remove(match[0])
            return True
        paused = self._pause_all()
        region = self.mem.remove(r.guest_phys_addr, r.memory_size)
        self.session.slots.remove(match[0])
        del region
        gc.collect()
        self._resume(paused)
        return True

    # -- rings ----------------------------------------------------------------------

    def _ring(self, msg: Message, index: int) -> _Ring:
        # The decoder already refused indices >= num_queues.
        return self._rings[index]

    def _set_vring_num(self, msg: Message) -> None:
        assert isinstance(msg.body, VringState)
        ring = self._ring(msg, msg.body.index)
        num = msg.body.num
        if not 1 <= num <= min(self.device.queue_size_max, MAX_QUEUE_SIZE):
            raise FrontendProtocolError(
                f"SET_VRING_NUM: ring {ring.index} size {num} is not in 1..{self.device.queue_size_max}",
                msg.request)
        if ring.started:
            raise FrontendProtocolError(f"SET_VRING_NUM: ring {ring.index} is running", msg.request)
        ring.num = num
        ring.saved = None

    def _set_vring_base(self, msg: Message) -> None:
        assert isinstance(msg.body, VringState)
        ring = self._ring(msg, msg.body.index)
        if ring.started:
            raise FrontendProtocolError(f"SET_VRING_BASE: ring {ring.index} is running", msg.request)
        ring.base = msg.body.num
        ring.saved = None

    def _set_vring_addr(self, msg: Message) -> None:
        assert isinstance(msg.body, VringAddr)
        ring = self._ring(msg, msg.body.index)
        old = ring.addr
        if ring.started and old is not None and (old.desc, old.avail, old.used) == (
                msg.body.desc, msg.body.avail, msg.body.used):
            # QEMU re-sends the same addresses to toggle used-ring logging
            ring.addr = msg.body
            self._apply_ring_logging(ring)
            return
        if ring.started:
            ring.saved = self._stop_ring(ring)
            ring.addr = msg.body
            self._maybe_start(ring)
            return
        ring.addr = msg.body
        if self.mem.regions and ring.num is not None:
            self._translate(ring, ring.num, bool(self.session.features & Feature.RING_PACKED))

    def _get_vring_base(self, msg: Message) -> VringState:
        assert isinstance(msg.body, VringState)
        ring = self._ring(msg, msg.body.index)
        state = self._stop_ring(ring) if ring.started else ring.saved
        ring.saved = None
        if state is not None:
            # The spec's value: the next index to process in the available
            # ring. Stopping the loop finished what the device had started
            # and handed back (rewound) what it held untouched, so nothing is
            # in flight and, however requests completed (out of order
            # included), used == avail here.
            if state.in_flight:
                log.error("ring %d: stopped with %d chains still in flight (a device that did not finish); "
                          "they are lost to this hand-over", ring.index, len(state.in_flight))
            if state.packed:
                ring.base = join_packed_vring_base(state.last_avail, state.avail_wrap,
                                                   state.used_idx, state.used_wrap)
            else:
                ring.base = state.last_avail
        if ring.kick_fd is not None:
            _close(ring.kick_fd)
        ring.kick_fd = None
        ring.kick_set = False
        ring.failed = False
        for fd in ring.retired_fds:
            _close(fd)
        ring.retired_fds.clear()
        return VringState(ring.index, ring.base)

    def _set_vring_kick(self, msg: Message) -> None:
        assert isinstance(msg.body, VringFd)
        ring = self._ring(msg, msg.body.index)
        saved = self._stop_ring(ring) if ring.started else None
        if ring.kick_fd is not None:
            _close(ring.kick_fd)
        ring.kick_fd = msg.body.fd
        ring.kick_set = True
        ring.failed = False
        if saved is not None:
            ring.saved = saved
        self._maybe_start(ring)

    def _set_vring_call(self, msg: Message) -> None:
        assert isinstance(msg.body, VringFd)
        ring = self._ring(msg, msg.body.index)
        old, ring.call_fd = ring.call_fd, msg.body.fd
        if old is not None:
            if ring.started:
                ring.retired_fds.append(old)  # the worker may be writing it right now
            else:
                _close(old)
        if ring.started and msg.body.fd is not None and ring.loop is not None:
            # QEMU swaps the call fd just after it starts a ring (seen at
            # every migration's destination): a notification the loop sent
            # meanwhile went to the old fd and is lost, and with EVENT_IDX
            # the driver is not notified again until its used_event is
            # crossed, which it may never be. One notification on the new
            # fd (spurious at worst, which every driver handles) closes that
            # window.
            ring.loop.signal()

    def _set_vring_err(self, msg: Message) -> None:
        assert isinstance(msg.body, VringFd)
        ring = self._ring(msg, msg.body.index)
        old, ring.err_fd = ring.err_fd, msg.body.fd
        if old is not None:
            if ring.started:
                ring.retired_fds.append(old)
            else:
                _close(old)

    def _set_vring_enable(self, msg: Message) -> None:
        assert isinstance(msg.body, VringState)
        ring = self._ring(msg, msg.body.index)
        ring.enabled = bool(msg.body.num)
        if ring.started:
            self.device.enable_queue(ring.index, self._effective_enabled(ring))

    def _effective_enabled(self, ring: _Ring) -> bool:
        if not self.session.features & VHOST_USER_F_PROTOCOL_FEATURES:
            return True
        return ring.enabled

    # -- starting and stopping rings -----------------------------------------------------

    def _translate(self, ring: _Ring, num: int, packed: bool) -> tuple[int, int, int]:
        """Ring addresses (front-end virtual) to guest-physical."""
        a = ring.addr
        assert a is not None
        if packed:
            sizes = (DESC_SIZE * num, 4, 4)
        elif self.session.features & Feature.RING_EVENT_IDX:  # used_event / avail_event at the ends
            sizes = (DESC_SIZE * num, avail_size(num), used_size(num))
        else:
            sizes = (DESC_SIZE * num, avail_size(num) - 2, used_size(num) - 2)
        out = []
        for what, uva, size in (("descriptor", a.desc, sizes[0]), ("driver", a.avail, sizes[1]),
                                ("device", a.used, sizes[2])):
            try:
                out.append(self.mem.uva_to_gpa(uva, size))
            except GuestMemoryError:
                raise FrontendProtocolError(
                    f"SET_VRING_ADDR: ring {ring.index} {what} area at {uva:#x} (+{size:#x}) is outside "
                    f"the frontend's memory", Request.SET_VRING_ADDR) from None
        return out[0], out[1], out[2]

    def _maybe_start(self, ring: _Ring) -> None:
        if (ring.started or ring.failed or ring.num is None or ring.addr is None
                or not ring.kick_set or not self.mem.regions):
            return
        s = self.session
        if not s.features_set:  # the ring layout depends on the features (VERSION_1, RING_PACKED)
            raise FrontendProtocolError(f"ring {ring.index} would start before SET_FEATURES",
                                        Request.SET_VRING_KICK)
        features = s.features & ~_TRANSPORT_FEATURES
        packed = bool(features & Feature.RING_PACKED)
        num = ring.num
        if not packed and not is_power_of_two(num):
            raise FrontendProtocolError(f"ring {ring.index}: split ring size {num} is not a power of two",
                                        Request.SET_VRING_NUM)
        desc, driver, device = self._translate(ring, num, packed)
        state = ring.saved
        ring.saved = None
        if state is not None and (state.size != num or state.packed != packed):
            state = None
        tracker = None if self._inflight is None else self._inflight.tracker(ring.index, num, packed, ring.mem,
                                                                             desc)
        if state is None or tracker is not None:  # with inflight tracking the buffer is the truth
            state = self._initial_state(ring, num, packed, device)
            if tracker is not None:
                state = tracker.resume(state)
        name = f"{self.device.name}.{self.device.queue_role(ring.index)}"
        try:
            if tracker is None:
                vq = Virtqueue(ring.mem, num, desc, driver, device, features=features, policy=self.policy,
                               state=state, name=name)
            else:
                vq = TrackedVirtqueue(ring.mem, num, desc, driver, device, features=features,
                                      policy=self.policy, state=state, name=name, tracker=tracker)
        except QueueError as e:
            raise FrontendProtocolError(f"ring {ring.index}: {e}", Request.SET_VRING_KICK) from None
        ring.vq = vq
        self._apply_ring_logging(ring)
        ring.counters.starts += 1
        loop = QueueLoop(vq, None if ring.kick_fd is None else Kick(ring.kick_fd), _caller(ring),
                         index=ring.index, counters=ring.counters, on_fail=self._on_queue_fail,
                         enabled=self._effective_enabled(ring))
        ring.loop = loop
        log.info("%s: started (%s ring of %d, kick %s, call %s, base %#x)", name,
                 "packed" if packed else "split", num,
                 "polling" if ring.kick_fd is None else f"fd {ring.kick_fd}",
                 "none" if ring.call_fd is None else f"fd {ring.call_fd}", ring.base)
        self.device.start_queue(loop)
        if tracker is not None and tracker.reconnected:
            loop.signal()  # an interrupt lost with the previous back-end would stall the driver
        with self._notify_lock:
            pending = self._config_pending
        if pending:
            log.info("%s: telling the driver of the config change deferred while no ring ran", self.device.name)
            self.notify_config_change()

    def _initial_state(self, ring: _Ring, num: int, packed: bool, used_gpa: int) -> QueueState:
        base = ring.base
        if packed:
            b = split_packed_vring_base(base)
            if base >> 16 == 0:  # DPDK virtio-user sends only the avail half: used = avail
                used, used_wrap = b.avail_idx, b.avail_wrap
            else:
                used, used_wrap = b.used_idx, b.used_wrap
            for what, idx in (("avail", b.avail_idx), ("used", used)):
                if idx >= num:
                    raise FrontendProtocolError(
                        f"SET_VRING_BASE: ring {ring.index} {what} index {idx} is beyond its {num} slots",
                        Request.SET_VRING_BASE)
            if (b.avail_idx, b.avail_wrap) != (used, used_wrap):
                log.info("ring %d: avail %d/%d ahead of used %d/%d: offering those buffers again",
                         ring.index, b.avail_idx, b.avail_wrap, used, used_wrap)
            return QueueState(num, True, used, used_wrap, used, used_wrap)
        try:
            used = guest_used_idx(ring.mem, used_gpa)
        except GuestMemoryError as e:
            raise FrontendProtocolError(f"ring {ring.index}: used ring: {e}", Request.SET_VRING_ADDR) from None
        last_avail = base & 0xFFFF
        if last_avail != used:
            log.info("ring %d: SET_VRING_BASE %d but used->idx is %d: resuming from %d",
                     ring.index, last_avail, used, used)
        return QueueState(num, False, used, True, used, True)

    def _stop_ring(self, ring: _Ring) -> QueueState | None:
        """Stop the worker; return the ring's state (None if it was not started)."""
        vq = ring.vq
        if vq is None:
            return None
        try:
            self.device.stop_queue(ring.index)
        finally:
            ring.vq = None
            ring.loop = None
        _add_stats(ring.totals, vq.stats)
        try:
            vq.flush()  # a device that left completions unpublished: publish them now
            state = vq.save()
        except Exception:
            log.exception("%s: could not save the ring state", vq.name)
            state = None
        for fd in ring.retired_fds:
            _close(fd)
        ring.retired_fds.clear()
        return state

    def _on_queue_fail(self, index: int, exc: BaseException) -> None:
        """Called from a worker thread: the guest broke ring `index`."""
        ring = self._rings[index]
        ring.counters.errors += 1
        ring.failed = True
        if isinstance(exc, QueueError):
            log.error("%s: guest ring error, ring retired: %s: %s", ring.loop.vq.name if ring.loop else index,
                      type(exc).__name__, exc)
        fd = ring.err_fd
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError as e:
                log.warning("ring %d: error eventfd write failed: %s", index, e)

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters of every queue, as plain data for JSON."""
        queues = []
        totals: dict[str, int] = {}
        for ring in self._rings:
            c = ring.counters
            vqs = QueueStats()
            _add_stats(vqs, ring.totals)
            vq = ring.vq
            if vq is not None:
                _add_stats(vqs, vq.stats)
            snap = ring.mem.snapshot()
            accesses = int(snap["reads"]) + int(snap["writes"])  # type: ignore[call-overload]
            meta = int(snap["metadata_reads"]) + int(snap["metadata_writes"])  # type: ignore[call-overload]
            if not c.starts and not vqs.chains:
                continue
            n = c.packets or vqs.chains
            q: dict[str, Any] = {"index": ring.index, "role": self.device.queue_role(ring.index),
                                 "running": vq is not None, "enabled": ring.enabled, **c.as_dict()}
            q["ring"] = {f.name: getattr(vqs, f.name) for f in fields(QueueStats)}
            areas: dict[str, dict[str, int]] = snap["areas"]  # type: ignore[assignment]
            q["accesses"] = {"total": accesses, "metadata": meta, "fences": snap["fences"],
                             "areas": {k: v["reads"] + v["writes"] for k, v in areas.items()}}
            if n:
                q["per_packet"] = {"kicks": round(c.kick_count / n, 4),
                                   "interrupts": round(c.interrupts / n, 4),
                                   "accesses": round(accesses / n, 4),
                                   "metadata_accesses": round(meta / n, 4)}
            queues.append(q)
            for k, v in c.as_dict().items():
                totals[k] = totals.get(k, 0) + v
        return {"device": self.device.name, "policy": self.policy,
                "uptime_s": round(time.monotonic() - self._started_at, 3),
                "connections": self.connections, "features": self.session.features,
                "status": self.session.status,
                "dirty_log": self._dirty_stats(),
                "backend_channel": {"up": self.session.channel is not None and not self.session.channel.closed,
                                    **self.channel_counters.as_dict()},
                **self.device.stats(), "totals": totals, "queues": queues}


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


__all__ = [
    "BASE_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "Backend",
    "protocol_features_for",
]
