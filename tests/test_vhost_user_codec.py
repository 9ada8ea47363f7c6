"""The sans-IO vhost-user codec: framing, fds, validation, encoders.

Wire bytes in the first tests are built by hand with `struct`, independently
of the encoders, from the layouts in QEMU's vhost-user.rst.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator

import pytest

from pyvirtio.vhost_user import (
    MAX_PAYLOAD_SIZE,
    U64,
    BackendProtocolError,
    BackendReqFd,
    BackendRequest,
    Config,
    Decoder,
    Features,
    FrontendProtocolError,
    HeaderFlag,
    InflightInfo,
    LocalProtocolError,
    LogInfo,
    MemoryRegion,
    MemRegMsg,
    Message,
    PackedVringBase,
    ProtocolFeature,
    Rarp,
    ReplyDecoder,
    Request,
    SetMemTable,
    Status,
    Unknown,
    UnusableDecoderError,
    VringAddr,
    VringAddrFlags,
    VringFd,
    VringState,
    encode_ack,
    encode_backend_request,
    encode_inflight_reply,
    encode_reply,
    encode_request,
    encode_u64_reply,
    join_packed_vring_base,
    needs_reply,
    split_packed_vring_base,
)

# --- hand-made wire bytes -------------------------------------------------------------


def frame(request: int, payload: bytes = b"", flags: int = 0x1, size: int | None = None) -> bytes:
    return struct.pack("<III", request, flags, len(payload) if size is None else size) + payload


def region(gpa: int, size: int, uva: int, offset: int) -> bytes:
    return struct.pack("<QQQQ", gpa, size, uva, offset)


def mem_table(*regions: bytes, nregions: int | None = None) -> bytes:
    n = len(regions) if nregions is None else nregions
    return struct.pack("<II", n, 0) + b"".join(regions)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.fixture
def make_fds() -> Iterator[Callable[[int], list[int]]]:
    """Factory of real fds (pipe read ends). At teardown closes those that
    are still open *and* still the same pipe (fd numbers get reused)."""
    made: list[tuple[int, int]] = []

    def make(n: int) -> list[int]:
        fds = []
        for _ in range(n):
            r, w = os.pipe()
            os.close(w)
            made.append((r, os.fstat(r).st_ino))
            fds.append(r)
        return fds

    yield make
    for fd, ino in made:
        try:
            if os.fstat(fd).st_ino == ino:
                os.close(fd)
        except OSError:
            pass


def decode_one(data: bytes, fds: list[int] | tuple[int, ...] = (), **kw: int) -> Message:
    d = Decoder(**kw)
    d.feed(data, fds)
    msg = d.next_message()
    assert msg is not None
    assert d.next_message() is None
    assert d.pending_bytes == 0
    return msg


# --- decoding real byte sequences --------------------------------------------------


def test_set_mem_table_with_two_regions_hands_out_one_fd_per_region_in_order(make_fds):
    fds = make_fds(2)
    payload = mem_table(region(0x0, 0xA0000, 0x7F0000000000, 0x0),
                        region(0x100000, 0x3FF00000, 0x7F0000100000, 0x100000))
    assert len(payload) == 8 + 2 * 32
    msg = decode_one(frame(5, payload, flags=0x9), fds)

    assert msg.request is Request.SET_MEM_TABLE
    assert msg.need_reply
    assert msg.body == SetMemTable(
        (MemoryRegion(0x0, 0xA0000, 0x7F0000000000, 0x0),
         MemoryRegion(0x100000, 0x3FF00000, 0x7F0000100000, 0x100000)),
        tuple(fds))
    assert msg.fds == tuple(fds)
    assert not any(map(is_closed, fds)), "fds handed out must stay open for the caller"
    msg.close_fds()
    assert all(map(is_closed, fds))


def test_set_vring_addr_body_is_40_bytes_in_desc_used_avail_log_order():
    payload = struct.pack("<IIQQQQ", 1, 0x1, 0x1000, 0x3000, 0x2000, 0x9000)
    assert len(payload) == 40
    msg = decode_one(frame(9, payload))
    assert msg.body == VringAddr(index=1, flags=VringAddrFlags.LOG, desc=0x1000, used=0x3000,
                                 avail=0x2000, log=0x9000)


def test_get_features_has_no_body_and_always_gets_a_response():
    msg = decode_one(frame(1))
    assert msg.request is Request.GET_FEATURES
    assert msg.body is None and msg.fds == ()
    assert needs_reply(msg.request, msg.flags, 0) == "response"
    reply = encode_u64_reply(msg, 0x1_4000_0000)
    assert reply == struct.pack("<IIIQ", 1, 0x5, 8, 0x1_4000_0000)


def test_set_vring_kick_with_nofd_bit_means_a_polled_ring_without_fd():
    msg = decode_one(frame(12, u64(0x100 | 3)))
    assert msg.body == VringFd(index=3, fd=None, nofd=True)
    assert msg.fds == ()


def test_set_vring_call_carries_its_eventfd(make_fds):
    (fd,) = make_fds(1)
    msg = decode_one(frame(13, u64(2)), [fd])
    assert msg.body == VringFd(index=2, fd=fd, nofd=False)
    assert msg.fds == (fd,)


def test_get_config_request_carries_size_zero_bytes():
    msg = decode_one(frame(24, struct.pack("<III", 0, 60, 0) + bytes(60)))
    assert msg.body == Config(offset=0, size=60, flags=0, payload=bytes(60))


def test_inflight_messages_are_24_bytes(make_fds):
    (fd,) = make_fds(1)
    payload = struct.pack("<QQHH4x", 0x4000, 0, 4, 128)
    assert decode_one(frame(31, payload)).body == InflightInfo(0x4000, 0, 4, 128, None)
    assert decode_one(frame(32, payload), [fd]).body == InflightInfo(0x4000, 0, 4, 128, fd)


def test_rem_mem_reg_accepts_and_closes_a_legacy_fd(make_fds):
    (fd,) = make_fds(1)
    msg = decode_one(frame(38, u64(0) + region(0x100000, 0x1000, 0x7F00, 0)), [fd])
    assert msg.body == MemRegMsg(MemoryRegion(0x100000, 0x1000, 0x7F00, 0), None)
    assert msg.fds == ()
    assert is_closed(fd)


def test_unmodelled_request_passes_payload_and_fds_to_the_caller(make_fds):
    (fd,) = make_fds(1)
    msg = decode_one(frame(42, b"\x01\x02\x03\x04"), [fd])
    assert msg.request is Request.SET_DEVICE_STATE_FD
    assert msg.body == Unknown(42, b"\x01\x02\x03\x04")
    assert msg.fds == (fd,) and not is_closed(fd)
    future = decode_one(frame(999, b"x"))
    assert future.request == 999 and future.body == Unknown(999, b"x")


def test_payload_of_exactly_the_maximum_size_is_accepted():
    msg = decode_one(frame(41, bytes(MAX_PAYLOAD_SIZE)))
    assert isinstance(msg.body, Unknown) and len(msg.body.payload) == MAX_PAYLOAD_SIZE


# --- incremental framing and fd attachment ----------------------------------------


def test_header_split_over_several_feeds_yields_one_message(make_fds):
    (fd,) = make_fds(1)
    data = frame(13, u64(0))
    d = Decoder()
    d.feed(data[:1], [fd])  # SCM_RIGHTS rides on the first byte
    assert d.next_message() is None
    for i in range(1, len(data)):
        assert d.next_message() is None
        d.feed(data[i:i + 1])
    msg = d.next_message()
    assert msg is not None and msg.body == VringFd(0, fd, False)
    assert d.next_message() is None


def test_body_arriving_after_the_header_completes_the_message():
    payload = struct.pack("<II", 0, 256)
    d = Decoder()
    d.feed(frame(8, payload)[:12])
    assert d.next_message() is None
    assert d.pending_bytes == 12
    d.feed(payload)
    msg = d.next_message()
    assert msg is not None and msg.body == VringState(0, 256)


def test_fds_read_with_the_header_belong_to_that_message_not_the_next(make_fds):
    fds = make_fds(2)
    table = frame(5, mem_table(region(0, 0x1000, 0x10000, 0), region(0x1000, 0x1000, 0x20000, 0)))
    d = Decoder()
    d.feed(table[:12], fds)           # recvmsg(12) returns the fds
    d.feed(table[12:] + frame(3))     # payload + a SET_OWNER in one read
    m1, m2 = d.next_message(), d.next_message()
    assert m1 is not None and m1.fds == tuple(fds)
    assert m2 is not None and m2.request is Request.SET_OWNER and m2.fds == ()


def test_greedy_read_ending_in_a_message_gives_that_message_the_fds(make_fds):
    # The kernel returns fds with the read that reaches their sendmsg and
    # stops right after it: tail of one message + the fd-bearing one.
    (fd,) = make_fds(1)
    first = frame(8, struct.pack("<II", 0, 256))
    d = Decoder()
    d.feed(first[:5])
    d.feed(first[5:] + frame(12, u64(0)), [fd])
    m1, m2 = d.next_message(), d.next_message()
    assert m1 is not None and m1.fds == ()
    assert m2 is not None and m2.body == VringFd(0, fd, False)


def test_fds_fed_without_bytes_go_to_the_next_message(make_fds):
    (fd,) = make_fds(1)
    d = Decoder()
    d.feed(frame(3))
    d.feed(b"", [fd])
    d.feed(frame(12, u64(1)))
    m1, m2 = d.next_message(), d.next_message()
    assert m1 is not None and m1.fds == ()
    assert m2 is not None and m2.body == VringFd(1, fd, False)


# --- round trips ------------------------------------------------------------------------

ROUND_TRIPS: list[tuple[Request, Callable[[list[int]], object], int]] = [
    (Request.GET_FEATURES, lambda f: None, 0),
    (Request.SET_FEATURES, lambda f: Features(0x1_7000_0000), 0),
    (Request.SET_OWNER, lambda f: None, 0),
    (Request.SET_MEM_TABLE, lambda f: SetMemTable(
        tuple(MemoryRegion(i << 30, 1 << 30, 0x7F00_0000_0000 + (i << 30), i << 30) for i in range(8)),
        tuple(f)), 8),
    (Request.SET_LOG_BASE, lambda f: LogInfo(0x10000, 0x1000, f[0]), 1),
    (Request.SET_VRING_NUM, lambda f: VringState(1, 1024), 0),
    (Request.SET_VRING_ADDR, lambda f: VringAddr(1, VringAddrFlags(0), 0x1000, 0x2000, 0x3000, 0), 0),
    (Request.SET_VRING_BASE, lambda f: VringState(0, join_packed_vring_base(5, True, 3, False)), 0),
    (Request.GET_VRING_BASE, lambda f: VringState(1, 0), 0),
    (Request.SET_VRING_KICK, lambda f: VringFd(255, f[0], False), 1),
    (Request.SET_VRING_ERR, lambda f: VringFd(0, None, True), 0),
    (Request.SET_PROTOCOL_FEATURES, lambda f: Features(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK), 0),
    (Request.SET_VRING_ENABLE, lambda f: VringState(1, 1), 0),
    (Request.SEND_RARP, lambda f: Rarp(b"\x52\x54\x00\x12\x34\x56"), 0),
    (Request.NET_SET_MTU, lambda f: U64(9000), 0),
    (Request.SET_BACKEND_REQ_FD, lambda f: BackendReqFd(f[0]), 1),
    (Request.GET_CONFIG, lambda f: Config(0, 57, 0, bytes(57)), 0),
    (Request.SET_CONFIG, lambda f: Config(32, 1, 0, b"\x01"), 0),
    (Request.GET_INFLIGHT_FD, lambda f: InflightInfo(0, 0, 2, 128), 0),
    (Request.SET_INFLIGHT_FD, lambda f: InflightInfo(8448, 0, 2, 128, f[0]), 1),
    (Request.GET_MAX_MEM_SLOTS, lambda f: None, 0),
    (Request.ADD_MEM_REG, lambda f: MemRegMsg(MemoryRegion(0x1000, 0x2000, 0x5000, 0), f[0]), 1),
    (Request.REM_MEM_REG, lambda f: MemRegMsg(MemoryRegion(0x1000, 0x2000, 0x5000, 0)), 0),
    (Request.SET_STATUS, lambda f: Status(0x0F), 0),
    (Request.GET_STATUS, lambda f: None, 0),
    (Request.POSTCOPY_END, lambda f: Unknown(Request.POSTCOPY_END, b""), 0),
]


@pytest.mark.parametrize(("request_code", "make_body", "nfds"), ROUND_TRIPS,
                         ids=[r.name for r, _, _ in ROUND_TRIPS])
def test_encoded_requests_decode_to_the_same_body_and_fds(make_fds, request_code, make_body, nfds):
    fds = make_fds(nfds)
    body = make_body(fds)
    data, sent_fds = encode_request(request_code, body, need_reply=True)
    assert sent_fds == tuple(fds)
    msg = decode_one(data, sent_fds, max_queues=256)
    assert msg.request == request_code
    assert msg.flags == HeaderFlag.VERSION | HeaderFlag.NEED_REPLY
    assert msg.body == body
    assert msg.fds == tuple(fds)


def test_encode_request_matches_hand_made_bytes(make_fds):
    fds = make_fds(2)
    body = SetMemTable((MemoryRegion(0, 0x1000, 0x10000, 0), MemoryRegion(0x2000, 0x1000, 0x20000, 0x2000)),
                       tuple(fds))
    assert encode_request(Request.SET_MEM_TABLE, body) == (
        frame(5, mem_table(region(0, 0x1000, 0x10000, 0), region(0x2000, 0x1000, 0x20000, 0x2000))), tuple(fds))
    assert encode_request(Request.SET_VRING_CALL, VringFd(4, None, True))[0] == frame(13, u64(0x104))
    assert encode_request(Request.GET_FEATURES) == (frame(1), ())


def test_encode_request_refuses_bodies_that_do_not_fit_the_request(make_fds):
    (fd,) = make_fds(1)
    with pytest.raises(LocalProtocolError):
        encode_request(Request.SET_FEATURES, VringState(0, 1))
    with pytest.raises(LocalProtocolError):
        encode_request(Request.SET_MEM_TABLE, SetMemTable((MemoryRegion(0, 1, 0, 0),), ()))
    with pytest.raises(LocalProtocolError):
        encode_request(Request.SET_VRING_KICK, VringFd(0, fd, True))
    with pytest.raises(LocalProtocolError):
        encode_request(Request.SET_VRING_KICK, VringFd(256, fd, False))
    with pytest.raises(LocalProtocolError):
        encode_request(Request.SET_FEATURES, Features(1 << 64))
    with pytest.raises(LocalProtocolError):
        encode_request(Request.GET_CONFIG, Config(0, 10, 0, bytes(4)))


def test_backend_channel_request_has_version_and_need_reply_flags():
    assert encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True) == frame(2, flags=0x9)


# --- replies ------------------------------------------------------------------------------


def request_msg(request: Request, body: object = None, flags: int = 0x1) -> Message:
    data, fds = encode_request(request, body)  # type: ignore[arg-type]
    return decode_one(struct.pack("<III", request, flags, len(data) - 12) + data[12:], fds)


def test_every_reply_has_flags_exactly_version_and_reply_and_the_request_code():
    get_base = request_msg(Request.GET_VRING_BASE, VringState(1, 0))
    reply = encode_reply(get_base, VringState(1, 42))
    assert reply == struct.pack("<IIIII", 11, 0x5, 8, 1, 42)
    ack = encode_ack(request_msg(Request.SET_MEM_TABLE, SetMemTable((), ()), flags=0x9), ok=False)
    assert ack == struct.pack("<IIIQ", 5, 0x5, 8, 1)


def test_replies_decode_on_the_frontend_side(make_fds):
    (fd,) = make_fds(1)
    get_config = request_msg(Request.GET_CONFIG, Config(0, 8, 0, bytes(8)))
    inflight = request_msg(Request.GET_INFLIGHT_FD, InflightInfo(0, 0, 1, 256))
    d = ReplyDecoder()
    d.feed(encode_u64_reply(Request.GET_PROTOCOL_FEATURES, ProtocolFeature.MQ | ProtocolFeature.CONFIG))
    d.feed(encode_reply(get_config, Config(0, 8, 0, b"\x00\x10\x00\x00\x00\x00\x00\x00")))
    data, fds = encode_inflight_reply(inflight, InflightInfo(4160, 0, 1, 256, fd))
    d.feed(data, fds)
    d.feed(encode_ack(Request.SET_MEM_TABLE))
    d.feed(encode_u64_reply(Request.GET_STATUS, 0x0B))
    d.feed(encode_reply(Request.GET_CONFIG, None))

    got = [d.next_message(), d.next_message(), d.next_message(), d.next_message(), d.next_message()]
    assert [m.body for m in got if m is not None] == [
        Features(ProtocolFeature.MQ | ProtocolFeature.CONFIG),
        Config(0, 8, 0, b"\x00\x10\x00\x00\x00\x00\x00\x00"),
        InflightInfo(4160, 0, 1, 256, fd),
        U64(0),
        Status(0x0B),
    ]
    last = d.next_message(expect=Request.GET_CONFIG)
    assert last is not None and last.body is None  # the back-end's "GET_CONFIG failed"


def test_reply_encoders_refuse_what_the_frontend_would_choke_on():
    with pytest.raises(LocalProtocolError, match="did not ask"):
        encode_ack(request_msg(Request.SET_MEM_TABLE, SetMemTable((), ())))
    with pytest.raises(LocalProtocolError):
        encode_ack(Request.GET_FEATURES)
    with pytest.raises(LocalProtocolError):
        encode_reply(request_msg(Request.GET_VRING_BASE, VringState(1, 0)), VringState(0, 0))
    with pytest.raises(LocalProtocolError):
        encode_reply(request_msg(Request.GET_CONFIG, Config(0, 8, 0, bytes(8))), Config(0, 4, 0, bytes(4)))
    with pytest.raises(LocalProtocolError):
        encode_reply(Request.SET_MEM_TABLE, 0)
    with pytest.raises(LocalProtocolError):
        encode_reply(Request.GET_INFLIGHT_FD, InflightInfo(0, 0, 1, 1))
    with pytest.raises(LocalProtocolError):
        encode_u64_reply(Request.GET_STATUS, 0x100)
    with pytest.raises(LocalProtocolError):
        encode_inflight_reply(Request.GET_INFLIGHT_FD, InflightInfo(4096, 0, 1, 1, None))


def test_inflight_not_supported_reply_has_no_fd():
    data, fds = encode_inflight_reply(Request.GET_INFLIGHT_FD, InflightInfo(0, 0, 0, 0))
    assert fds == () and data == struct.pack("<III", 31, 0x5, 24) + bytes(24)


@pytest.mark.parametrize("flags", [0x1, 0x4, 0xD, 0x15])
def test_reply_with_flags_other_than_0x5_is_the_backends_fault(flags):
    d = ReplyDecoder()
    d.feed(frame(1, u64(0), flags=flags))
    with pytest.raises(BackendProtocolError):
        d.next_message()


def test_reply_to_another_request_than_awaited_is_the_backends_fault(make_fds):
    (fd,) = make_fds(1)
    d = ReplyDecoder()
    d.feed(encode_u64_reply(Request.GET_FEATURES, 0))
    d.feed(b"", [fd])  # held for a message that will never be decoded
    with pytest.raises(BackendProtocolError, match="waiting for GET_PROTOCOL_FEATURES"):
        d.next_message(expect=Request.GET_PROTOCOL_FEATURES)
    assert is_closed(fd)


def test_inflight_reply_without_its_fd_is_the_backends_fault():
    d = ReplyDecoder()
    d.feed(frame(31, struct.pack("<QQHH4x", 4096, 0, 1, 128), flags=0x5))
    with pytest.raises(BackendProtocolError, match="fds"):
        d.next_message()


# --- the reply rule ---------------------------------------------------------------------

ACK = ProtocolFeature.REPLY_ACK


@pytest.mark.parametrize(("request_code", "flags", "acked", "expected"), [
    (Request.GET_FEATURES, 0x1, 0, "response"),
    (Request.GET_VRING_BASE, 0x9, ACK, "response"),   # never an ack on top of a response
    (Request.GET_CONFIG, 0x1, 0, "response"),
    (Request.SET_MEM_TABLE, 0x9, ACK, "ack"),
    (Request.SET_MEM_TABLE, 0x9, 0, "none"),          # NEED_REPLY without REPLY_ACK is ignored
    (Request.SET_MEM_TABLE, 0x1, ACK, "none"),
    (Request.SET_STATUS, 0x9, ACK | ProtocolFeature.STATUS, "ack"),
    (Request.POSTCOPY_END, 0x9, 0, "ack"),             # QEMU waits on this one regardless
    (Request.SET_LOG_BASE, 0x1, ProtocolFeature.LOG_SHMFD, "response"),
    (Request.SET_LOG_BASE, 0x1, 0, "none"),
    (Request.SET_VRING_KICK, 0x1, ACK, "none"),
])
def test_needs_reply(request_code, flags, acked, expected):
    assert needs_reply(request_code, flags, acked) == expected


# --- validation: the front-end's fault ------------------------------------------------------

R0 = region(0x0, 0x10000, 0x7F0000000000, 0)
R1 = region(0x10000, 0x10000, 0x7F0000010000, 0x10000)

# (name, bytes, number of fds to attach, decoder kwargs)
BAD: list[tuple[str, bytes, int, dict[str, int]]] = [
    ("version 0", frame(1, flags=0x0), 0, {}),
    ("version 2", frame(1, flags=0x2), 0, {}),
    ("version 3 with need_reply", frame(5, mem_table(R0), flags=0xB), 1, {}),
    ("request carrying REPLY", frame(1, flags=0x5), 0, {}),
    ("request code 0", frame(0), 0, {}),
    ("payload above the maximum", frame(41, bytes(MAX_PAYLOAD_SIZE + 1)), 0, {}),
    ("payload where none is allowed", frame(1, u64(0)), 0, {}),
    ("short u64", frame(2, b"\0" * 4), 0, {}),
    ("long vring state", frame(8, bytes(12)), 0, {}),
    ("vring addr of 48 bytes (old spec 'size' field)", frame(9, bytes(48)), 0, {}),
    ("fd on GET_FEATURES", frame(1), 1, {}),
    ("two fds on SET_VRING_CALL", frame(13, u64(0)), 2, {}),
    ("fd with the NOFD bit", frame(12, u64(0x100)), 1, {}),
    ("no fd without the NOFD bit", frame(12, u64(0)), 0, {}),
    ("undefined bits in the vring fd word", frame(13, u64(0x200)), 1, {}),
    ("mem table with fewer fds than regions", frame(5, mem_table(R0, R1)), 1, {}),
    ("mem table with more fds than regions", frame(5, mem_table(R0)), 2, {}),
    ("nine regions", frame(5, mem_table(*(region(i << 20, 1 << 20, i << 20, 0) for i in range(9)))), 9, {}),
    ("nregions disagrees with size", frame(5, mem_table(R0, nregions=2)), 1, {}),
    ("full 8-slot table for 1 region", frame(5, mem_table(R0, nregions=1) + bytes(7 * 32)), 1, {}),
    ("mem table shorter than its header", frame(5, b"\1\0\0\0"), 0, {}),
    ("region of size 0", frame(5, mem_table(region(0, 0, 0x1000, 0))), 1, {}),
    ("gpa + size wraps", frame(5, mem_table(region(2**64 - 0x1000, 0x2000, 0, 0))), 1, {}),
    ("uva + size wraps", frame(5, mem_table(region(0, 0x2000, 2**64 - 0x1000, 0))), 1, {}),
    ("mmap_offset + size wraps", frame(5, mem_table(region(0, 0x2000, 0, 2**64 - 1))), 1, {}),
    ("overlapping regions", frame(5, mem_table(R1, region(0x8000, 0x10000, 0x1000, 0))), 2, {}),
    ("add_mem_reg without fd", frame(37, u64(0) + R0), 0, {}),
    ("add_mem_reg with wrapping region", frame(37, u64(0) + region(2**64 - 1, 2, 0, 0)), 1, {}),
    ("rem_mem_reg with two fds", frame(38, u64(0) + R0), 2, {}),
    ("set_log_base without fd", frame(6, struct.pack("<QQ", 0x1000, 0)), 0, {}),
    ("vring index at max_queues (state)", frame(8, struct.pack("<II", 2, 256)), 0, {"max_queues": 2}),
    ("vring index at max_queues (addr)", frame(9, struct.pack("<IIQQQQ", 4, 0, 0, 0, 0, 0)), 0,
     {"max_queues": 2}),
    ("vring index at max_queues (kick)", frame(12, u64(2)), 1, {"max_queues": 2}),
    ("vring index at max_queues (get base)", frame(11, struct.pack("<II", 7, 0)), 0, {"max_queues": 2}),
    ("unknown vring addr flags", frame(9, struct.pack("<IIQQQQ", 0, 2, 0, 0, 0, 0)), 0, {}),
    ("enable value 2", frame(18, struct.pack("<II", 0, 2)), 0, {}),
    ("config above 256 bytes", frame(25, struct.pack("<III", 0, 257, 0) + bytes(257)), 0, {}),
    ("config size disagrees with payload", frame(24, struct.pack("<III", 0, 60, 0) + bytes(59)), 0, {}),
    ("status above a byte", frame(39, u64(0x100)), 0, {}),
    ("set_inflight_fd without fd", frame(32, struct.pack("<QQHH4x", 4096, 0, 1, 128)), 0, {}),
    ("get_inflight_fd of 20 bytes", frame(31, struct.pack("<QQHH", 4096, 0, 1, 128)), 0, {}),
    ("backend req fd missing", frame(21), 0, {}),
]


@pytest.mark.parametrize(("data", "nfds", "kw"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_requests_are_the_frontends_fault_and_their_fds_are_closed(make_fds, data, nfds, kw):
    fds = make_fds(nfds)
    d = Decoder(**kw)
    d.feed(data, fds)
    with pytest.raises(FrontendProtocolError) as info:
        d.next_message()
    assert isinstance(info.value.request, int)
    assert all(map(is_closed, fds)), "a rejected message's fds must not leak"
    assert d.error is info.value


def test_oversized_payload_is_refused_from_the_header_alone():
    d = Decoder()
    d.feed(struct.pack("<III", 41, 0x1, 0x7FFF_FFFF))  # the body never needs to arrive
    with pytest.raises(FrontendProtocolError, match="exceeds"):
        d.next_message()


def test_protocol_error_is_fatal_to_the_connection(make_fds):
    """After an error the decoder is dead: the byte stream is out of sync, so
    later calls raise instead of reading garbage as messages, and every fd it
    held or is given is closed."""
    early, late = make_fds(1), make_fds(1)
    d = Decoder()
    d.feed(frame(1, flags=0x2) + frame(13, u64(0)), early)  # bad version, then a valid message
    with pytest.raises(FrontendProtocolError) as first:
        d.next_message()
    assert is_closed(early[0])
    assert d.pending_bytes == 0 and d.pending_fds == 0

    with pytest.raises(UnusableDecoderError) as again:
        d.next_message()
    assert again.value.__cause__ is first.value
    with pytest.raises(UnusableDecoderError):
        d.feed(frame(3), late)
    assert is_closed(late[0])


def test_error_in_one_message_closes_fds_held_for_the_next(make_fds):
    bad_fds, next_fds = make_fds(1), make_fds(1)
    d = Decoder()
    d.feed(frame(1), bad_fds)                 # an fd on GET_FEATURES
    d.feed(frame(12, u64(0))[:6], next_fds)   # start of a kick message
    with pytest.raises(FrontendProtocolError):
        d.next_message()
    assert is_closed(bad_fds[0]) and is_closed(next_fds[0])


def test_close_releases_pending_fds_and_ends_the_decoder(make_fds):
    (fd,) = make_fds(1)
    d = Decoder()
    d.feed(frame(13, u64(0))[:12], [fd])
    assert d.next_message() is None and d.pending_fds == 1
    d.close()
    assert is_closed(fd)
    with pytest.raises(UnusableDecoderError):
        d.next_message()


def test_max_queues_must_be_positive():
    with pytest.raises(ValueError):
        Decoder(max_queues=0)


# --- packed vring base and constants ---------------------------------------------------------


def test_packed_vring_base_splits_into_indices_and_wrap_counters():
    num = 5 | (1 << 15) | (3 << 16) | (0 << 31)
    assert split_packed_vring_base(num) == PackedVringBase(5, True, 3, False)
    assert split_packed_vring_base(0x8000) == PackedVringBase(0, True, 0, False)  # DPDK's fresh ring
    assert join_packed_vring_base(0x7FFF, False, 0x7FFF, True) == 0xFFFF_7FFF
    assert split_packed_vring_base(0xFFFF_7FFF) == PackedVringBase(0x7FFF, False, 0x7FFF, True)
    with pytest.raises(LocalProtocolError):
        join_packed_vring_base(0x8000, False, 0, False)


def test_protocol_constants_match_the_specification():
    assert ProtocolFeature.BACKEND_REQ is ProtocolFeature.SLAVE_REQ
    assert ProtocolFeature.STATUS == 1 << 16 and ProtocolFeature.DEVICE_STATE == 1 << 19
    assert Request.SET_SLAVE_REQ_FD is Request.SET_BACKEND_REQ_FD == 21
    assert Request.GET_STATUS == 40 and Request.SET_DEVICE_STATE_FD == 42
    assert BackendRequest.VRING_HOST_NOTIFIER_MSG == 3
