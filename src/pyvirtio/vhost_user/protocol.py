"""vhost-user wire constants: request codes, flag words, feature bits, limits.

Data only, like `pyvirtio.spec`. Numbering follows QEMU's
`docs/interop/vhost-user.rst`; the notes in `reference/vhost-user.md` record
which of these QEMU 7.2 and DPDK 22.11 actually send. Every integer on the
wire is little-endian (the protocol is host-endian and pyvirtio refuses
big-endian hosts).
"""

from __future__ import annotations

import enum

# --- message header -----------------------------------------------------------

#: request u32, flags u32, size u32
HEADER_SIZE = 12

#: The only protocol version; lives in bits 0-1 of the header flags.
VHOST_USER_VERSION = 0x1
VERSION_MASK = 0x3


class HeaderFlag(enum.IntFlag):
    """The header's flags word. Bits 4-31 are reserved."""

    VERSION = VHOST_USER_VERSION
    REPLY = 0x4
    NEED_REPLY = 0x8


#: Flags of every reply: QEMU 7.2 and DPDK virtio-user compare for equality,
#: so a reply never echoes NEED_REPLY.
REPLY_FLAGS = HeaderFlag.VERSION | HeaderFlag.REPLY

# --- limits -------------------------------------------------------------------

#: Largest payload accepted in either direction: one 4 KiB page (the limit
#: rust-vmm's vhost crate uses as well). Every payload the specification
#: defines fits with room to spare: SET_MEM_TABLE with 8 regions is 264 bytes,
#: GET/SET_CONFIG at most 12 + 256, the crypto session message about 600.
#: Requests with a fixed layout are additionally held to their exact size.
MAX_PAYLOAD_SIZE = 4096
MAX_MESSAGE_SIZE = HEADER_SIZE + MAX_PAYLOAD_SIZE

#: Regions in one SET_MEM_TABLE (and so fds in one message): QEMU's
#: VHOST_MEMORY_BASELINE_NREGIONS. More slots need CONFIGURE_MEM_SLOTS.
VHOST_MEMORY_BASELINE_NREGIONS = 8
#: Most fds a conforming message carries; size SCM_RIGHTS buffers for it.
MAX_FDS = VHOST_MEMORY_BASELINE_NREGIONS

#: Largest device config space a GET/SET_CONFIG moves (QEMU's
#: VHOST_USER_MAX_CONFIG_SIZE; DPDK and libvhost-user use the same value).
MAX_CONFIG_SIZE = 256

# --- feature words ------------------------------------------------------------

#: Bit 30 of GET_FEATURES/SET_FEATURES: the back-end speaks protocol features.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
#: Bit 26 of GET_FEATURES/SET_FEATURES: dirty logging of all writes.
VHOST_F_LOG_ALL = 1 << 26


class ProtocolFeature(enum.IntFlag):
    """GET/SET_PROTOCOL_FEATURES bits (QEMU 7.2 knows 0-16)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    SLAVE_REQ = BACKEND_REQ  # the name before QEMU 8.1
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    SLAVE_SEND_FD = BACKEND_SEND_FD
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# --- requests -----------------------------------------------------------------


class Request(enum.IntEnum):
    """Front-end -> back-end request codes (the main socket)."""

    NONE = 0  # not a request; never valid on the wire
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    SET_SLAVE_REQ_FD = SET_BACKEND_REQ_FD  # the name before QEMU 8.1
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Back-end -> front-end request codes (the SET_BACKEND_REQ_FD channel).

    QEMU 7.2 handles only 1-3; the rest are later additions.
    """

    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


#: Requests whose reply carries a payload of its own, sent whatever the
#: flags say (an ack is never sent in addition). SET_LOG_BASE belongs here
#: only once LOG_SHMFD is negotiated; see `codec.needs_reply`.
REQUESTS_WITH_RESPONSE = frozenset({
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM,
    Request.GET_CONFIG,
    Request.GET_INFLIGHT_FD,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
    Request.GET_SHARED_OBJECT,
    Request.SET_DEVICE_STATE_FD,
    Request.CHECK_DEVICE_STATE,
    Request.POSTCOPY_ADVISE,
    Request.CREATE_CRYPTO_SESSION,
})

#: Requests QEMU sends with NEED_REPLY and waits on an ack for even when
#: REPLY_ACK was not negotiated.
REQUESTS_ALWAYS_ACKED = frozenset({
    Request.IOTLB_MSG,
    Request.POSTCOPY_LISTEN,
    Request.POSTCOPY_END,
})

# --- per-request payload fields -----------------------------------------------

#: u64 payload of SET_VRING_KICK/CALL/ERR: bits 0-7 the ring index ...
VRING_INDEX_MASK = 0xFF
#: ... and bit 8 set when no fd is attached (the ring is polled). Bits 9-63
#: are undefined and must be zero.
VRING_NOFD_MASK = 1 << 8


class VringAddrFlags(enum.IntFlag):
    """SET_VRING_ADDR `flags`."""

    LOG = 0x1  # log writes to the used ring at `log`


class ConfigType(enum.IntEnum):
    """SET_CONFIG `flags`: who is writing the config space."""

    FRONTEND = 0   # a guest driver write
    MIGRATION = 1  # restoring migrated state


# SET/GET_VRING_BASE `num` for packed rings (split rings use bits 0-15 only):
PACKED_AVAIL_IDX_MASK = 0x7FFF
PACKED_AVAIL_WRAP = 1 << 15
PACKED_USED_SHIFT = 16
PACKED_USED_IDX_MASK = 0x7FFF << PACKED_USED_SHIFT
PACKED_USED_WRAP = 1 << 31
