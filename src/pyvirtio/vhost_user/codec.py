"""Sans-IO vhost-user message codec: bytes and fds in, typed messages out.

Nothing here touches a socket, an event loop or guest memory. A transport
reads from its socket and hands the bytes, with any SCM_RIGHTS fds that came
with them, to a `Decoder` (back-end side: it decodes front-end requests) or a
`ReplyDecoder` (front-end side: it decodes back-end replies), then drains
typed `Message`s. Answers are built by the `encode_*` functions as bytes (plus
fds where the message carries some) for the transport to send in one
`sendmsg`.

Errors say whose fault they are:

- `FrontendProtocolError`: the front-end sent something the protocol forbids.
- `BackendProtocolError`: the back-end did (seen by a Python front-end).
- `LocalProtocolError`: the code calling this module asked for something the
  protocol forbids (encoding an impossible message, reusing a dead decoder).

A `ProtocolError` is fatal to the connection. The decoder that raised it
closes every fd it still holds, keeps the error, and refuses all later calls
with `UnusableDecoderError` (chained to the original), so a half-parsed byte
stream is never read as if it were in sync. The transport should drop the
connection.

File descriptor ownership: an fd passed to `feed` belongs to the decoder until
it is handed out in a `Message` (in `Message.fds`, and in the body field that
gives its meaning); from then on it belongs to the caller. Fds the protocol
does not allow on a message are never handed out: they are closed, and the
message is rejected (REM_MEM_REG's legacy fd is closed and accepted).
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, NoReturn, TypeAlias

from pyvirtio.vhost_user.protocol import (
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_PAYLOAD_SIZE,
    PACKED_AVAIL_IDX_MASK,
    PACKED_AVAIL_WRAP,
    PACKED_USED_SHIFT,
    PACKED_USED_WRAP,
    REPLY_FLAGS,
    REQUESTS_ALWAYS_ACKED,
    REQUESTS_WITH_RESPONSE,
    VERSION_MASK,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_VERSION,
    VRING_INDEX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    HeaderFlag,
    ProtocolFeature,
    Request,
    VringAddrFlags,
)

_log = logging.getLogger(__name__)

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

# --- wire layouts (all little-endian) ------------------------------------------

#: request u32, flags u32, size u32
HEADER = struct.Struct("<III")
#: a u64 payload (features, acks, status, vring fd word, MTU, ...)
U64_PAYLOAD = struct.Struct("<Q")
#: vring state: index u32, num u32
VRING_STATE = struct.Struct("<II")
#: vring address: index u32, flags u32, desc u64, used u64, avail u64, log u64
VRING_ADDR = struct.Struct("<IIQQQQ")
#: memory table head: nregions u32, padding u32 (regions follow)
MEMORY_HEADER = struct.Struct("<II")
#: memory region: guest_phys_addr, memory_size, userspace_addr, mmap_offset
MEMORY_REGION = struct.Struct("<QQQQ")
#: ADD/REM_MEM_REG: padding u64 + one region
MEM_REG_MSG = struct.Struct("<QQQQQ")
#: SET_LOG_BASE: mmap_size u64, mmap_offset u64
LOG_PAYLOAD = struct.Struct("<QQ")
#: GET/SET_CONFIG head: offset u32, size u32, flags u32 (config bytes follow)
CONFIG_HEADER = struct.Struct("<III")
#: GET/SET_INFLIGHT_FD: mmap_size u64, mmap_offset u64, num_queues u16,
#: queue_size u16, 4 bytes of padding (C struct alignment) = 24 bytes
INFLIGHT_PAYLOAD = struct.Struct("<QQHH4x")

# --- errors -----------------------------------------------------------------------


class VhostUserError(Exception):
    """Base of every error of the vhost-user layer."""


class ProtocolError(VhostUserError):
    """A peer's message broke the protocol; the connection cannot continue.

    `request` is the offending message's request code when the header was
    readable, else None.
    """

    def __init__(self, message: str, request: int | None = None) -> None:
        super().__init__(message)
        self.request = request


class FrontendProtocolError(ProtocolError):
    """The front-end (QEMU, DPDK virtio-user, a test client) is at fault."""


class BackendProtocolError(ProtocolError):
    """The back-end (the device process) is at fault."""


class LocalProtocolError(VhostUserError):
    """Our own caller asked for something the protocol does not allow: a bug here."""


class UnusableDecoderError(LocalProtocolError):
    """A decoder was used after a fatal `ProtocolError` or after `close()`."""


# --- message bodies -------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class MemoryRegion:
    """One region of a memory table (32 bytes on the wire).

    `userspace_addr` is the front-end's virtual address of the region (ring
    addresses in SET_VRING_ADDR are in this space); `mmap_offset` is where the
    region starts in its fd.
    """

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @property
    def gpa_end(self) -> int:
        """First guest-physical address past the region."""
        return self.guest_phys_addr + self.memory_size


@dataclass(slots=True, frozen=True)
class SetMemTable:
    """SET_MEM_TABLE: the whole table; `fds[i]` backs `regions[i]`."""

    regions: tuple[MemoryRegion, ...]
    fds: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class MemRegMsg:
    """ADD_MEM_REG (with its fd) or REM_MEM_REG (fd None)."""

    region: MemoryRegion
    fd: int | None = None


@dataclass(slots=True, frozen=True)
class LogInfo:
    """SET_LOG_BASE: the dirty log is `mmap_size` bytes of `fd` from `mmap_offset`."""

    mmap_size: int
    mmap_offset: int
    fd: int | None = None


@dataclass(slots=True, frozen=True)
class VringState:
    """SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE and its reply.

    For SET/GET_VRING_BASE on a packed ring `num` packs indices and wrap
    counters; see `split_packed_vring_base`.
    """

    index: int
    num: int


@dataclass(slots=True, frozen=True)
class VringAddr:
    """SET_VRING_ADDR. `desc`, `used`, `avail` are front-end virtual
    addresses; `log` is a guest-physical address used with `VringAddrFlags.LOG`."""

    index: int
    flags: VringAddrFlags
    desc: int
    used: int
    avail: int
    log: int


@dataclass(slots=True, frozen=True)
class VringFd:
    """SET_VRING_KICK/CALL/ERR. `nofd` means the ring is polled: `fd` is None."""

    index: int
    fd: int | None
    nofd: bool


@dataclass(slots=True, frozen=True)
class Features:
    """A feature word: GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES."""

    value: int


@dataclass(slots=True, frozen=True)
class U64:
    """A plain u64 payload: NET_SET_MTU, GET_QUEUE_NUM and GET_MAX_MEM_SLOTS
    replies, REPLY_ACK acks (0 = success)."""

    value: int


@dataclass(slots=True, frozen=True)
class Status:
    """SET_STATUS / GET_STATUS reply: the virtio device status byte."""

    value: int


@dataclass(slots=True, frozen=True)
class Rarp:
    """SEND_RARP: the MAC address to announce (6 bytes)."""

    mac: bytes


@dataclass(slots=True, frozen=True)
class Config:
    """GET/SET_CONFIG and the GET_CONFIG reply: `size` bytes of config space
    at `offset`; `payload` is exactly `size` bytes (zeros in a GET_CONFIG
    request). `flags` is a `ConfigType` for SET_CONFIG."""

    offset: int
    size: int
    flags: int
    payload: bytes


@dataclass(slots=True, frozen=True)
class InflightInfo:
    """GET/SET_INFLIGHT_FD and the GET_INFLIGHT_FD reply.

    `fd` is the shared inflight buffer (SET_INFLIGHT_FD, the reply); None in
    a GET_INFLIGHT_FD request and in a reply with `mmap_size` 0 ("not
    supported").
    """

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    fd: int | None = None


@dataclass(slots=True, frozen=True)
class BackendReqFd:
    """SET_BACKEND_REQ_FD: the socket of the back-end -> front-end channel."""

    fd: int


@dataclass(slots=True, frozen=True)
class LogFd:
    """SET_LOG_FD: an eventfd the back-end may signal about the dirty log."""

    fd: int


@dataclass(slots=True, frozen=True)
class Unknown:
    """A request this codec does not model (or an unmodelled reply): raw payload.

    Its fds, if any, are in `Message.fds` and belong to the caller.
    """

    request: int
    payload: bytes


Body: TypeAlias = (
    None | Features | U64 | Status | Rarp | SetMemTable | MemRegMsg | LogInfo | VringState
    | VringAddr | VringFd | Config | InflightInfo | BackendReqFd | LogFd | Unknown
)


@dataclass(slots=True, frozen=True)
class Message:
    """One decoded message: header fields, typed body and the fds it carried.

    `request` is a `Request` member when the code is known (an `int`
    otherwise). `fds` lists every fd handed to the caller with this message,
    in arrival order; typed bodies name the same fds.
    """

    request: int
    flags: HeaderFlag
    body: Body
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        """NEED_REPLY was set (see `needs_reply` for what that obliges)."""
        return bool(self.flags & HeaderFlag.NEED_REPLY)

    def close_fds(self) -> None:
        """Close every fd of the message. Call at most once, and only if the
        fds were not kept (fd numbers are reused by the kernel)."""
        _close_fds(self.fds)


# --- packed-ring vring base ------------------------------------------------------


@dataclass(slots=True, frozen=True)
class PackedVringBase:
    """SET/GET_VRING_BASE `num` of a packed ring, split into its fields."""

    avail_idx: int
    avail_wrap: bool
    used_idx: int
    used_wrap: bool


def split_packed_vring_base(num: int) -> PackedVringBase:
    """Split a packed ring's vring base: bits 0-14 avail index, 15 avail wrap
    counter, 16-30 used index, 31 used wrap counter.

    DPDK 22.11 virtio-user sends 0x8000 (upper half zero) for a fresh ring;
    whether that means "used = avail" is the caller's policy, not decoded here.
    """
    return PackedVringBase(
        avail_idx=num & PACKED_AVAIL_IDX_MASK,
        avail_wrap=bool(num & PACKED_AVAIL_WRAP),
        used_idx=(num >> PACKED_USED_SHIFT) & PACKED_AVAIL_IDX_MASK,
        used_wrap=bool(num & PACKED_USED_WRAP),
    )


def join_packed_vring_base(avail_idx: int, avail_wrap: bool, used_idx: int, used_wrap: bool) -> int:
    """Inverse of `split_packed_vring_base`. Indices must be below 2**15."""
    for name, idx in (("avail_idx", avail_idx), ("used_idx", used_idx)):
        if not 0 <= idx <= PACKED_AVAIL_IDX_MASK:
            raise LocalProtocolError(f"packed ring {name} {idx} does not fit in 15 bits")
    return (avail_idx | (PACKED_AVAIL_WRAP if avail_wrap else 0)
            | (used_idx << PACKED_USED_SHIFT) | (PACKED_USED_WRAP if used_wrap else 0))


# --- the reply rule ---------------------------------------------------------------

ReplyKind: TypeAlias = Literal["none", "response", "ack"]


def needs_reply(request: int, flags: int, acked_protocol_features: int) -> ReplyKind:
    """What a back-end must send back for a request.

    - "response": the request has a reply payload of its own (GET_*, and
      SET_LOG_BASE once LOG_SHMFD is negotiated); sent whatever the flags
      say, and never followed by an ack.
    - "ack": NEED_REPLY is set and REPLY_ACK was negotiated (or the request is
      one QEMU always waits on: IOTLB_MSG, POSTCOPY_LISTEN/END); answer with
      `encode_ack`.
    - "none": send nothing. A stray reply would be taken by the front-end as
      the answer to its next request.

    Postcopy's SET_MEM_TABLE/ADD_MEM_REG responses (PAGEFAULT) are not modelled.
    """
    if request in REQUESTS_WITH_RESPONSE:
        return "response"
    if request == Request.SET_LOG_BASE and acked_protocol_features & ProtocolFeature.LOG_SHMFD:
        return "response"
    if flags & HeaderFlag.NEED_REPLY and (
            acked_protocol_features & ProtocolFeature.REPLY_ACK or request in REQUESTS_ALWAYS_ACKED):
        return "ack"
    return "none"


# --- helpers ----------------------------------------------------------------------


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            _log.debug("closing fd %d failed", fd, exc_info=True)


def _request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def _as_request(request: int) -> int:
    try:
        return Request(request)
    except ValueError:
        return request


def _backend_request_name(request: int) -> str:
    try:
        return f"BACKEND_{BackendRequest(request).name}"
    except ValueError:
        return f"back-end request {request}"


def _as_backend_request(request: int) -> int:
    try:
        return BackendRequest(request)
    except ValueError:
        return request


class _Parse:
    """One message being decoded: its payload, fds, and how to complain."""

    __slots__ = ("error", "fds", "max_queues", "name", "payload", "request")

    def __init__(self, request: int, payload: bytes, fds: list[int],
                 error: type[ProtocolError], max_queues: int | None,
                 name: Callable[[int], str] = _request_name) -> None:
        self.request = request
        self.payload = payload
        self.fds = fds
        self.error = error
        self.max_queues = max_queues
        self.name = name

    def fail(self, why: str) -> NoReturn:
        raise self.error(f"{self.name(self.request)}: {why}", self.request)

    def size(self, expected: int) -> None:
        if len(self.payload) != expected:
            self.fail(f"payload is {len(self.payload)} bytes, the request requires {expected}")

    def nfds(self, expected: int) -> None:
        if len(self.fds) != expected:
            self.fail(f"carries {len(self.fds)} fds, the request requires {expected}")

    def index(self, index: int) -> None:
        if self.max_queues is not None and index >= self.max_queues:
            self.fail(f"vring index {index} is not below the {self.max_queues} queues supported")

    def u64(self) -> int:
        self.size(U64_PAYLOAD.size)
        return U64_PAYLOAD.unpack(self.payload)[0]

    def region(self, r: MemoryRegion) -> None:
        if r.memory_size == 0:
            self.fail(f"memory region at gpa {r.guest_phys_addr:#x} has size 0")
        for name, base in (("guest_phys_addr", r.guest_phys_addr), ("userspace_addr", r.userspace_addr),
                           ("mmap_offset", r.mmap_offset)):
            if base + r.memory_size - 1 > U64_MAX:
                self.fail(f"memory region {name} {base:#x} + size {r.memory_size:#x} wraps 64 bits")


_Decode: TypeAlias = Callable[[_Parse], Body]

# --- request bodies: decode ---------------------------------------------------------


def _d_empty(p: _Parse) -> None:
    p.size(0)
    p.nfds(0)


def _d_features(p: _Parse) -> Features:
    value = p.u64()
    p.nfds(0)
    return Features(value)


def _d_u64(p: _Parse) -> U64:
    value = p.u64()
    p.nfds(0)
    return U64(value)


def _d_status(p: _Parse) -> Status:
    value = p.u64()
    p.nfds(0)
    if value > 0xFF:
        p.fail(f"device status {value:#x} is not a byte")
    return Status(value)


def _d_rarp(p: _Parse) -> Rarp:
    p.size(U64_PAYLOAD.size)
    p.nfds(0)
    return Rarp(p.payload[:6])


def _d_mem_table(p: _Parse) -> SetMemTable:
    if len(p.payload) < MEMORY_HEADER.size:
        p.fail(f"payload of {len(p.payload)} bytes is shorter than the memory table header")
    nregions, _padding = MEMORY_HEADER.unpack_from(p.payload)
    if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
        p.fail(f"{nregions} memory regions, at most {VHOST_MEMORY_BASELINE_NREGIONS} allowed")
    p.size(MEMORY_HEADER.size + nregions * MEMORY_REGION.size)
    p.nfds(nregions)
    regions = tuple(MemoryRegion(*MEMORY_REGION.unpack_from(p.payload, MEMORY_HEADER.size + i * MEMORY_REGION.size))
                    for i in range(nregions))
    for r in regions:
        p.region(r)
    ordered = sorted(regions, key=lambda r: r.guest_phys_addr)
    for a, b in itertools.pairwise(ordered):
        if b.guest_phys_addr < a.gpa_end:
            p.fail(f"memory regions at gpa {a.guest_phys_addr:#x} and {b.guest_phys_addr:#x} overlap")
    return SetMemTable(regions, tuple(p.fds))


def _mem_reg(p: _Parse) -> MemoryRegion:
    p.size(MEM_REG_MSG.size)
    _padding, *fields = MEM_REG_MSG.unpack(p.payload)
    region = MemoryRegion(*fields)
    p.region(region)
    return region


def _d_add_mem_reg(p: _Parse) -> MemRegMsg:
    region = _mem_reg(p)
    p.nfds(1)
    return MemRegMsg(region, p.fds[0])


def _d_rem_mem_reg(p: _Parse) -> MemRegMsg:
    region = _mem_reg(p)
    if len(p.fds) > 1:
        p.fail(f"carries {len(p.fds)} fds, the request allows at most one (legacy)")
    if p.fds:
        # The spec lets old front-ends attach the region's fd; close it.
        _log.debug("closing the fd a front-end attached to REM_MEM_REG")
        _close_fds(p.fds)
        p.fds.clear()
    return MemRegMsg(region, None)


def _d_log_base(p: _Parse) -> LogInfo:
    p.size(LOG_PAYLOAD.size)
    p.nfds(1)
    mmap_size, mmap_offset = LOG_PAYLOAD.unpack(p.payload)
    if mmap_size == 0 or mmap_offset + mmap_size - 1 > U64_MAX:
        p.fail(f"log area of {mmap_size:#x} bytes at offset {mmap_offset:#x} is empty or wraps 64 bits")
    return LogInfo(mmap_size, mmap_offset, p.fds[0])


def _d_vring_state(p: _Parse) -> VringState:
    p.size(VRING_STATE.size)
    p.nfds(0)
    index, num = VRING_STATE.unpack(p.payload)
    p.index(index)
    return VringState(index, num)


def _d_vring_enable(p: _Parse) -> VringState:
    state = _d_vring_state(p)
    if state.num > 1:
        p.fail(f"enable value {state.num} is neither 0 nor 1")
    return state


def _d_vring_addr(p: _Parse) -> VringAddr:
    p.size(VRING_ADDR.size)
    p.nfds(0)
    index, flags, desc, used, avail, log = VRING_ADDR.unpack(p.payload)
    p.index(index)
    if flags & ~int(VringAddrFlags.LOG):  # int: ~ on an IntFlag drops unknown bits
        p.fail(f"unknown vring address flags {flags:#x}")
    return VringAddr(index, VringAddrFlags(flags), desc, used, avail, log)


def _d_vring_fd(p: _Parse) -> VringFd:
    word = p.u64()
    if word & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
        p.fail(f"undefined bits set in {word:#x} (bits 0-7 index, bit 8 no-fd)")
    index = word & VRING_INDEX_MASK
    p.index(index)
    nofd = bool(word & VRING_NOFD_MASK)
    p.nfds(0 if nofd else 1)
    return VringFd(index, None if nofd else p.fds[0], nofd)


def _d_backend_req_fd(p: _Parse) -> BackendReqFd:
    p.size(0)
    p.nfds(1)
    return BackendReqFd(p.fds[0])


def _d_log_fd(p: _Parse) -> LogFd:
    p.size(0)
    p.nfds(1)
    return LogFd(p.fds[0])


def _config(p: _Parse) -> Config:
    if len(p.payload) < CONFIG_HEADER.size:
        p.fail(f"payload of {len(p.payload)} bytes is shorter than the config header")
    offset, size, flags = CONFIG_HEADER.unpack_from(p.payload)
    if size > MAX_CONFIG_SIZE:
        p.fail(f"config size {size} exceeds {MAX_CONFIG_SIZE}")
    p.size(CONFIG_HEADER.size + size)
    p.nfds(0)
    return Config(offset, size, flags, p.payload[CONFIG_HEADER.size:])


def _inflight(p: _Parse, nfds: int) -> InflightInfo:
    p.size(INFLIGHT_PAYLOAD.size)
    p.nfds(nfds)
    mmap_size, mmap_offset, num_queues, queue_size = INFLIGHT_PAYLOAD.unpack(p.payload)
    return InflightInfo(mmap_size, mmap_offset, num_queues, queue_size, p.fds[0] if nfds else None)


def _d_get_inflight(p: _Parse) -> InflightInfo:
    return _inflight(p, 0)


def _d_set_inflight(p: _Parse) -> InflightInfo:
    return _inflight(p, 1)


def _d_unknown(p: _Parse) -> Unknown:
    return Unknown(p.request, p.payload)


_REQUEST_DECODERS: dict[int, _Decode] = {
    Request.GET_FEATURES: _d_empty,
    Request.SET_FEATURES: _d_features,
    Request.SET_OWNER: _d_empty,
    Request.RESET_OWNER: _d_empty,
    Request.SET_MEM_TABLE: _d_mem_table,
    Request.SET_LOG_BASE: _d_log_base,
    Request.SET_LOG_FD: _d_log_fd,
    Request.SET_VRING_NUM: _d_vring_state,
    Request.SET_VRING_ADDR: _d_vring_addr,
    Request.SET_VRING_BASE: _d_vring_state,
    Request.GET_VRING_BASE: _d_vring_state,
    Request.SET_VRING_KICK: _d_vring_fd,
    Request.SET_VRING_CALL: _d_vring_fd,
    Request.SET_VRING_ERR: _d_vring_fd,
    Request.GET_PROTOCOL_FEATURES: _d_empty,
    Request.SET_PROTOCOL_FEATURES: _d_features,
    Request.GET_QUEUE_NUM: _d_empty,
    Request.SET_VRING_ENABLE: _d_vring_enable,
    Request.SEND_RARP: _d_rarp,
    Request.NET_SET_MTU: _d_u64,
    Request.SET_BACKEND_REQ_FD: _d_backend_req_fd,
    Request.GET_CONFIG: _config,
    Request.SET_CONFIG: _config,
    Request.GET_INFLIGHT_FD: _d_get_inflight,
    Request.SET_INFLIGHT_FD: _d_set_inflight,
    Request.RESET_DEVICE: _d_empty,
    Request.GET_MAX_MEM_SLOTS: _d_empty,
    Request.ADD_MEM_REG: _d_add_mem_reg,
    Request.REM_MEM_REG: _d_rem_mem_reg,
    Request.SET_STATUS: _d_status,
    Request.GET_STATUS: _d_empty,
}

# --- reply bodies: decode (front-end side) --------------------------------------------


def _r_log_base(p: _Parse) -> U64 | None:
    # libvhost-user answers with a u64, DPDK with an empty payload; QEMU
    # checks only the request code.
    return None if not p.payload and not p.fds else _d_u64(p)


def _r_config(p: _Parse) -> Config | None:
    # An empty GET_CONFIG reply is the back-end's way of reporting failure.
    return None if not p.payload and not p.fds else _config(p)


def _r_inflight(p: _Parse) -> InflightInfo:
    p.size(INFLIGHT_PAYLOAD.size)
    mmap_size = INFLIGHT_PAYLOAD.unpack(p.payload)[0]
    return _inflight(p, 1 if mmap_size else 0)


_REPLY_DECODERS: dict[int, _Decode] = {
    Request.GET_FEATURES: _d_features,
    Request.GET_PROTOCOL_FEATURES: _d_features,
    Request.GET_QUEUE_NUM: _d_u64,
    Request.GET_MAX_MEM_SLOTS: _d_u64,
    Request.GET_STATUS: _d_status,
    Request.GET_VRING_BASE: _d_vring_state,
    Request.GET_CONFIG: _r_config,
    Request.GET_INFLIGHT_FD: _r_inflight,
    Request.SET_LOG_BASE: _r_log_base,
}

# --- decoders -----------------------------------------------------------------------


class _FrameDecoder:
    """Reassembles frames from a byte stream and pairs them with their fds.

    Fds are given to the message containing the *last* byte of the chunk
    they arrived with (for an empty chunk: the next byte to arrive). That is
    what a Linux stream socket guarantees: `recvmsg` returns fds with the
    read that reaches the first byte of the `sendmsg` that carried them and
    stops right after that sendmsg's data, so whether the transport reads the
    12-byte header first or reads greedily, the fds' message is the one the
    read ends in (every front-end sends one message per sendmsg).
    """

    _error: type[ProtocolError] = ProtocolError
    _peer = "peer"
    #: how request codes are named and typed (front-end requests by default;
    #: the back-end channel's decoders use `BackendRequest`)
    _name = staticmethod(_request_name)
    _code = staticmethod(_as_request)

    def __init__(self, *, max_queues: int | None = None) -> None:
        """`max_queues`: if given, any vring index >= it is a protocol error."""
        if max_queues is not None and max_queues < 1:
            raise ValueError(f"max_queues must be positive, not {max_queues}")
        self._max_queues = max_queues
        self._buf = bytearray()
        self._pos = 0  # stream offset of _buf[0]
        self._fd_chunks: deque[tuple[int, list[int]]] = deque()  # (anchor offset, fds)
        self._fatal: BaseException | None = None
        self._closed = False

    # -- public surface shared by both decoders --

    @property
    def error(self) -> BaseException | None:
        """The fatal error that ended this decoder, if any."""
        return self._fatal

    @property
    def pending_bytes(self) -> int:
        """Bytes fed but not yet returned in a message. Non-zero at end of
        stream means the peer hung up in the middle of a message."""
        return len(self._buf)

    @property
    def pending_fds(self) -> int:
        """Fds held for messages not yet complete."""
        return sum(len(fds) for _, fds in self._fd_chunks)

    def feed(self, data: bytes | bytearray | memoryview, fds: Iterable[int] = ()) -> None:
        """Append bytes read from the socket, with the fds that came with them.

        Takes ownership of `fds` at once, even when it raises
        (`UnusableDecoderError` after a fatal error or `close()`: the fds are
        closed).
        """
        fds = list(fds)
        if self._fatal is not None or self._closed:
            _close_fds(fds)
            self._raise_unusable()
        end = self._pos + len(self._buf) + len(data)
        if fds:
            self._fd_chunks.append((end - 1 if len(data) else end, fds))
        self._buf += data

    def close(self) -> None:
        """Release everything held (closing pending fds). Idempotent; any
        later `feed`/`next_message` raises `UnusableDecoderError`."""
        self._closed = True
        self._drop()

    # -- internals --

    def _raise_unusable(self) -> NoReturn:
        if self._fatal is not None:
            raise UnusableDecoderError(
                f"decoder stopped at a protocol error ({self._fatal}); the connection must be dropped"
            ) from self._fatal
        raise UnusableDecoderError("decoder is closed")

    def _drop(self) -> None:
        while self._fd_chunks:
            _close_fds(self._fd_chunks.popleft()[1])
        self._pos += len(self._buf)
        self._buf.clear()

    def _check_pending_fds(self, request: int | None) -> None:
        # Called when no complete message is buffered: every fd still held
        # belongs to the one message in progress. Without this bound a peer
        # trickling a long payload a byte at a time, with fds on every byte,
        # would make us hold thousands of fds (the whole fd table) until the
        # message completes and is refused.
        if self.pending_fds > MAX_FDS:
            name = "a message" if request is None else self._name(request)
            raise self._error(f"{name}: carries more than {MAX_FDS} file descriptors "
                              f"({self.pending_fds} so far, before it is complete)", request)

    def _check_header(self, request: int, flags: int, size: int) -> None:
        raise NotImplementedError

    def _decode_body(self, p: _Parse) -> Body:
        raise NotImplementedError

    def _next(self, expect: int | None = None) -> Message | None:
        if self._fatal is not None or self._closed:
            self._raise_unusable()
        fds: list[int] = []
        try:
            if len(self._buf) < HEADER_SIZE:
                self._check_pending_fds(None)
                return None
            request, flags, size = HEADER.unpack_from(self._buf)
            # Judge the header before its payload arrives: a bad size must not
            # make us wait for (or buffer) gigabytes.
            self._check_header(request, flags, size)
            total = HEADER_SIZE + size
            if len(self._buf) < total:
                self._check_pending_fds(request)
                return None
            payload = bytes(self._buf[HEADER_SIZE:total])
            del self._buf[:total]
            self._pos += total
            while self._fd_chunks and self._fd_chunks[0][0] < self._pos:
                fds.extend(self._fd_chunks.popleft()[1])
            if expect is not None and request != expect:
                raise self._error(
                    f"reply to {self._name(request)} while waiting for {self._name(expect)}", request)
            p = _Parse(request, payload, fds, self._error, self._max_queues, self._name)
            body = self._decode_body(p)
        except ProtocolError as exc:
            _close_fds(fds)
            self._fatal = exc
            self._drop()
            raise
        msg = Message(self._code(request), HeaderFlag(flags), body, tuple(p.fds))
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s -> %s flags=%#x size=%d fds=%d", self._peer, self._name(request),
                       flags, size, len(msg.fds))
        return msg


class Decoder(_FrameDecoder):
    """Back-end side: decodes the front-end's requests.

    Usage: `feed(data, fds)` whenever the socket yields, then call
    `next_message()` until it returns None (more bytes needed). Raises
    `FrontendProtocolError` for anything the front-end got wrong: the header
    version, a REPLY flag, a payload above `MAX_PAYLOAD_SIZE` or not the size
    the request requires, the wrong number of fds (more than `MAX_FDS` is
    refused as soon as they arrive, before the message is complete), more than 8 memory regions,
    empty, wrapping or overlapping regions, undefined flag bits, a vring index
    at or above `max_queues`. The error is fatal (see the module docstring).

    Requests not modelled here come out as `Unknown` bodies with whatever fds
    they carried, which then belong to the caller.
    """

    _error = FrontendProtocolError
    _peer = "frontend"

    def next_message(self) -> Message | None:
        """The next complete request, or None until more bytes are fed."""
        return self._next()

    def _check_header(self, request: int, flags: int, size: int) -> None:
        name = _request_name(request)
        if flags & VERSION_MASK != VHOST_USER_VERSION:
            raise FrontendProtocolError(f"{name}: header version {flags & VERSION_MASK}, expected 1", request)
        if flags & HeaderFlag.REPLY:
            raise FrontendProtocolError(f"{name}: a request carries the REPLY flag", request)
        if size > MAX_PAYLOAD_SIZE:
            raise FrontendProtocolError(f"{name}: payload size {size} exceeds {MAX_PAYLOAD_SIZE}", request)
        if request == Request.NONE:
            raise FrontendProtocolError("request code 0 is not a request", request)

    def _decode_body(self, p: _Parse) -> Body:
        return _REQUEST_DECODERS.get(p.request, _d_unknown)(p)


class ReplyDecoder(_FrameDecoder):
    """Front-end side: decodes the back-end's replies on the main socket.

    Raises `BackendProtocolError` for flags other than exactly VERSION|REPLY
    (0x5, what QEMU and DPDK demand), an oversized payload, a reply to a
    request other than the one awaited, or a body or fd count that does not
    fit the request. Replies to GET_* requests get typed bodies; to any other
    modelled request the reply is an ack (`U64`, 0 = success); replies to
    unmodelled requests come out as `Unknown`.
    """

    _error = BackendProtocolError
    _peer = "backend"

    def next_message(self, expect: int | None = None) -> Message | None:
        """The next complete reply, or None until more bytes are fed.
        `expect`: the request code being waited for; any other is an error."""
        return self._next(expect)

    def _check_header(self, request: int, flags: int, size: int) -> None:
        name = _request_name(request)
        if flags != REPLY_FLAGS:
            raise BackendProtocolError(f"{name}: reply flags {flags:#x}, expected {int(REPLY_FLAGS):#x}", request)
        if size > MAX_PAYLOAD_SIZE:
            raise BackendProtocolError(f"{name}: payload size {size} exceeds {MAX_PAYLOAD_SIZE}", request)

    def _decode_body(self, p: _Parse) -> Body:
        decode = _REPLY_DECODERS.get(p.request)
        if decode is not None:
            return decode(p)
        if p.request in _REQUEST_DECODERS and p.request not in REQUESTS_WITH_RESPONSE:
            return _d_u64(p)  # an ack
        return _d_unknown(p)


# --- the back-end request channel (SET_BACKEND_REQ_FD) ---------------------------------

#: Back-end requests whose answer is a plain u64 ack (0 = success): the
#: requests QEMU 7.2 handles and the shared-object ones of later QEMUs.
_BACKEND_ACKED = frozenset({
    BackendRequest.IOTLB_MSG,
    BackendRequest.CONFIG_CHANGE_MSG,
    BackendRequest.VRING_HOST_NOTIFIER_MSG,
    BackendRequest.SHARED_OBJECT_ADD,
    BackendRequest.SHARED_OBJECT_REMOVE,
})


def backend_request_flags(acked_protocol_features: int) -> HeaderFlag:
    """The header flags of a back-end request: NEED_REPLY exactly when
    REPLY_ACK was negotiated (the front-end then answers with an ack, QEMU
    7.2 with u64 0 for success and 1 for failure)."""
    if acked_protocol_features & ProtocolFeature.REPLY_ACK:
        return HeaderFlag.VERSION | HeaderFlag.NEED_REPLY
    return HeaderFlag.VERSION


class BackendRequestDecoder(_FrameDecoder):
    """Front-end side of the back-end channel: decodes the back-end's requests.

    Raises `BackendProtocolError` for a header version other than 1, the
    REPLY flag on a request, request code 0, an oversized payload, or a
    CONFIG_CHANGE_MSG with a payload or fds (it has neither). Other codes
    come out as `Unknown` with whatever fds they carried.
    """

    _error = BackendProtocolError
    _peer = "backend (channel)"
    _name = staticmethod(_backend_request_name)
    _code = staticmethod(_as_backend_request)

    def next_message(self) -> Message | None:
        """The next complete back-end request, or None until more bytes are fed."""
        return self._next()

    def _check_header(self, request: int, flags: int, size: int) -> None:
        name = _backend_request_name(request)
        if flags & VERSION_MASK != VHOST_USER_VERSION:
            raise BackendProtocolError(f"{name}: header version {flags & VERSION_MASK}, expected 1", request)
        if flags & HeaderFlag.REPLY:
            raise BackendProtocolError(f"{name}: a request carries the REPLY flag", request)
        if size > MAX_PAYLOAD_SIZE:
            raise BackendProtocolError(f"{name}: payload size {size} exceeds {MAX_PAYLOAD_SIZE}", request)
        if request == BackendRequest.NONE:
            raise BackendProtocolError("back-end request code 0 is not a request", request)

    def _decode_body(self, p: _Parse) -> Body:
        if p.request == BackendRequest.CONFIG_CHANGE_MSG:
            _d_empty(p)
            return None
        return _d_unknown(p)


class BackendReplyDecoder(_FrameDecoder):
    """Back-end side of the back-end channel: decodes the front-end's answers.

    A reply has flags exactly VERSION|REPLY (QEMU clears NEED_REPLY and sets
    REPLY on the request's header) and, for the acked requests, a u64 body
    (`U64`, 0 = success); other codes come out as `Unknown`. Raises
    `FrontendProtocolError` otherwise, or for a reply to another request
    than the awaited one.
    """

    _error = FrontendProtocolError
    _peer = "frontend (channel)"
    _name = staticmethod(_backend_request_name)
    _code = staticmethod(_as_backend_request)

    def next_message(self, expect: int | None = None) -> Message | None:
        """The next complete reply, or None until more bytes are fed.
        `expect`: the back-end request being answered; any other is an error."""
        return self._next(expect)

    def _check_header(self, request: int, flags: int, size: int) -> None:
        name = _backend_request_name(request)
        if flags != REPLY_FLAGS:
            raise FrontendProtocolError(f"{name}: reply flags {flags:#x}, expected {int(REPLY_FLAGS):#x}",
                                        request)
        if size > MAX_PAYLOAD_SIZE:
            raise FrontendProtocolError(f"{name}: payload size {size} exceeds {MAX_PAYLOAD_SIZE}", request)

    def _decode_body(self, p: _Parse) -> Body:
        if p.request in _BACKEND_ACKED:
            return _d_u64(p)
        return _d_unknown(p)


# --- encoding -----------------------------------------------------------------------


def encode_frame(request: int, flags: int, payload: bytes = b"") -> bytes:
    """Header + payload, unchecked beyond what fits the header's u32 fields.

    The building block of the other encoders; also for crafting deliberately
    malformed input when probing a back-end.
    """
    try:
        return HEADER.pack(request, flags, len(payload)) + payload
    except struct.error as exc:
        raise LocalProtocolError(f"cannot encode header of {request}: {exc}") from None


def _want(request: int, body: object, *types: type) -> None:
    if not isinstance(body, types):
        expected = " or ".join("None" if t is type(None) else t.__name__ for t in types)
        raise LocalProtocolError(
            f"{_request_name(request)} takes a {expected} body, not {type(body).__name__}")


def _e_region(r: MemoryRegion) -> bytes:
    return MEMORY_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)


def _encode_request_body(request: int, body: Body) -> tuple[bytes, tuple[int, ...]]:
    decode = _REQUEST_DECODERS.get(request)
    if isinstance(body, Unknown):
        return body.payload, ()
    if decode is None:
        _want(request, body, Unknown, type(None))
        return b"", ()
    if decode is _d_empty:
        _want(request, body, type(None))
        return b"", ()
    if decode is _d_features:
        _want(request, body, Features)
        assert isinstance(body, Features)
        return U64_PAYLOAD.pack(body.value), ()
    if decode is _d_u64:
        _want(request, body, U64)
        assert isinstance(body, U64)
        return U64_PAYLOAD.pack(body.value), ()
    if decode is _d_status:
        _want(request, body, Status)
        assert isinstance(body, Status)
        return U64_PAYLOAD.pack(body.value), ()
    if decode is _d_rarp:
        _want(request, body, Rarp)
        assert isinstance(body, Rarp)
        if len(body.mac) != 6:
            raise LocalProtocolError(f"a MAC address is 6 bytes, not {len(body.mac)}")
        return body.mac + b"\0\0", ()
    if decode is _d_mem_table:
        _want(request, body, SetMemTable)
        assert isinstance(body, SetMemTable)
        n = len(body.regions)
        if n != len(body.fds) or n > VHOST_MEMORY_BASELINE_NREGIONS:
            raise LocalProtocolError(f"a memory table needs one fd per region and at most "
                                     f"{VHOST_MEMORY_BASELINE_NREGIONS} regions ({n} regions, {len(body.fds)} fds)")
        return MEMORY_HEADER.pack(n, 0) + b"".join(map(_e_region, body.regions)), tuple(body.fds)
    if decode is _d_add_mem_reg or decode is _d_rem_mem_reg:
        _want(request, body, MemRegMsg)
        assert isinstance(body, MemRegMsg)
        if (body.fd is None) != (decode is _d_rem_mem_reg):
            raise LocalProtocolError(f"{_request_name(request)}: ADD_MEM_REG carries an fd, REM_MEM_REG none")
        return b"\0" * 8 + _e_region(body.region), () if body.fd is None else (body.fd,)
    if decode is _d_log_base:
        _want(request, body, LogInfo)
        assert isinstance(body, LogInfo)
        if body.fd is None:
            raise LocalProtocolError("SET_LOG_BASE carries the log fd")
        return LOG_PAYLOAD.pack(body.mmap_size, body.mmap_offset), (body.fd,)
    if decode is _d_vring_state or decode is _d_vring_enable:
        _want(request, body, VringState)
        assert isinstance(body, VringState)
        return VRING_STATE.pack(body.index, body.num), ()
    if decode is _d_vring_addr:
        _want(request, body, VringAddr)
        assert isinstance(body, VringAddr)
        return VRING_ADDR.pack(body.index, body.flags, body.desc, body.used, body.avail, body.log), ()
    if decode is _d_vring_fd:
        _want(request, body, VringFd)
        assert isinstance(body, VringFd)
        if body.nofd != (body.fd is None) or not 0 <= body.index <= VRING_INDEX_MASK:
            raise LocalProtocolError(f"{_request_name(request)}: index must fit 8 bits and fd be None "
                                     f"exactly when nofd ({body})")
        word = body.index | (VRING_NOFD_MASK if body.nofd else 0)
        return U64_PAYLOAD.pack(word), () if body.fd is None else (body.fd,)
    if decode is _d_backend_req_fd:
        _want(request, body, BackendReqFd)
        assert isinstance(body, BackendReqFd)
        return b"", (body.fd,)
    if decode is _d_log_fd:
        _want(request, body, LogFd)
        assert isinstance(body, LogFd)
        return b"", (body.fd,)
    if decode is _config:
        _want(request, body, Config)
        assert isinstance(body, Config)
        return _e_config(body), ()
    if decode is _d_get_inflight or decode is _d_set_inflight:
        _want(request, body, InflightInfo)
        assert isinstance(body, InflightInfo)
        if (body.fd is None) != (decode is _d_get_inflight):
            raise LocalProtocolError(f"{_request_name(request)}: GET_INFLIGHT_FD carries no fd, "
                                     "SET_INFLIGHT_FD one")
        return _e_inflight(body), () if body.fd is None else (body.fd,)
    raise AssertionError(f"no encoder for {_request_name(request)}")  # pragma: no cover


def _e_config(body: Config) -> bytes:
    if body.size != len(body.payload) or body.size > MAX_CONFIG_SIZE:
        raise LocalProtocolError(f"config size {body.size} must equal the payload length "
                                 f"({len(body.payload)}) and be at most {MAX_CONFIG_SIZE}")
    return CONFIG_HEADER.pack(body.offset, body.size, body.flags) + body.payload


def _e_inflight(body: InflightInfo) -> bytes:
    return INFLIGHT_PAYLOAD.pack(body.mmap_size, body.mmap_offset, body.num_queues, body.queue_size)


def encode_request(request: int, body: Body = None, need_reply: bool = False) -> tuple[bytes, tuple[int, ...]]:
    """Encode a front-end request: returns the bytes and the fds to send with
    them in one `sendmsg`.

    `body` has the type `Decoder` produces for `request` (None for requests
    without payload; `Unknown` or None for unmodelled ones; an `Unknown` body
    sends its raw payload for any request). `need_reply` sets
    NEED_REPLY; only meaningful with REPLY_ACK negotiated (see `needs_reply`).
    Raises `LocalProtocolError` for a body of the wrong type or values that do
    not fit. Values the back-end should reject (overlapping regions, a huge
    index) are encoded as given, so tests can probe back-ends with them.
    """
    try:
        payload, fds = _encode_request_body(request, body)
        flags = HeaderFlag.VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
        return encode_frame(request, flags, payload), fds
    except struct.error as exc:
        raise LocalProtocolError(f"{_request_name(request)}: value out of range in {body}: {exc}") from None


def encode_backend_request(request: BackendRequest | int, payload: bytes = b"", need_reply: bool = False) -> bytes:
    """A back-end -> front-end request on the SET_BACKEND_REQ_FD channel.
    Fds, if any, go alongside in the same `sendmsg`.

    CONFIG_CHANGE_MSG has no payload ("re-read the config space"); giving
    it one raises `LocalProtocolError`. `need_reply` sets NEED_REPLY: only
    with REPLY_ACK negotiated (`backend_request_flags`), the front-end then
    answers with an ack (`BackendReplyDecoder`).
    """
    if request == BackendRequest.NONE:
        raise LocalProtocolError("back-end request code 0 is not a request")
    if request == BackendRequest.CONFIG_CHANGE_MSG and payload:
        raise LocalProtocolError(f"CONFIG_CHANGE_MSG has no payload ({len(payload)} bytes given)")
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise LocalProtocolError(f"{_backend_request_name(request)}: payload of {len(payload)} bytes "
                                 f"exceeds {MAX_PAYLOAD_SIZE}")
    return encode_frame(request, HeaderFlag.VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0), payload)


def encode_backend_ack(msg: Message, ok: bool = True) -> bytes:
    """The front-end's REPLY_ACK answer to a back-end request that set
    NEED_REPLY: u64 0 for success, 1 for failure (what QEMU 7.2 sends)."""
    if not msg.need_reply:
        raise LocalProtocolError(f"{_backend_request_name(msg.request)} did not ask for a reply")
    return encode_frame(msg.request, REPLY_FLAGS, U64_PAYLOAD.pack(0 if ok else 1))


# --- replies (back-end side) -----------------------------------------------------------

_U64_REPLIES = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
    Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS, Request.SET_LOG_BASE,
})


def _reply_to(msg: Message | int) -> int:
    return msg.request if isinstance(msg, Message) else msg


def encode_reply(msg: Message | int, body: Body | int) -> bytes:
    """A reply to request `msg` (a decoded `Message`, or a bare request code)
    with flags exactly VERSION|REPLY and the same request code.

    Bodies by request: GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
    GET_MAX_MEM_SLOTS, GET_STATUS, SET_LOG_BASE: an int (or `Features`,
    `U64`, `Status`); GET_VRING_BASE: `VringState` with the request's index;
    GET_CONFIG: `Config` with the request's offset and size, or None for an
    empty reply, which tells the front-end the read failed; SET_LOG_BASE also
    accepts None (empty payload); `Unknown` sends raw bytes for any request.
    GET_INFLIGHT_FD carries an fd: use `encode_inflight_reply`. Acks: use
    `encode_ack`. Anything else raises `LocalProtocolError`.
    """
    request = _reply_to(msg)
    name = _request_name(request)
    if isinstance(body, Unknown):
        payload = body.payload
    elif request in _U64_REPLIES and not (request == Request.SET_LOG_BASE and body is None):
        _want(request, body, int, Features, U64, Status)
        value = body.value if isinstance(body, (Features, U64, Status)) else int(body)  # type: ignore[arg-type]
        if request == Request.GET_STATUS and not 0 <= value <= 0xFF:
            raise LocalProtocolError(f"device status {value:#x} is not a byte")
        try:
            payload = U64_PAYLOAD.pack(value)
        except struct.error:
            raise LocalProtocolError(f"{name}: {value} does not fit a u64") from None
    elif request == Request.SET_LOG_BASE:
        payload = b""
    elif request == Request.GET_VRING_BASE:
        _want(request, body, VringState)
        assert isinstance(body, VringState)
        if isinstance(msg, Message) and isinstance(msg.body, VringState) and msg.body.index != body.index:
            raise LocalProtocolError(f"GET_VRING_BASE reply for ring {body.index}, asked for {msg.body.index}")
        try:
            payload = VRING_STATE.pack(body.index, body.num)
        except struct.error:
            raise LocalProtocolError(f"{name}: {body} does not fit u32 fields") from None
    elif request == Request.GET_CONFIG:
        _want(request, body, Config, type(None))
        if body is None:
            payload = b""
        else:
            assert isinstance(body, Config)
            asked = msg.body if isinstance(msg, Message) else None
            if isinstance(asked, Config) and (asked.offset, asked.size) != (body.offset, body.size):
                raise LocalProtocolError(f"GET_CONFIG reply for {body.size} bytes at {body.offset}, asked "
                                         f"for {asked.size} at {asked.offset}")
            payload = _e_config(body)
    elif request == Request.GET_INFLIGHT_FD:
        raise LocalProtocolError("GET_INFLIGHT_FD replies carry an fd: use encode_inflight_reply")
    else:
        raise LocalProtocolError(f"{name} has no response payload (acks go through encode_ack)")
    return encode_frame(request, REPLY_FLAGS, payload)


def encode_u64_reply(msg: Message | int, value: int) -> bytes:
    """`encode_reply` for the u64 replies (GET_FEATURES, GET_PROTOCOL_FEATURES,
    GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, GET_STATUS, SET_LOG_BASE)."""
    if _reply_to(msg) not in _U64_REPLIES:
        raise LocalProtocolError(f"{_request_name(_reply_to(msg))} has no u64 response")
    return encode_reply(msg, value)


def encode_ack(msg: Message | int, ok: bool = True) -> bytes:
    """The REPLY_ACK answer: u64 0 for success, 1 for failure.

    Given a `Message`, refuses to ack one without NEED_REPLY (the front-end
    would read it as the answer to its next request). Refuses requests that
    have a response of their own.
    """
    request = _reply_to(msg)
    if request in REQUESTS_WITH_RESPONSE:
        raise LocalProtocolError(f"{_request_name(request)} is answered by its response, not an ack")
    if isinstance(msg, Message) and not msg.need_reply:
        raise LocalProtocolError(f"{_request_name(request)} did not ask for a reply")
    return encode_frame(request, REPLY_FLAGS, U64_PAYLOAD.pack(0 if ok else 1))


def encode_inflight_reply(msg: Message | int, info: InflightInfo) -> tuple[bytes, tuple[int, ...]]:
    """The GET_INFLIGHT_FD reply and its fd (the shared buffer). A reply with
    `mmap_size` 0 and no fd tells the front-end inflight tracking is not
    supported."""
    request = _reply_to(msg)
    if request != Request.GET_INFLIGHT_FD:
        raise LocalProtocolError(f"{_request_name(request)} is not GET_INFLIGHT_FD")
    if (info.fd is None) != (info.mmap_size == 0):
        raise LocalProtocolError("an inflight reply carries an fd exactly when mmap_size is non-zero")
    try:
        payload = _e_inflight(info)
    except struct.error:
        raise LocalProtocolError(f"inflight values out of range: {info}") from None
    return encode_frame(request, REPLY_FLAGS, payload), () if info.fd is None else (info.fd,)
