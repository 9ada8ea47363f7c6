"""Virtio constants, feature bits and ring layouts (virtio 1.2): data only.

Nothing here touches memory. Offsets are in bytes from the start of the area
they belong to; every multi-byte field is little-endian (virtio 1.x).
"""

from __future__ import annotations

import enum
import struct
from typing import Final

# --- feature bits (device-independent) -------------------------------------


class Feature(enum.IntFlag):
    """Transport/ring feature bits (virtio 1.2 section 6)."""

    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    # bit 30 is VHOST_USER_F_PROTOCOL_FEATURES in vhost-user GET_FEATURES
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    RING_RESET = 1 << 40


MAX_QUEUE_SIZE: Final = 32768


class DeviceStatus(enum.IntFlag):
    """The virtio device status byte (virtio 1.2 section 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class NetFeature(enum.IntFlag):
    """virtio-net device feature bits (virtio 1.2 section 5.1.3)."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    GSO = 1 << 6
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    CTRL_RX_EXTRA = 1 << 20
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23
    GUEST_USO4 = 1 << 54
    GUEST_USO6 = 1 << 55
    HOST_USO = 1 << 56
    HASH_REPORT = 1 << 57
    GUEST_HDRLEN = 1 << 59
    RSS = 1 << 60
    RSC_EXT = 1 << 61
    STANDBY = 1 << 62
    SPEED_DUPLEX = 1 << 63

# --- split ring --------------------------------------------------------------


class DescFlags(enum.IntFlag):
    """Split descriptor flags; the packed format shares the low three."""

    NEXT = 0x1
    WRITE = 0x2
    INDIRECT = 0x4


class PackedDescFlags(enum.IntFlag):
    NEXT = 0x1
    WRITE = 0x2
    INDIRECT = 0x4
    AVAIL = 1 << 7
    USED = 1 << 15


class AvailFlags(enum.IntFlag):
    NO_INTERRUPT = 0x1


class UsedFlags(enum.IntFlag):
    NO_NOTIFY = 0x1


class EventFlags(enum.IntEnum):
    """Packed-ring event suppression `flags` (bits 0-1)."""

    ENABLE = 0
    DISABLE = 1
    DESC = 2
    RESERVED = 3


DESC_SIZE: Final = 16
#: split descriptor: addr u64, len u32, flags u16, next u16
SPLIT_DESC: Final = struct.Struct("<QIHH")
#: packed descriptor: addr u64, len u32, id u16, flags u16
PACKED_DESC: Final = struct.Struct("<QIHH")
#: used ring element: id u32, len u32
USED_ELEM: Final = struct.Struct("<II")
USED_ELEM_SIZE: Final = 8
#: packed event suppression structure: off_wrap u16, flags u16
EVENT_SUPPRESS: Final = struct.Struct("<HH")

# Split available ring offsets
AVAIL_FLAGS: Final = 0
AVAIL_IDX: Final = 2
AVAIL_RING: Final = 4
# Split used ring offsets
USED_FLAGS: Final = 0
USED_IDX: Final = 2
USED_RING: Final = 4
# Packed event suppression offsets
EVENT_OFF_WRAP: Final = 0
EVENT_FLAGS: Final = 2
# Packed descriptor field offsets
PACKED_LEN: Final = 8
PACKED_ID: Final = 12
PACKED_FLAGS: Final = 14

# Alignment required of each area (virtio 1.2 2.7 / 2.8)
SPLIT_DESC_ALIGN: Final = 16
SPLIT_AVAIL_ALIGN: Final = 2
SPLIT_USED_ALIGN: Final = 4
PACKED_DESC_ALIGN: Final = 16
PACKED_EVENT_ALIGN: Final = 4


def desc_table_size(q: int) -> int:
    return DESC_SIZE * q


def avail_size(q: int) -> int:
    """Size of the split available ring including `used_event`."""
    return 6 + 2 * q


def used_size(q: int) -> int:
    """Size of the split used ring including `avail_event`."""
    return 6 + USED_ELEM_SIZE * q


def used_event_offset(q: int) -> int:
    """Offset of `used_event` in the available ring."""
    return AVAIL_RING + 2 * q


def avail_event_offset(q: int) -> int:
    """Offset of `avail_event` in the used ring."""
    return USED_RING + USED_ELEM_SIZE * q


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True when `event` lies in [old, new) modulo 2^16.

    The EVENT_IDX test both sides use: the other side asked to be notified
    once the index passes `event`; we moved the index from `old` to `new`.
    """
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def packed_need_event(off_wrap: int, new: int, old: int, wrap: int, size: int) -> bool:
    """Packed-ring DESC-mode test.

    `new`/`old` are the device's used cursor after/at the previous decision
    (slot indices < size), `wrap` the used wrap counter belonging to `new`,
    `off_wrap` the driver's event. Works on the doubled ring so that an event
    pointing inside a multi-slot batch is caught.
    """
    if new <= old:
        old -= size
    off = off_wrap & 0x7FFF
    if (off_wrap >> 15) != wrap:
        off -= size
    return ((new - off - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def features_str(bits: int, *families: type[enum.IntFlag]) -> str:
    """Human-readable list of the known bits in `bits`: each device family
    given (`NetFeature`, `BlkFeature`, ...), the ring/transport bits
    (`Feature`), bit 30 as vhost-user's PROTOCOL_FEATURES, unknown ones in
    hex. One printer for every device."""
    known = 0
    parts = []
    fams: list[type[enum.IntFlag]] = [*families, Feature]
    for names in fams:
        for member in names:
            v = member.value
            if v and not known & v and bits & v == v:
                parts.append(member.name or hex(v))
                known |= v
    if bits & (1 << 30) and not known & (1 << 30):
        parts.append("PROTOCOL_FEATURES")
        known |= 1 << 30
    rest = bits & ~known
    if rest:
        parts.append(hex(rest))
    return "|".join(parts) if parts else "0"


# --- virtio-net (virtio 1.2 5.1) ----------------------------------------------------------

#: virtio_net_hdr: flags u8, gso_type u8, hdr_len u16, gso_size u16,
#: csum_start u16, csum_offset u16, num_buffers u16 (12-byte form)
NET_HDR: Final = struct.Struct("<BBHHHHH")
NET_HDR_SIZE: Final = 12
LEGACY_NET_HDR_SIZE: Final = 10
HDR_F_NEEDS_CSUM: Final = 1
HDR_F_DATA_VALID: Final = 2
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_UDP: Final = 3
GSO_TCPV6: Final = 4
GSO_ECN: Final = 0x80
_U16: Final = struct.Struct("<H")

# control queue (5.1.6.5)
CTRL_RX: Final = 0
CTRL_MAC: Final = 1
CTRL_VLAN: Final = 2
CTRL_ANNOUNCE: Final = 3
CTRL_MQ: Final = 4
CTRL_GUEST_OFFLOADS: Final = 5
CTRL_MQ_VQ_PAIRS_SET: Final = 0
CTRL_OK: Final = 0
CTRL_ERR: Final = 1

STATUS_LINK_UP: Final = 1
#: config: mac[6], status u16, max_virtqueue_pairs u16, mtu u16
NET_CONFIG: Final = struct.Struct("<6sHHH")


# --- virtio-blk (virtio 1.2 5.2) ----------------------------------------------------------

class BlkFeature(enum.IntFlag):
    """virtio-blk device feature bits (virtio 1.2 5.2.3)."""

    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14
    LIFETIME = 1 << 15
    SECURE_ERASE = 1 << 16


# request types (5.2.6)
T_IN: Final = 0
T_OUT: Final = 1
T_FLUSH: Final = 4
T_GET_ID: Final = 8
T_GET_LIFETIME: Final = 10
T_DISCARD: Final = 11
T_WRITE_ZEROES: Final = 13
T_SECURE_ERASE: Final = 14
# status
S_OK: Final = 0
S_IOERR: Final = 1
S_UNSUPP: Final = 2

SECTOR: Final = 512
ID_BYTES: Final = 20
#: request header: type u32, reserved u32, sector u64
REQ_HDR: Final = struct.Struct("<IIQ")
#: DISCARD / WRITE_ZEROES segment: sector u64, num_sectors u32, flags u32 (bit 0: unmap)
DWZ_SEG: Final = struct.Struct("<QII")
DWZ_UNMAP: Final = 1

#: virtio_blk_config up to the secure-erase fields (72 bytes): capacity u64,
#: size_max u32, seg_max u32, geometry (cylinders u16, heads u8, sectors u8),
#: blk_size u32, topology (physical_block_exp u8, alignment_offset u8,
#: min_io_size u16, opt_io_size u32), wce u8, unused u8, num_queues u16,
#: max_discard_sectors u32, max_discard_seg u32, discard_sector_alignment u32,
#: max_write_zeroes_sectors u32, max_write_zeroes_seg u32,
#: write_zeroes_may_unmap u8, 3 unused, max_secure_erase_sectors u32,
#: max_secure_erase_seg u32, secure_erase_sector_alignment u32
BLK_CONFIG: Final = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")
CONFIG_WCE_OFFSET: Final = 32


# --- virtio-vsock (virtio 1.2 5.10) -------------------------------------------------------

class VsockFeature(enum.IntFlag):
    """virtio-vsock device feature bits (virtio 1.2 5.10.3; STREAM is 1.3's)."""

    STREAM = 1 << 0
    SEQPACKET = 1 << 1


#: queue indices (5.10.2)
VSOCK_RX: Final = 0
VSOCK_TX: Final = 1
VSOCK_EVENT: Final = 2

#: virtio_vsock_hdr (44 bytes): src_cid u64, dst_cid u64, src_port u32,
#: dst_port u32, len u32, type u16, op u16, flags u32, buf_alloc u32, fwd_cnt u32
VSOCK_HDR: Final = struct.Struct("<QQIIIHHIII")
VSOCK_HDR_SIZE: Final = 44
#: virtio_vsock_config: guest_cid u64 (only the low 32 bits are used)
VSOCK_CONFIG: Final = struct.Struct("<Q")
#: virtio_vsock_event: id u32
VSOCK_EVENT_ID: Final = struct.Struct("<I")
VSOCK_EVENT_TRANSPORT_RESET: Final = 0

#: well-known CIDs: the hypervisor, local loopback, the host
VSOCK_CID_HYPERVISOR: Final = 0
VSOCK_CID_LOCAL: Final = 1
VSOCK_CID_HOST: Final = 2


class VsockType(enum.IntEnum):
    STREAM = 1
    SEQPACKET = 2


class VsockOp(enum.IntEnum):
    INVALID = 0
    REQUEST = 1        # connect
    RESPONSE = 2       # connection accepted
    RST = 3            # refused, or reset
    SHUTDOWN = 4       # flags: what the sender will no longer do
    RW = 5             # payload
    CREDIT_UPDATE = 6  # buf_alloc / fwd_cnt changed
    CREDIT_REQUEST = 7  # please send a CREDIT_UPDATE


class VsockShutdown(enum.IntFlag):
    """SHUTDOWN flags: the sender will receive (RCV) / send (SEND) no more."""

    RCV = 1
    SEND = 2
