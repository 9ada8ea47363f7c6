"""A vhost-user *front-end* for virtio-net: the guest side, in Python.

`VhostUserFrontend` connects to any vhost-user-net back-end socket (ours,
DPDK's `net_vhost`, anything QEMU could use), shares a memfd as guest memory,
negotiates features, sets up one receive queue (ring 0) and one transmit
queue (ring 1) with the driver models (`SplitDriver` / `PackedDriver`), and
moves Ethernet frames: `send(frames)` and `recv(timeout)`. It is what
`pyvirtio probe` and `pyvirtio bench net` stand on.

Message flow (what a back-end sees, in order)::

    SET_OWNER, GET_FEATURES, [GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
    GET_QUEUE_NUM], SET_FEATURES, [SET_STATUS 0x0b, GET_STATUS],
    SET_MEM_TABLE, per ring: SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR,
    SET_VRING_CALL, SET_VRING_KICK, [SET_VRING_ENABLE 1], [SET_STATUS 0x0f]
    ... traffic ...
    stop: GET_VRING_BASE per ring

Bracketed steps happen when the back-end offers the matching feature
(VHOST_USER_F_PROTOCOL_FEATURES, MQ, STATUS). With `backend_channel=True`
and BACKEND_REQ offered, SET_BACKEND_REQ_FD follows the protocol features
(where QEMU sends it): a `BackendChannelEnd` then receives the back-end's
requests (CONFIG_CHANGE_MSG) and acks them; `poll_backend()` serves it. With REPLY_ACK every request
without a reply of its own is sent with NEED_REPLY (`ack_all=True`, the
default) or only SET_MEM_TABLE is (`ack_all=False`, what QEMU does), so a
refusal surfaces at the message that caused it. Without REPLY_ACK a
GET_FEATURES after SET_MEM_TABLE serves as the barrier, as in QEMU.

Addresses: the one memory region has guest-physical base `gpa_base` (default
0) and, as `userspace_addr`, this process's real virtual address of the
mapping, so ring addresses (SET_VRING_ADDR) are front-end virtual addresses
and descriptor addresses are guest-physical, two different numbers: a
back-end that mixes the two translations fails visibly.

Not thread-safe; one thread drives a frontend.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import select
import socket
import struct
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Self

import numpy as np

from pyvirtio import spec
from pyvirtio.driver.common import (
    BufferPool,
    DeviceProtocolError,
    QueueFullError,
    VirtqueueDriver,
    ring_layout,
)
from pyvirtio.driver.packed import PackedDriver
from pyvirtio.driver.split import SplitDriver
from pyvirtio.memory import GuestMemory, Region
from pyvirtio.spec import DeviceStatus, NetFeature
from pyvirtio.vhost_user import (
    MAX_FDS,
    U64,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendReqFd,
    BackendRequestDecoder,
    Features,
    LogInfo,
    MemoryRegion,
    Message,
    ProtocolError,
    ProtocolFeature,
    ReplyDecoder,
    Request,
    SetMemTable,
    Status,
    VringAddr,
    VringAddrFlags,
    VringFd,
    VringState,
    encode_backend_ack,
    encode_request,
)
from pyvirtio.vhost_user.protocol import REQUESTS_WITH_RESPONSE

log = logging.getLogger(__name__)

#: Ring indices of the single queue pair.
RX_QUEUE = 0
TX_QUEUE = 1

#: struct virtio_net_hdr_v1 (VERSION_1: always 12 bytes, `num_buffers` at 10).
NET_HDR_SIZE = 12
_NUM_BUFFERS_OFF = 10

#: Largest frame `send` accepts: an untagged Ethernet frame without FCS plus
#: a VLAN tag (no TSO is negotiated, so nothing larger can be sent or received).
MAX_FRAME = 1518


def feature_names(bits: int) -> list[str]:
    """Names of the feature bits in a vhost-user GET/SET_FEATURES word:
    transport bits, virtio-net bits, PROTOCOL_FEATURES (30), LOG_ALL (26);
    unknown bits as `bit N`."""
    names = []
    for n in range(64):
        b = 1 << n
        if not bits & b:
            continue
        if b == VHOST_USER_F_PROTOCOL_FEATURES:
            names.append("PROTOCOL_FEATURES")
        elif b == VHOST_F_LOG_ALL:
            names.append("LOG_ALL")
        elif b in spec.Feature._value2member_map_:
            names.append(spec.Feature(b).name or f"bit {n}")
        elif b in NetFeature._value2member_map_:
            names.append(NetFeature(b).name or f"bit {n}")
        else:
            names.append(f"bit {n}")
    return names


def protocol_feature_names(bits: int) -> list[str]:
    """Names of the bits of a GET/SET_PROTOCOL_FEATURES word."""
    names = []
    for n in range(64):
        b = 1 << n
        if bits & b:
            names.append(ProtocolFeature(b).name or f"bit {n}"
                         if b in ProtocolFeature._value2member_map_ else f"bit {n}")
    return names


class FrontendError(Exception):
    """The back-end did not do what the front-end needs: it refused a request
    (a failure ack), lacks a required feature, did not answer in time, or
    hung up. Protocol violations (bad reply framing) raise the codec's
    `BackendProtocolError` instead. Either way the connection is unusable."""


class BackendChannelEnd:
    """The front-end's end of the back-end request channel (SET_BACKEND_REQ_FD).

    Makes a socket pair: `theirs` goes to the back-end (send it with
    SET_BACKEND_REQ_FD, then `release_theirs()`), the other end stays here.
    `poll(timeout)` reads the back-end's requests, runs `handler(msg)` on
    each (what QEMU does: for CONFIG_CHANGE_MSG it re-reads the config with
    GET_CONFIG on the main socket, then answers) and, when the request set
    NEED_REPLY, acks it: 0 when the handler returned True, 1 otherwise.
    `answer=False` models a front-end that never acks (the back-end must
    not hang on it). Requests received are kept in `received`.
    """

    def __init__(self, handler: Callable[[Message], bool] | None = None, *, answer: bool = True) -> None:
        self._sock, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.handler = handler
        self.answer = answer
        self.received: list[Message] = []
        self.acks_sent = 0
        self._decoder = BackendRequestDecoder()

    def fileno(self) -> int:
        return self._sock.fileno()

    def release_theirs(self) -> None:
        """Close our copy of the back-end's end (after it was sent)."""
        self.theirs.close()

    def poll(self, timeout: float = 0.0) -> list[Message]:
        """Serve the requests that arrive within `timeout` seconds (at least
        those already there); returns them. Raises `BackendProtocolError` for
        a malformed request, `FrontendError` when the back-end closed it."""
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            r, _, _ = select.select([self._sock], [], [], left if not out else 0)
            if not r:
                return out
            data, anc, _flags, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(MAX_FDS * 4))
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array("i")
                    a.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(a)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise FrontendError("the back-end closed its request channel")
            self._decoder.feed(data, fds)
            while True:
                msg = self._decoder.next_message()
                if msg is None:
                    break
                msg.close_fds()
                self.received.append(msg)
                out.append(msg)
                ok = self.handler(msg) if self.handler is not None else True
                if msg.need_reply and self.answer:
                    self._sock.sendall(encode_backend_ack(msg, ok))
                    self.acks_sent += 1

    def close(self) -> None:
        self._sock.close()
        self.theirs.close()
        self._decoder.close()


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _mapping_address(region: Region) -> int:
    """This process's virtual address of `region`'s first byte."""
    c = ctypes.c_char.from_buffer(region.mv)  # the buffer export ends with `c`
    try:
        return ctypes.addressof(c)
    finally:
        del c


class VhostUserFrontend:
    """A vhost-user-net front-end with one queue pair.

    Contract:

    - `connect()` (or `with VhostUserFrontend(...) as fe:`) performs the whole
      negotiation and ring setup; afterwards the receive ring is full of
      `rx_buffer_size`-byte writable buffers and the device is DRIVER_OK.
    - `send(frames)` queues Ethernet frames (each <= `MAX_FRAME` bytes, a
      zero virtio_net_hdr in front) on the transmit ring, kicking when the
      driver model says the back-end wants it; it waits for completions only
      while the ring is full. `flush(timeout)` waits until every sent frame
      was consumed.
    - `recv(timeout)` returns the frames the back-end delivered (header
      stripped, mergeable buffers joined), waiting up to `timeout` seconds for
      the first one on the call eventfd; received buffers are reposted at once.
    - `stop()` sends GET_VRING_BASE for both rings (the back-end stops them)
      and returns the reported bases; traffic methods raise afterwards.
    - `close()` (also on context exit) stops if still running, then closes the
      socket, eventfds, the memfd and the mapping. Idempotent.

    Failures raise `FrontendError` (the back-end refused or vanished) or the
    codec's `BackendProtocolError`; `DeviceProtocolError` from the driver
    models means the back-end corrupted a ring.
    """

    def __init__(self, socket_path: str, *, packed: bool = False, queue_size: int = 256,
                 event_idx: bool = False, mrg_rxbuf: bool = False, indirect: bool = False,
                 tx_segments: int = 1, rx_buffer_size: int = 2048, gpa_base: int = 0,
                 want_protocol_features: int = int(ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ
                                                   | ProtocolFeature.STATUS | ProtocolFeature.LOG_SHMFD),
                 ack_all: bool = True, timeout: float = 5.0, connect_timeout: float = 5.0,
                 backend_channel: bool = False,
                 on_backend_request: Callable[[Message], bool] | None = None) -> None:
        """Configure; nothing is opened until `connect()`.

        `packed` requires RING_PACKED from the back-end (else `FrontendError`);
        `event_idx`, `mrg_rxbuf`, `indirect` are negotiated only if offered.
        `tx_segments` 1 puts header and frame in one descriptor, 2 in two (an
        indirect table when INDIRECT_DESC was negotiated). `rx_buffer_size`
        must hold a header and a full frame unless MRG_RXBUF is negotiated.
        `timeout` bounds each wait for a reply or a ring slot;
        `connect_timeout` how long to retry a socket that does not accept yet.
        `backend_channel`: negotiate BACKEND_REQ when offered and hand the
        back-end a request channel (`self.channel`), whose requests go to
        `on_backend_request` (default: acked with success).
        """
        if tx_segments not in (1, 2):
            raise ValueError(f"tx_segments must be 1 or 2, not {tx_segments}")
        if rx_buffer_size < NET_HDR_SIZE + 64 or rx_buffer_size % 16:
            raise ValueError(f"rx_buffer_size {rx_buffer_size} must be a multiple of 16 of at least "
                             f"{NET_HDR_SIZE + 64}")
        if not mrg_rxbuf and rx_buffer_size < NET_HDR_SIZE + MAX_FRAME:
            raise ValueError(f"without MRG_RXBUF an rx buffer must hold {NET_HDR_SIZE + MAX_FRAME} bytes")
        self.socket_path = socket_path
        self.packed = packed
        self.queue_size = queue_size
        self.want_event_idx = event_idx
        self.want_mrg_rxbuf = mrg_rxbuf
        self.want_indirect = indirect
        self.tx_segments = tx_segments
        self.rx_buffer_size = rx_buffer_size
        self.gpa_base = gpa_base
        self.want_protocol_features = want_protocol_features
        self.ack_all = ack_all
        self.want_backend_channel = backend_channel
        self.on_backend_request = on_backend_request
        #: the back-end request channel, once set up
        self.channel: BackendChannelEnd | None = None
        self.timeout = timeout
        self.connect_timeout = connect_timeout

        #: what the back-end offered / what was acked (None before connect)
        self.offered_features: int | None = None
        self.features: int | None = None
        self.offered_protocol_features: int | None = None
        self.protocol_features: int | None = None
        #: GET_QUEUE_NUM (queue pairs, when MQ was negotiated)
        self.queue_num: int | None = None
        #: status byte read back with GET_STATUS (STATUS negotiated)
        self.device_status: int | None = None
        #: GET_VRING_BASE replies by ring index, once `stop()` ran
        self.vring_bases: dict[int, int] = {}
        #: counters: frames, kicks sent, call notifications consumed, waits
        self.stats: dict[str, int] = dict.fromkeys(
            ("tx_frames", "rx_frames", "rx_buffers", "tx_kicks", "rx_kicks", "tx_calls", "rx_calls",
             "tx_full_waits"), 0)

        self._sock: socket.socket | None = None
        self._decoder: ReplyDecoder | None = None
        self._memfd = -1
        self.mem: GuestMemory | None = None
        self._mv: memoryview | None = None
        self._kick: list[int] = []
        self._call: list[int] = []
        self.rx: VirtqueueDriver | None = None
        self.tx: VirtqueueDriver | None = None
        self._rx_bufs: list[int] = []  # gpa per rx buffer token
        self._tx_free: list[int] = []  # free tx buffer indices
        self._tx_gpa: list[int] = []
        self._rx_partial: list[bytes] = []
        self._rx_partial_left = 0
        self._running = False
        self._closed = False
        self._log_fd = -1
        self._log_map: mmap.mmap | None = None
        self._ring_addrs: dict[int, tuple[int, int, int]] = {}

    # -- context manager ------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- messaging ---------------------------------------------------------------------

    @property
    def reply_ack(self) -> bool:
        return bool((self.protocol_features or 0) & ProtocolFeature.REPLY_ACK)

    def _send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        assert self._sock is not None
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
        try:
            sent = self._sock.sendmsg([data], anc)
        except OSError as exc:
            raise FrontendError(f"sending to the back-end failed: {exc}") from exc
        if sent != len(data):  # a stream socket sends all or blocks; be loud if not
            raise FrontendError(f"short send to the back-end ({sent} of {len(data)} bytes)")

    def _read_reply(self, request: int) -> Message:
        assert self._sock is not None and self._decoder is not None
        dec = self._decoder
        name = Request(request).name
        deadline = time.monotonic() + self.timeout
        while True:
            msg = dec.next_message(expect=request)
            if msg is not None:
                msg.close_fds()
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrontendError(f"no reply to {name} within {self.timeout:g} s")
            self._sock.settimeout(left)
            try:
                data, anc, flags, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(MAX_FDS * 4))
            except TimeoutError:
                raise FrontendError(f"no reply to {name} within {self.timeout:g} s") from None
            except OSError as exc:
                raise FrontendError(f"reading the reply to {name} failed: {exc}") from exc
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array("i")
                    a.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(a)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise FrontendError(f"the back-end closed the connection while we waited for {name}")
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise FrontendError(f"reply to {name} carried more fds than any reply may")
            dec.feed(data, fds)

    def request(self, request: Request, body: object = None, *, fds: Sequence[int] = (),
                need_reply: bool | None = None) -> Message | None:
        """Send one request; return its reply (GET_* requests) or None.

        `need_reply=None` applies the instance policy (REPLY_ACK negotiated and
        `ack_all`); with NEED_REPLY the ack is awaited and a non-zero ack
        raises `FrontendError`. `fds` are attached as SCM_RIGHTS (for requests
        whose body names no fd; typed bodies carry their own).
        """
        if need_reply is None:
            need_reply = self.reply_ack and self.ack_all
        has_response = request in REQUESTS_WITH_RESPONSE
        if has_response:
            need_reply = False
        data, body_fds = encode_request(request, body, need_reply=need_reply)  # type: ignore[arg-type]
        log.debug("-> %s %s%s", request.name, body if body is not None else "",
                  " (need reply)" if need_reply else "")
        self._send(data, tuple(body_fds) + tuple(fds))
        if has_response:
            return self._read_reply(request)
        if need_reply:
            msg = self._read_reply(request)
            value = msg.body.value if isinstance(msg.body, U64) else None
            if value != 0:
                raise FrontendError(f"the back-end refused {request.name} (ack {value})")
            return msg
        return None

    def _u64(self, request: Request) -> int:
        msg = self.request(request)
        assert msg is not None
        body = msg.body
        if isinstance(body, (Features, U64, Status)):
            return body.value
        raise FrontendError(f"{request.name}: unexpected reply body {body!r}")

    # -- setup ---------------------------------------------------------------------------

    def _connect_socket(self) -> socket.socket:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.socket_path)
                return s
            except OSError as exc:
                s.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED) or time.monotonic() >= deadline:
                    raise FrontendError(f"cannot connect to {self.socket_path}: {exc}") from exc
            time.sleep(0.05)

    def _layout(self) -> tuple[int, dict[str, int]]:
        """Place rings, indirect-table pool, tx and rx buffers; return the
        region size and the offsets."""
        q = self.queue_size
        off: dict[str, int] = {}
        pos = 0
        for name in ("rx", "tx"):
            off[name] = pos
            pos = ring_layout(self.packed, q, pos)[3]
        pos = (pos + 4095) & ~4095
        off["pool"] = pos
        pos += 64 * q + 4096  # indirect tables: 2 descriptors (32 bytes) per tx buffer
        pos = (pos + 4095) & ~4095
        off["tx_bufs"] = pos
        pos += q * 2048
        off["rx_bufs"] = pos
        pos += q * self.rx_buffer_size
        size = (pos + (1 << 21) - 1) & ~((1 << 21) - 1)
        return size, off

    def connect(self) -> None:
        """Connect, negotiate, share memory and start both rings (see the
        module docstring for the message sequence). Raises `FrontendError`."""
        if self._closed:
            raise FrontendError("this frontend was closed; make a new one")
        if self._sock is not None:
            raise FrontendError("already connected")
        self._sock = self._connect_socket()
        self._decoder = ReplyDecoder(max_queues=256)
        self.request(Request.SET_OWNER, need_reply=False)
        offered = self._u64(Request.GET_FEATURES)
        self.offered_features = offered
        want = int(spec.Feature.VERSION_1)
        if not offered & spec.Feature.VERSION_1:
            raise FrontendError(f"the back-end does not offer VERSION_1 (offers {offered:#x})")
        if self.packed:
            if not offered & spec.Feature.RING_PACKED:
                raise FrontendError("the back-end does not offer RING_PACKED")
            want |= spec.Feature.RING_PACKED
        if self.want_event_idx:
            want |= spec.Feature.RING_EVENT_IDX
        if self.want_indirect:
            want |= spec.Feature.RING_INDIRECT_DESC
        if self.want_mrg_rxbuf:
            want |= NetFeature.MRG_RXBUF
        if offered & VHOST_USER_F_PROTOCOL_FEATURES:
            want |= VHOST_USER_F_PROTOCOL_FEATURES
            pf = self._u64(Request.GET_PROTOCOL_FEATURES)
            self.offered_protocol_features = pf
            self.protocol_features = 0  # no acks until SET_PROTOCOL_FEATURES is through
            want_pf = self.want_protocol_features
            if self.want_backend_channel:
                want_pf |= ProtocolFeature.BACKEND_REQ
            acked = pf & want_pf
            self.request(Request.SET_PROTOCOL_FEATURES, Features(acked), need_reply=False)
            self.protocol_features = acked
            if acked & ProtocolFeature.MQ:
                self.queue_num = self._u64(Request.GET_QUEUE_NUM)
            if acked & ProtocolFeature.BACKEND_REQ:
                self._setup_backend_channel()
        features = offered & want
        self.request(Request.SET_FEATURES, Features(features))
        self.features = features
        status = bool((self.protocol_features or 0) & ProtocolFeature.STATUS)
        if status:
            st = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
            self.request(Request.SET_STATUS, Status(int(st)))
            self.device_status = self._u64(Request.GET_STATUS)
            if not self.device_status & DeviceStatus.FEATURES_OK:
                raise FrontendError(f"the back-end cleared FEATURES_OK (status {self.device_status:#x})")
        self._setup_memory()
        self._setup_rings()
        if status:
            st = (DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
                  | DeviceStatus.DRIVER_OK)
            self.request(Request.SET_STATUS, Status(int(st)))
            self.device_status = self._u64(Request.GET_STATUS)
        self._running = True
        # Kick both rings once: a back-end that waits on its kick fd learns
        # about the receive buffers and starts delivering.
        for fd in self._kick:
            os.eventfd_write(fd, 1)
        log.info("connected to %s: features %s, protocol features %s", self.socket_path,
                 "|".join(feature_names(features)) or "0",
                 "|".join(protocol_feature_names(self.protocol_features or 0)) or "-")

    def _setup_backend_channel(self) -> None:
        """SET_BACKEND_REQ_FD with one end of a new socket pair (NEED_REPLY
        with REPLY_ACK, as QEMU 7.2's vhost_setup_slave_channel does)."""
        channel = BackendChannelEnd(self.on_backend_request)
        try:
            self.request(Request.SET_BACKEND_REQ_FD, BackendReqFd(channel.theirs.fileno()),
                         need_reply=self.reply_ack)
        except BaseException:
            channel.close()
            raise
        channel.release_theirs()
        self.channel = channel

    def poll_backend(self, timeout: float = 0.0) -> list[Message]:
        """Serve the back-end's requests arriving within `timeout` seconds."""
        if self.channel is None:
            raise FrontendError("no back-end channel (not asked for, or BACKEND_REQ not offered)")
        return self.channel.poll(timeout)

    def _setup_memory(self) -> None:
        size, off = self._layout()
        self._off = off
        self._memfd = os.memfd_create("pyvirtio-frontend", os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, size)
        region = Region.from_fd(self._memfd, self.gpa_base, size)
        region.uva = _mapping_address(region)
        self.mem = GuestMemory([region])
        self._mv = region.mv
        self._uva_delta = region.uva - self.gpa_base
        table = SetMemTable((MemoryRegion(self.gpa_base, size, region.uva, 0),), (self._memfd,))
        # NEED_REPLY on the memory table whenever REPLY_ACK allows (QEMU and
        # DPDK do): the rings must not start before the back-end mapped it.
        self.request(Request.SET_MEM_TABLE, table, need_reply=self.reply_ack)
        if not self.reply_ack:
            self._u64(Request.GET_FEATURES)  # barrier, as QEMU's enforce_reply does

    def _setup_rings(self) -> None:
        assert self.mem is not None and self.features is not None
        q = self.queue_size
        f = self.features
        event_idx = bool(f & spec.Feature.RING_EVENT_IDX)
        indirect = bool(f & spec.Feature.RING_INDIRECT_DESC) and self.tx_segments == 2
        self.mrg_rxbuf = bool(f & NetFeature.MRG_RXBUF)
        g = self.gpa_base
        off = self._off
        cls = PackedDriver if self.packed else SplitDriver
        pool = BufferPool(self.mem, g + off["pool"], off["tx_bufs"] - off["pool"]) if indirect else None
        self.rx = cls.at(self.mem, q, g + off["rx"], event_idx=event_idx)
        self.tx = cls.at(self.mem, q, g + off["tx"], event_idx=event_idx, indirect=indirect, pool=pool)
        # tx buffers: as many as the ring holds frames; each 2 KiB with a
        # zero header written once (nothing we send sets a header field).
        nbuf = q if (self.tx_segments == 1 or indirect) else q // 2
        self._tx_gpa = [g + off["tx_bufs"] + 2048 * i for i in range(nbuf)]
        self._tx_free = list(range(nbuf - 1, -1, -1))
        self._rx_bufs = [g + off["rx_bufs"] + self.rx_buffer_size * i for i in range(q)]
        for i, drv in ((RX_QUEUE, self.rx), (TX_QUEUE, self.tx)):
            kick, call = _eventfd(), _eventfd()
            self._kick.append(kick)
            self._call.append(call)
            d = self._uva_delta
            self.request(Request.SET_VRING_NUM, VringState(i, q))
            self.request(Request.SET_VRING_BASE, VringState(i, drv.vring_base()))
            self._ring_addrs[i] = (drv.desc, drv.device_area, drv.driver_area)
            self.request(Request.SET_VRING_ADDR, VringAddr(i, VringAddrFlags(0), drv.desc + d,
                                                           drv.device_area + d, drv.driver_area + d, 0))
            self.request(Request.SET_VRING_CALL, VringFd(i, call, False))
            # While polling nothing needs an interrupt; waits re-enable them.
            drv.disable_interrupts()
            # Receive buffers go in before the kick fd: the ring starts full.
            if i == RX_QUEUE:
                for tok in range(q):
                    drv.add((), ((self._rx_bufs[tok], self.rx_buffer_size),), tok)
                drv.publish()
            self.request(Request.SET_VRING_KICK, VringFd(i, kick, False))
        if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
            for i in (RX_QUEUE, TX_QUEUE):
                self.request(Request.SET_VRING_ENABLE, VringState(i, 1))

    # -- dirty logging (what a migrating front-end does) ----------------------------------

    def start_dirty_log(self) -> memoryview:
        """Turn the back-end's dirty logging on, as QEMU does when a migration
        starts: SET_LOG_BASE with a new bitmap (a memfd, one bit per 4 KiB
        page of guest memory), SET_FEATURES with VHOST_F_LOG_ALL, and
        SET_VRING_ADDR again with the LOG flag and the used ring's guest
        address. Returns the bitmap (shared with the back-end; clear it
        with `clear_dirty_log`)."""
        self._check_running()
        assert self.mem is not None and self.features is not None
        if not (self.protocol_features or 0) & ProtocolFeature.LOG_SHMFD:
            raise FrontendError("the back-end does not offer LOG_SHMFD: it cannot be migrated")
        if not (self.offered_features or 0) & VHOST_F_LOG_ALL:
            raise FrontendError("the back-end does not offer VHOST_F_LOG_ALL: it cannot be migrated")
        end = max(r.gpa + r.size for r in self.mem.regions)
        size = ((end >> 12) + 63) // 64 * 8  # u64 words of bits, as QEMU sizes it
        fd = os.memfd_create("pyvirtio-dirty-log", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self._close_log()
        self._log_fd = fd
        self._log_map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        data, fds = encode_request(Request.SET_LOG_BASE, LogInfo(size, 0, fd))
        self._send(data, fds)
        self._read_reply(Request.SET_LOG_BASE)  # the back-end answers once it mapped the log
        self._set_log_all(True)
        return memoryview(self._log_map)

    def stop_dirty_log(self) -> None:
        """Logging off again (SET_FEATURES without LOG_ALL, ring addresses
        without the LOG flag), as after a completed or cancelled migration."""
        self._set_log_all(False)

    def _set_log_all(self, on: bool) -> None:
        assert self.features is not None
        self.request(Request.SET_FEATURES, Features(self.features | (VHOST_F_LOG_ALL if on else 0)))
        d = self._uva_delta
        for i, (desc, used, avail) in self._ring_addrs.items():
            self.request(Request.SET_VRING_ADDR, VringAddr(
                i, VringAddrFlags.LOG if on else VringAddrFlags(0), desc + d, used + d, avail + d,
                used if on else 0))

    def dirty_pages(self) -> set[int]:
        """The guest pages marked in the bitmap since it was last cleared."""
        if self._log_map is None:
            return set()
        bits = np.unpackbits(np.frombuffer(self._log_map[:], np.uint8), bitorder="little")
        return {int(p) for p in np.flatnonzero(bits)}

    def clear_dirty_log(self) -> None:
        if self._log_map is not None:
            self._log_map[:] = bytes(len(self._log_map))

    def _close_log(self) -> None:
        if self._log_map is not None:
            try:
                self._log_map.close()
            except BufferError:  # the caller still holds the view we returned: GC unmaps it
                pass
            self._log_map = None
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1

    def buffer_addresses(self) -> dict[str, list[int]]:
        """Guest addresses of the tx and rx buffers (for tests)."""
        return {"tx": list(self._tx_gpa), "rx": list(self._rx_bufs)}

    # -- traffic ---------------------------------------------------------------------------

    def _check_running(self) -> None:
        if not self._running:
            raise FrontendError("the frontend is not running (not connected, stopped or closed)")

    def _wait_call(self, index: int, drv: VirtqueueDriver, deadline: float) -> bool:
        """Sleep until ring `index` has used buffers or `deadline` passes.

        Enables used-buffer notifications, re-checks (no lost wake-up), polls
        the call eventfd, and disables notifications again. Returns False on
        timeout.
        """
        try:
            if drv.enable_interrupts():
                return True
            fd = self._call[index]
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return drv.pending_used()
                r, _, _ = select.select([fd], [], [], left)
                if r:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                    self.stats["tx_calls" if index == TX_QUEUE else "rx_calls"] += 1
                    if drv.pending_used():
                        return True
        finally:
            drv.disable_interrupts()

    def _reap_tx(self) -> int:
        assert self.tx is not None
        used = self.tx.get_used()
        free = self._tx_free
        for tok, _ln in used:
            free.append(tok)  # type: ignore[arg-type]
        return len(used)

    def _publish_tx(self) -> None:
        assert self.tx is not None
        if self.tx.publish():
            os.eventfd_write(self._kick[TX_QUEUE], 1)
            self.stats["tx_kicks"] += 1

    def send(self, frames: Iterable[bytes | bytearray | memoryview], timeout: float | None = None) -> int:
        """Queue `frames` for transmission; returns how many were queued.

        Fewer than given only when the ring stayed full for `timeout`
        seconds (default: the instance timeout). Frames larger than
        `MAX_FRAME` raise `ValueError` (nothing after them is sent).
        """
        # Hot path: locals, one add per frame, one publish (and at most one
        # kick) per call or per ring-full stall.
        self._check_running()
        tx = self.tx
        assert tx is not None and self._mv is not None
        mv = self._mv
        base = self.gpa_base
        tx_gpa = self._tx_gpa
        free = self._tx_free
        add = tx.add
        two = self.tx_segments == 2
        deadline = None
        n = 0
        for frame in frames:
            ln = len(frame)
            if ln > MAX_FRAME:
                self._publish_tx()
                raise ValueError(f"frame of {ln} bytes exceeds {MAX_FRAME}")
            while not free:
                if self._reap_tx():
                    break
                self._publish_tx()
                if deadline is None:
                    deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
                self.stats["tx_full_waits"] += 1
                if not self._wait_call(TX_QUEUE, tx, deadline) and not self._reap_tx():
                    self.stats["tx_frames"] += n
                    return n
            b = free.pop()
            gpa = tx_gpa[b]
            o = gpa - base + NET_HDR_SIZE
            mv[o:o + ln] = frame
            try:
                if two:
                    add(((gpa, NET_HDR_SIZE), (gpa + NET_HDR_SIZE, ln)), (), b)
                else:
                    add(((gpa, NET_HDR_SIZE + ln),), (), b)
            except QueueFullError:  # cannot happen: one buffer never needs more than its share
                free.append(b)
                raise
            n += 1
        self._publish_tx()
        self.stats["tx_frames"] += n
        return n

    def tx_outstanding(self) -> int:
        """Frames sent and not yet completed by the back-end (reaps first)."""
        self._check_running()
        assert self.tx is not None
        self._reap_tx()
        return self.tx.outstanding

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the back-end completed every frame sent; False on timeout."""
        self._check_running()
        tx = self.tx
        assert tx is not None
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self._reap_tx()
            if not tx.outstanding:
                return True
            if time.monotonic() >= deadline:
                return False
            self._wait_call(TX_QUEUE, tx, min(deadline, time.monotonic() + 0.01))

    def _reap_rx(self, out: list[bytes] | None) -> int:
        """Take every used rx buffer, append completed frames to `out` (or just
        count them when `out` is None), repost the buffers; returns frames."""
        rx = self.rx
        assert rx is not None and self._mv is not None
        used = rx.get_used()
        if not used:
            return 0
        mv = self._mv
        base = self.gpa_base
        bufs = self._rx_bufs
        size = self.rx_buffer_size
        add = rx.add
        mrg = self.mrg_rxbuf
        frames = 0
        for tok, ln in used:
            o = bufs[tok] - base  # type: ignore[call-overload]
            if self._rx_partial_left:
                if out is not None:
                    self._rx_partial.append(bytes(mv[o:o + ln]))
                self._rx_partial_left -= 1
                if not self._rx_partial_left:
                    frames += 1
                    if out is not None:
                        out.append(b"".join(self._rx_partial))
                    self._rx_partial = []
            elif ln < NET_HDR_SIZE:
                raise DeviceProtocolError(f"received buffer of {ln} bytes is shorter than the "
                                          f"{NET_HDR_SIZE}-byte virtio_net_hdr")
            else:
                nbuf = mv[o + _NUM_BUFFERS_OFF] | mv[o + _NUM_BUFFERS_OFF + 1] << 8 if mrg else 1
                if nbuf > 1:
                    self._rx_partial_left = nbuf - 1
                    if out is not None:
                        self._rx_partial = [bytes(mv[o + NET_HDR_SIZE:o + ln])]
                else:
                    frames += 1
                    if out is not None:
                        out.append(bytes(mv[o + NET_HDR_SIZE:o + ln]))
            add((), ((bufs[tok], size),), tok)  # type: ignore[call-overload]
        self.stats["rx_buffers"] += len(used)
        self.stats["rx_frames"] += frames
        if rx.publish():
            os.eventfd_write(self._kick[RX_QUEUE], 1)
            self.stats["rx_kicks"] += 1
        return frames

    def recv(self, timeout: float = 0.0) -> list[bytes]:
        """Frames received, in order (header stripped). Waits up to `timeout`
        seconds for the first if none is there; returns [] on timeout."""
        self._check_running()
        out: list[bytes] = []
        self._recv(out, timeout)
        return out

    def recv_count(self, timeout: float = 0.0) -> int:
        """Like `recv` but counts and discards the frames (no copy): for
        benchmarks."""
        self._check_running()
        return self._recv(None, timeout)

    def _recv(self, out: list[bytes] | None, timeout: float) -> int:
        rx = self.rx
        assert rx is not None
        n = self._reap_rx(out)
        if n or timeout <= 0:
            return n
        deadline = time.monotonic() + timeout
        while True:
            if not self._wait_call(RX_QUEUE, rx, deadline):
                return self._reap_rx(out)
            n = self._reap_rx(out)
            if n:
                return n

    # -- ring state ------------------------------------------------------------------------

    def used_position(self, index: int) -> int:
        """The ring position just past the last buffer the driver reaped, in
        GET_VRING_BASE encoding: split the free-running u16 index; packed the
        slot with its wrap counter in bit 15. A back-end that stopped after
        completing every buffer it consumed reports this value (packed: in
        the low 16 bits)."""
        drv = self.rx if index == RX_QUEUE else self.tx
        assert drv is not None
        if isinstance(drv, PackedDriver):
            return drv.last_used | drv.used_wrap << 15
        assert isinstance(drv, SplitDriver)
        return drv.last_used

    def stop(self) -> dict[int, int]:
        """GET_VRING_BASE for both rings (which stops them in the back-end);
        returns {ring index: num}. Reaps what the back-end completed before
        stopping, so `used_position` is comparable afterwards."""
        self._check_running()
        self._running = False
        for i in (RX_QUEUE, TX_QUEUE):
            msg = self.request(Request.GET_VRING_BASE, VringState(i, 0))
            assert msg is not None
            body = msg.body
            if not isinstance(body, VringState) or body.index != i:
                raise FrontendError(f"GET_VRING_BASE reply {body!r} is not for ring {i}")
            self.vring_bases[i] = body.num
        try:
            self._reap_tx()
            if self.rx is not None:
                self.rx.get_used()  # buffers completed just before the stop; contents dropped
        except DeviceProtocolError:
            log.warning("ring corrupted at stop", exc_info=True)
        return dict(self.vring_bases)

    def close(self) -> None:
        """Stop (best effort) and release everything. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._running and self._sock is not None:
            try:
                self.timeout = min(self.timeout, 1.0)
                self.stop()
            except (FrontendError, ProtocolError, OSError) as exc:
                log.debug("stop at close failed: %s", exc)
        self._running = False
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._decoder is not None:
            self._decoder.close()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        for fd in self._kick + self._call:
            os.close(fd)
        self._kick.clear()
        self._call.clear()
        self.rx = self.tx = None
        self._mv = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1
        self._close_log()


def make_frame(size: int, seq: int, dst: bytes = b"\x02\x00\x00\x00\x00\x02",
               src: bytes = b"\x02\x00\x00\x00\x00\x01", ethertype: int = 0x88B5) -> bytes:
    """A test Ethernet frame of `size` bytes (>= 18): addresses, an
    experimental ethertype, the sequence number as u32, then a byte pattern
    derived from it, so corruption and reordering are detectable."""
    if size < 18:
        raise ValueError(f"frame size {size} is below 18 bytes")
    head = dst + src + struct.pack(">HI", ethertype, seq & 0xFFFFFFFF)
    fill = bytes((seq + i) & 0xFF for i in range(size - len(head)))
    return head + fill

