"""Hypothesis fuzzing of what parses front-end and guest bytes (issue 7, "Fuzzing").

The rings have their own property tests (tests/test_queue_properties.py,
4,100 cases a run); this file covers the rest of the attack surface:

1. the vhost-user codec: arbitrary byte streams (well-formed frames, mutated
   frames, noise) cut at arbitrary points, with arbitrary fd counts on each
   chunk, into `Decoder` and `ReplyDecoder`. Only the documented error
   types come out, a failed decoder refuses all later use, every fd is either
   handed out in a message or closed (the process's fd count is exact), the
   decoder never holds more than one message's bytes or `MAX_FDS` fds, and
   every accepted typed body re-encodes to the bytes it came from;
2. the virtio-net parsers of guest buffers: the 12-byte (and legacy 10-byte)
   header on tx as loopback turns it into an rx header (`fix_header`),
   frame delivery into rx chains with and without mergeable buffers
   (`deliver`, `num_buffers`), the loopback tx -> rx path end to end, and
   control-queue commands;
3. the virtio-blk request parser (`BlkDevice.prepare` + `execute`) over
   chains with arbitrary segmentation, types, sectors and lengths.

Properties for 2 and 3: never an exception (a bad request is answered, a bad
frame dropped), never a hang (each example runs under a SIGALRM deadline),
never a read or write outside the buffers the chain gave (every buffer is
carved out of one arena whose other bytes are canaries, and device-readable
buffers must come back unchanged), every request completed exactly once
with a used length within its writable part, and for blk the image file
never grows.

Generated cases per run (``max_examples``; hypothesis stops earlier only if
it exhausts a strategy): raw bytes 1,500; framed codec stream 1,200; reply
stream 400; body round trip 1,000; fix_header 600; deliver 600; loopback
end to end 400; control 300; blk 1,000. Total 7,000 (`TOTAL_EXAMPLES`);
with the rings' 4,100 (tests/test_queue_properties.py): 11,100 per run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvirtio.devices.net import (
    CTRL_ERR,
    CTRL_OK,
    LEGACY_NET_HDR_SIZE,
    NET_HDR_SIZE,
    LoopbackPort,
    NetDevice,
    NetFeature,
    deliver,
)
from pyvirtio.queue import Chain
from pyvirtio.runtime import QueueCounters
from pyvirtio.vhost_user import (
    MAX_FDS,
    MAX_MESSAGE_SIZE,
    BackendProtocolError,
    Config,
    Decoder,
    Features,
    FrontendProtocolError,
    InflightInfo,
    LogInfo,
    MemoryRegion,
    MemRegMsg,
    Message,
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
    encode_request,
)

RAW_EXAMPLES = 1500
CODEC_EXAMPLES = 1200
REPLY_EXAMPLES = 400
ROUNDTRIP_EXAMPLES = 1000
FIX_HEADER_EXAMPLES = 600
DELIVER_EXAMPLES = 600
LOOPBACK_EXAMPLES = 400
CONTROL_EXAMPLES = 300
BLK_EXAMPLES = 1000
TOTAL_EXAMPLES = (RAW_EXAMPLES + CODEC_EXAMPLES + REPLY_EXAMPLES + ROUNDTRIP_EXAMPLES + FIX_HEADER_EXAMPLES
                  + DELIVER_EXAMPLES + LOOPBACK_EXAMPLES + CONTROL_EXAMPLES + BLK_EXAMPLES)  # 7,000

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.function_scoped_fixture])


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging if the body takes longer than `seconds`."""
    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"no return within {seconds}s (hang or spin)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# =====================================================================================
# 1. the vhost-user codec
# =====================================================================================

U32 = st.integers(0, 0xFFFF_FFFF)
U64 = st.integers(0, (1 << 64) - 1)
SMALL = st.one_of(st.integers(0, 4), st.integers(0, 300), U32)
REQUESTS = [int(r) for r in Request if r != Request.NONE]


ADDR = st.one_of(st.sampled_from([0, 1 << 20, 1 << 30, (1 << 64) - 4096]), U64)
RSIZE = st.one_of(st.sampled_from([0, 4096, 1 << 20, 1 << 63]), U64)
REGION_BYTES = st.tuples(ADDR, RSIZE, ADDR, st.one_of(st.just(0), U64)).map(lambda r: struct.pack("<QQQQ", *r))
U64_WORD = st.one_of(st.integers(0, 0x1FF), st.integers(0, 0xFFFF), U64).map(lambda v: struct.pack("<Q", v))
STATE = st.tuples(SMALL, SMALL).map(lambda t: struct.pack("<II", *t))
INFLIGHT = st.tuples(U64, U64, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)).map(
    lambda t: struct.pack("<QQHH4x", *t))
CONFIG = st.tuples(st.integers(0, 300), st.integers(0, 300), st.integers(0, 2)).map(
    lambda t: struct.pack("<III", *t) + b"\x55" * t[1])
NOISE = st.binary(max_size=80)
#: payloads shaped like each request's (so parsing goes deep), built once
SHAPED: dict[int, st.SearchStrategy[bytes]] = {
    Request.SET_MEM_TABLE: st.tuples(st.integers(0, 10), st.lists(REGION_BYTES, max_size=9)).map(
        lambda t: struct.pack("<II", t[0], 0) + b"".join(t[1])),
    Request.ADD_MEM_REG: REGION_BYTES.map(lambda r: bytes(8) + r),
    Request.REM_MEM_REG: REGION_BYTES.map(lambda r: bytes(8) + r),
    Request.SET_VRING_ADDR: st.tuples(SMALL, st.integers(0, 3), U64, U64, U64, U64).map(
        lambda t: struct.pack("<IIQQQQ", *t)),
    Request.GET_CONFIG: CONFIG,
    Request.SET_CONFIG: CONFIG,
    Request.SET_LOG_BASE: st.tuples(U64, U64).map(lambda t: struct.pack("<QQ", *t)),
    Request.GET_INFLIGHT_FD: INFLIGHT,
    Request.SET_INFLIGHT_FD: INFLIGHT,
    **{r: STATE for r in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
                          Request.SET_VRING_ENABLE)},
    **{r: U64_WORD for r in (Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES, Request.SET_VRING_KICK,
                             Request.SET_VRING_CALL, Request.SET_VRING_ERR, Request.SET_STATUS,
                             Request.NET_SET_MTU, Request.SEND_RARP)},
}
PAYLOADS = {r: st.one_of(SHAPED.get(r, st.just(b"")), SHAPED.get(r, st.just(b"")), SHAPED.get(r, st.just(b"")),
                         NOISE) for r in REQUESTS}
DEFAULT_PAYLOAD = st.one_of(st.just(b""), NOISE)
REQUEST_CODE = st.one_of(st.sampled_from(REQUESTS), st.sampled_from(REQUESTS), st.integers(0, 60), U32)
FLAGS = st.one_of(st.sampled_from([1, 1, 1, 9, 9]), st.sampled_from([0, 2, 3, 5, 0xD, 0x11]), U32)
FD_COUNT = st.one_of(st.just(0), st.just(0), st.just(1), st.integers(0, 3), st.integers(0, MAX_FDS + 2))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    request = draw(REQUEST_CODE, label="request")
    flags = draw(FLAGS, label="flags")
    payload = draw(PAYLOADS.get(request, DEFAULT_PAYLOAD), label="payload")
    size = draw(st.one_of(st.just(len(payload)), st.just(len(payload)), st.just(len(payload)),
                          st.integers(0, 64), st.sampled_from([4096, 4097, 0xFFFF_FFFF])), label="size")
    return struct.pack("<III", request, flags, size) + payload


FRAME_OR_NOISE = st.one_of(frames(), frames(), frames(), st.binary(max_size=40))


@st.composite
def chunked_stream(draw: st.DrawFn) -> list[tuple[bytes, int]]:
    """Frames (or noise) cut into chunks, each chunk with some fds."""
    parts = draw(st.lists(FRAME_OR_NOISE, min_size=1, max_size=6))
    stream = b"".join(parts)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(stream)), max_size=6), label="cuts")))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    return [(p, draw(FD_COUNT, label="fds")) for p in pieces]


def run_decoder(dec: Decoder | ReplyDecoder, chunks: list[tuple[bytes, int]], error: type[Exception],
                expect: int | None = None) -> list[Message]:
    """Feed every chunk (with fresh eventfds), drain messages; checks the
    bounds after each drain and that a failed decoder stays failed."""
    out: list[Message] = []
    failed = False
    for data, nfds in chunks:
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
        if failed:
            with pytest.raises(UnusableDecoderError):
                dec.feed(data, fds)  # the fds are the decoder's: it closes them
            break
        dec.feed(data, fds)
        try:
            while True:
                msg = dec.next_message(expect) if isinstance(dec, ReplyDecoder) else dec.next_message()
                if msg is None:
                    break
                for fd in msg.fds:
                    os.fstat(fd)  # a handed-out fd is open (not closed behind our back)
                out.append(msg)
        except error as e:
            assert isinstance(e, (FrontendProtocolError, BackendProtocolError))
            assert dec.error is e and dec.pending_fds == 0 and dec.pending_bytes == 0
            event(f"refused: {str(e).split(':')[-1].strip()[:40]}")
            failed = True
            with pytest.raises(UnusableDecoderError):
                dec.next_message() if isinstance(dec, Decoder) else dec.next_message(expect)
            continue
        assert dec.pending_bytes < MAX_MESSAGE_SIZE, "the decoder buffers more than one message"
        assert dec.pending_fds <= MAX_FDS, "the decoder holds more fds than a message may carry"
    return out


@settings(FUZZ, max_examples=CODEC_EXAMPLES)
@given(chunks=chunked_stream(), max_queues=st.one_of(st.none(), st.integers(1, 300)))
def test_decoder_on_arbitrary_bytes_and_fds_raises_only_frontend_errors_and_leaks_no_fd(chunks, max_queues):
    before = fd_count()
    dec = Decoder(max_queues=max_queues)
    with deadline(2.0):
        msgs = run_decoder(dec, chunks, FrontendProtocolError)
    for m in msgs:
        event(f"decoded {type(m.body).__name__}")
        assert isinstance(m.body, (type(None), Features, SetMemTable, MemRegMsg, LogInfo, VringState, VringAddr,
                                   VringFd, Config, InflightInfo, Status, Rarp, Unknown)) or m.body.__class__.__name__ in (
            "U64", "BackendReqFd", "LogFd")
        if max_queues is not None and isinstance(m.body, (VringState, VringAddr, VringFd)):
            assert m.body.index < max_queues
        m.close_fds()
    dec.close()
    with pytest.raises(UnusableDecoderError):
        dec.feed(b"x")
    assert fd_count() == before, "fds leaked (or closed twice)"


RAW_CHUNKS = st.lists(st.tuples(st.binary(max_size=48), st.integers(0, MAX_FDS + 2)), min_size=1, max_size=5)


@settings(FUZZ, max_examples=RAW_EXAMPLES)
@given(chunks=RAW_CHUNKS)
def test_decoder_on_raw_random_bytes_and_fd_counts_raises_only_frontend_errors(chunks):
    """Plain random bytes (no frame structure) with 0..10 fds per chunk."""
    before = fd_count()
    dec = Decoder(max_queues=2)
    with deadline(2.0):
        for m in run_decoder(dec, chunks, FrontendProtocolError):
            m.close_fds()
    dec.close()
    assert fd_count() == before


@settings(FUZZ, max_examples=REPLY_EXAMPLES)
@given(data=st.data())
def test_reply_decoder_on_arbitrary_bytes_raises_only_backend_errors_and_leaks_no_fd(data):
    before = fd_count()
    chunks = data.draw(chunked_stream(), label="stream")
    expect = data.draw(st.one_of(st.none(), st.sampled_from(REQUESTS)), label="expect")
    dec = ReplyDecoder()
    with deadline(2.0):
        msgs = run_decoder(dec, chunks, BackendProtocolError, expect)
    for m in msgs:
        assert expect is None or m.request == expect
        m.close_fds()
    dec.close()
    assert fd_count() == before


# -- typed bodies survive encode -> wire -> decode exactly -------------------------------------------

REGION = st.builds(MemoryRegion, st.integers(0, 1 << 40), st.integers(1, 1 << 30), st.integers(0, 1 << 46),
                   st.integers(0, 1 << 30))
IDX = st.integers(0, 255)


def bodies() -> st.SearchStrategy[tuple[int, object, int]]:
    """(request, body, fds to attach) for every modelled request."""
    def table(rs: list[MemoryRegion]) -> tuple[int, object, int]:
        rs = sorted({r.guest_phys_addr: r for r in rs}.values(), key=lambda r: r.guest_phys_addr)
        fixed = []
        end = 0
        for r in rs:  # make them disjoint: shift each past the previous end
            gpa = max(r.guest_phys_addr, end)
            fixed.append(MemoryRegion(gpa, r.memory_size, r.userspace_addr, r.mmap_offset))
            end = gpa + r.memory_size
        return (Request.SET_MEM_TABLE, SetMemTable(tuple(fixed), tuple(range(len(fixed)))), len(fixed))

    return st.one_of(
        st.sampled_from([Request.GET_FEATURES, Request.SET_OWNER, Request.RESET_OWNER, Request.GET_PROTOCOL_FEATURES,
                         Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS,
                         Request.RESET_DEVICE]).map(lambda r: (r, None, 0)),
        st.tuples(st.sampled_from([Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES]), U64).map(
            lambda t: (t[0], Features(t[1]), 0)),
        st.integers(0, 0xFF).map(lambda v: (Request.SET_STATUS, Status(v), 0)),
        st.binary(min_size=6, max_size=6).map(lambda m: (Request.SEND_RARP, Rarp(m), 0)),
        st.lists(REGION, min_size=1, max_size=8).map(table),
        REGION.map(lambda r: (Request.ADD_MEM_REG, MemRegMsg(r, 0), 1)),
        REGION.map(lambda r: (Request.REM_MEM_REG, MemRegMsg(r), 0)),
        st.tuples(st.sampled_from([Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE]), IDX,
                  U32).map(lambda t: (t[0], VringState(t[1], t[2]), 0)),
        st.tuples(IDX, st.integers(0, 1)).map(lambda t: (Request.SET_VRING_ENABLE, VringState(*t), 0)),
        st.tuples(IDX, st.integers(0, 1), U64, U64, U64, U64).map(
            lambda t: (Request.SET_VRING_ADDR, VringAddr(t[0], VringAddrFlags(t[1]), *t[2:]), 0)),
        st.tuples(st.sampled_from([Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]), IDX,
                  st.booleans()).map(lambda t: (t[0], VringFd(t[1], None if t[2] else 0, t[2]), 0 if t[2] else 1)),
        st.tuples(st.sampled_from([Request.GET_CONFIG, Request.SET_CONFIG]), st.integers(0, 1000),
                  st.binary(max_size=256), st.integers(0, 1)).map(
            lambda t: (t[0], Config(t[1], len(t[2]), t[3], t[2] if t[0] == Request.SET_CONFIG else bytes(len(t[2]))),
                       0)),
        st.tuples(st.integers(1, 1 << 40), st.integers(0, 1 << 40), st.integers(0, 0xFFFF),
                  st.integers(0, 0xFFFF)).map(lambda t: (Request.SET_INFLIGHT_FD, InflightInfo(*t, fd=0), 1)),
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)).map(
            lambda t: (Request.GET_INFLIGHT_FD, InflightInfo(0, 0, *t), 0)),
        st.tuples(st.integers(1, 1 << 40), st.integers(0, 1 << 40)).map(
            lambda t: (Request.SET_LOG_BASE, LogInfo(t[0], t[1], 0), 1)),
    )


def _with_fds(body: object, fds: list[int]) -> object:
    """The body with placeholder fd fields replaced by real fds."""
    if isinstance(body, SetMemTable):
        return SetMemTable(body.regions, tuple(fds))
    if isinstance(body, (MemRegMsg, VringFd, InflightInfo, LogInfo)) and fds:
        kw = {f: getattr(body, f) for f in body.__slots__}  # type: ignore[attr-defined]
        kw["fd"] = fds[0]
        return type(body)(**kw)
    return body


@settings(FUZZ, max_examples=ROUNDTRIP_EXAMPLES)
@given(item=bodies(), need_reply=st.booleans(), cut=st.integers(0, 400))
def test_every_typed_body_decodes_to_exactly_what_was_encoded(item, need_reply, cut):
    request, body, nfds = item
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    body = _with_fds(body, fds)
    data, sent = encode_request(request, body, need_reply)  # type: ignore[arg-type]
    assert list(sent) == fds
    dec = Decoder()
    cut = min(cut, len(data))
    dec.feed(data[:cut], fds)  # fds arrive with the first chunk (maybe an empty one)
    msg = dec.next_message()
    assert msg is None or cut == len(data)
    dec.feed(data[cut:])
    msg = msg or dec.next_message()
    assert msg is not None and dec.next_message() is None
    assert msg.request == request and msg.body == body and list(msg.fds) == fds
    assert msg.need_reply == need_reply
    msg.close_fds()


# =====================================================================================
# 2./3. guest buffers: chains carved out of one canary-guarded arena
# =====================================================================================

CANARY = 0xC5
ARENA = 1 << 16


class Arena:
    """Host memory standing in for guest memory: buffers are carved out of it
    in order with canary gaps, so any write outside them shows."""

    def __init__(self) -> None:
        self.buf = bytearray([CANARY]) * ARENA
        self.mv = memoryview(self.buf)
        self.pos = 16
        self.spans: list[tuple[int, int, bool]] = []  # (start, end, writable)

    def carve(self, data: bytes, writable: bool) -> memoryview:
        n = len(data)
        if self.pos + n + 16 > ARENA:
            raise OverflowError
        start = self.pos
        self.buf[start:start + n] = data
        self.pos += n + 16
        self.spans.append((start, start + n, writable))
        return self.mv[start:start + n]

    def check(self, readable_before: dict[int, bytes]) -> None:
        """Canaries intact; device-readable buffers unchanged."""
        edges = [(0, 16)]
        for (_, e, _), (s2, _, _) in zip(self.spans, self.spans[1:]):
            edges.append((e, s2))
        if self.spans:
            edges.append((self.spans[-1][1], ARENA))
        for a, b in edges:
            assert self.buf[a:b] == bytes([CANARY]) * (b - a), f"write outside the buffers at {a}..{b}"
        for start, data in readable_before.items():
            assert bytes(self.buf[start:start + len(data)]) == data, "a device-readable buffer was written"

    def readable_snapshot(self) -> dict[int, bytes]:
        return {s: bytes(self.buf[s:e]) for s, e, w in self.spans if not w}


def make_chain(arena: Arena, readable: list[bytes], writable: list[int], cid: int = 0) -> Chain:
    r = [arena.carve(d, False) for d in readable if d]
    w = [arena.carve(bytes([0xEE]) * n, True) for n in writable if n]
    return Chain(cid, cid, 1, r, w, sum(map(len, r)), sum(map(len, w)))


SEGMENT_LENS = st.lists(st.one_of(st.integers(1, 16), st.integers(1, 200), st.integers(1, 1600)), max_size=3)


# -- virtio-net ------------------------------------------------------------------------------


HDR_FLAGS = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 255))
HDR_GSO = st.one_of(st.sampled_from([0, 1, 3, 4, 0x81, 0x84]), st.integers(0, 255))
HDR_U16 = st.one_of(st.integers(0, 100), st.integers(0, 0xFFFF))
NET_HDR_FIELDS = st.tuples(HDR_FLAGS, HDR_GSO, HDR_U16, HDR_U16, HDR_U16, HDR_U16, HDR_U16).map(
    lambda t: struct.pack("<BBHHHHH", *t))
FRAME_BODY = st.binary(min_size=0, max_size=300)


#: Frames shorter than the virtio-net header are left out: loopback and
#: `deliver` crash on them (devices/net.py, not ours to fix here); the
#: minimal inputs are strict-xfail regression tests in
#: tests/test_fuzz_regressions.py. Set True once net.py drops such frames.
SHORT_FRAMES_FIXED = True


@st.composite
def tx_frame(draw: st.DrawFn, hdr_len: int) -> bytes:
    """A tx buffer: a header (any field values) and a frame; sometimes shorter than a header."""
    body = draw(FRAME_BODY, label="frame")
    whole = draw(NET_HDR_FIELDS, label="header")[:hdr_len] + body
    if not SHORT_FRAMES_FIXED:
        return whole
    return draw(st.one_of(st.just(whole), st.just(whole), st.just(whole),
                          st.integers(0, hdr_len).map(lambda n: whole[:n])), label="tx frame")


NET_FEATURES = st.lists(st.sampled_from([NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6,
                                         NetFeature.GUEST_ECN, NetFeature.GUEST_UFO, NetFeature.MRG_RXBUF,
                                         NetFeature.CSUM]), unique=True).map(lambda fs: sum(fs, 0))


@settings(FUZZ, max_examples=FIX_HEADER_EXAMPLES)
@given(data=st.data())
def test_loopback_header_fixup_of_any_tx_header_returns_a_frame_or_drops_it(data):
    """`fix_header` turns a guest's tx header into one valid for its rx side:
    a frame of the same length with a header the guest acked, or None."""
    hdr_len = data.draw(st.sampled_from([NET_HDR_SIZE, LEGACY_NET_HDR_SIZE]), label="hdr_len")
    features = data.draw(NET_FEATURES, label="features")
    port = LoopbackPort(1)
    try:
        port.configure(features, hdr_len)
        frame = data.draw(tx_frame(hdr_len), label="frame")
        with deadline(2.0):
            out = port.fix_header(frame)
        if out is None:
            event("dropped")
            return
        assert len(out) == len(frame)
        gso = out[1] & 0x7F
        assert gso == 0 or features & {1: NetFeature.GUEST_TSO4, 3: NetFeature.GUEST_UFO,
                                       4: NetFeature.GUEST_TSO6}.get(gso, 0)
        if out[0] & 1:  # NEEDS_CSUM is left only for a guest that takes it
            assert features & NetFeature.GUEST_CSUM
        if hdr_len == NET_HDR_SIZE:
            assert out[10:12] == b"\x01\x00"
    finally:
        port.close()


@settings(FUZZ, max_examples=DELIVER_EXAMPLES)
@given(data=st.data())
def test_frame_delivery_into_any_rx_chains_writes_only_their_buffers_and_accounts_every_byte(data):
    arena = Arena()
    mergeable = data.draw(st.booleans(), label="mergeable")
    hdr_len = NET_HDR_SIZE if mergeable else data.draw(st.sampled_from([NET_HDR_SIZE, LEGACY_NET_HDR_SIZE]))
    frame = data.draw(tx_frame(hdr_len), label="frame")
    nchains = data.draw(st.integers(1, 5), label="chains")
    held = deque(make_chain(arena, [], data.draw(SEGMENT_LENS, label="rx buffers"), i) for i in range(nchains))
    before_held = list(held)
    done: list[tuple[Chain, int]] = []
    with deadline(2.0):
        k = deliver(held, frame, hdr_len, mergeable, done)
    arena.check({})
    if k == 0:
        assert list(held) == before_held and done == []
        assert len(frame) > held[0].writable_len
        return
    event(f"delivered into {k} chain(s)")
    assert len(done) == k and list(held) == before_held[k:]
    assert [c for c, _ in done] == before_held[:k]
    assert sum(n for _, n in done) == len(frame)
    for c, n in done:
        assert 0 <= n <= c.writable_len
    got = b"".join(bytes(b"".join(c.writable))[:n] for c, n in done)
    if k > 1 or (mergeable and len(frame) > before_held[0].writable_len):
        assert got[:10] == frame[:10] and got[12:] == frame[12:]
        if before_held[0].writable_len >= hdr_len:
            assert struct.unpack_from("<H", got, 10)[0] == k  # num_buffers
        else:  # a driver breaking "each rx buffer MUST hold the header" (5.1.6.3.1) gets a wrong count
            event("first rx buffer smaller than the header")
    else:
        assert got == frame


def _loopback_case(data: st.DataObject, arena: Arena) -> tuple[LoopbackPort, int, list[Chain], list[Chain]]:
    hdr_len = data.draw(st.sampled_from([NET_HDR_SIZE, LEGACY_NET_HDR_SIZE]), label="hdr_len")
    features = data.draw(NET_FEATURES, label="features")
    port = LoopbackPort(1)
    port.configure(features, hdr_len)
    tx = []
    for i in range(data.draw(st.integers(1, 6), label="tx chains")):
        frame = data.draw(tx_frame(hdr_len), label="tx frame")
        split = data.draw(st.lists(st.integers(0, len(frame)), max_size=3), label="split")
        cuts = sorted(set(split))
        parts = [frame[a:b] for a, b in zip([0, *cuts], [*cuts, len(frame)])]
        tx.append(make_chain(arena, parts, [], i))
    rx = [make_chain(arena, [], data.draw(SEGMENT_LENS, label="rx buffers"), 100 + i)
          for i in range(data.draw(st.integers(0, 8), label="rx chains"))]
    return port, hdr_len, tx, rx


@settings(FUZZ, max_examples=LOOPBACK_EXAMPLES)
@given(data=st.data())
def test_loopback_tx_to_rx_never_raises_and_completes_every_rx_chain_at_most_once(data):
    """Guest tx buffers (any header, any length, any split into descriptors)
    through the loopback port into guest rx chains: frames are delivered or
    dropped and counted, nothing outside the rx buffers is written, tx
    buffers are not modified."""
    arena = Arena()
    port, _hdr_len, tx, rx = _loopback_case(data, arena)
    readable = arena.readable_snapshot()
    ctx, crx = QueueCounters(), QueueCounters()
    held: deque[Chain] = deque(rx[:1])
    pending = deque(rx[1:])
    done: list[tuple[Chain, int]] = []

    def more() -> list[Chain]:
        return [pending.popleft()] if pending else []

    try:
        with deadline(2.0):
            port.tx(0, tx, ctx)
            q = port.queues[0]
            queued = len(q.frames)
            if held:
                q.fill(held, done, crx, more)
    finally:
        port.close()
    arena.check(readable)
    chains = [c for c, _ in done]
    assert len(chains) == len(set(map(id, chains))), "an rx chain was completed twice"
    assert all(0 <= n <= c.writable_len for c, n in done)
    consumed = queued - len(q.frames)
    assert crx.packets + crx.dropped == consumed
    event(f"{crx.packets} delivered, {crx.dropped} dropped")


@settings(FUZZ, max_examples=CONTROL_EXAMPLES)
@given(cmd=st.one_of(st.tuples(st.integers(0, 6), st.integers(0, 3)).flatmap(
    lambda t: st.binary(max_size=12).map(lambda b: bytes(t) + b)), st.binary(min_size=2, max_size=64)),
    pairs=st.integers(1, 4))
def test_control_commands_of_any_bytes_are_acked_ok_or_err_and_keep_the_pair_count_valid(cmd, pairs):
    dev = NetDevice("sink", queue_pairs=pairs)
    try:
        with deadline(2.0):
            ack = dev.control(cmd)
        assert ack in (CTRL_OK, CTRL_ERR)
        assert 1 <= dev.active_pairs <= pairs
        event("ok" if ack == CTRL_OK else "err")
    finally:
        dev.close()


# -- virtio-blk --------------------------------------------------------------------------------


BLK_SECTORS = 64  # a 32 KiB image (+ a partial sector the device must ignore)


@pytest.fixture(scope="module")
def blk_device(tmp_path_factory):
    try:
        from pyvirtio.devices.blk import BlkDevice
    except ImportError:  # pragma: no cover - blk.py is being written
        pytest.skip("src/pyvirtio/devices/blk.py does not exist yet")
    path = Path(tmp_path_factory.mktemp("blk")) / "disk.img"
    path.write_bytes(bytes(range(256)) * (BLK_SECTORS * 2) + b"tail")
    dev = BlkDevice(str(path), io_threads=0, serial="fuzz")
    yield dev, path
    dev.close()


BLK_TYPE = st.one_of(st.sampled_from([0, 1, 4, 8, 11, 13]), st.integers(0, 20), U32)
BLK_SECTOR = st.one_of(st.integers(0, BLK_SECTORS + 2), st.sampled_from([(1 << 64) - 1, 1 << 55]), U64)
BLK_NSEC = st.one_of(st.integers(0, 4), st.integers(0, BLK_SECTORS + 2))
BLK_ODD = st.one_of(st.just(0), st.just(0), st.integers(-3, 3))
BLK_SEGS = st.lists(st.tuples(st.one_of(st.integers(0, BLK_SECTORS + 1), U64), st.one_of(st.integers(0, 8), U32),
                              st.sampled_from([0, 0, 1, 2])), max_size=3)
BLK_STATUS_ROOM = st.one_of(st.just(1), st.just(1), st.integers(0, 3))
CUTS = st.lists(st.integers(0, 1 << 16), max_size=3)
WSPLIT = st.lists(st.integers(1, 600), max_size=2)


@st.composite
def blk_request(draw: st.DrawFn) -> tuple[list[bytes], list[int]]:
    """(readable parts, writable lengths) of a virtio-blk request of any shape."""
    dwz = struct.Struct("<QII")  # DISCARD / WRITE_ZEROES segment
    typ = draw(BLK_TYPE, label="type")
    hdr = struct.pack("<IIQ", typ, draw(st.sampled_from([0, 0, 1])), draw(BLK_SECTOR, label="sector"))
    hdr = hdr[:draw(st.one_of(st.just(16), st.just(16), st.integers(0, 15)), label="header bytes")]
    datalen = max(0, draw(BLK_NSEC, label="sectors") * 512 + draw(BLK_ODD, label="odd bytes"))
    readable = [hdr]
    writable = 0
    if typ == 1:  # OUT: data after the header
        readable.append(bytes([0x77]) * datalen)
    elif typ in (11, 13):  # DISCARD / WRITE_ZEROES: segments
        readable.append(b"".join(dwz.pack(*seg) for seg in draw(BLK_SEGS, label="segments"))
                        + draw(st.binary(max_size=3), label="junk"))
    else:
        writable = datalen
    writable += draw(BLK_STATUS_ROOM, label="status room")
    # re-split both parts at arbitrary points (the header may span descriptors)
    blob = b"".join(readable)
    cuts = sorted({c % (len(blob) + 1) for c in draw(CUTS, label="cuts")})
    parts = [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)])]
    pieces = []
    for n in draw(WSPLIT, label="writable split"):
        if n < writable:
            pieces.append(n)
            writable -= n
    pieces.append(writable)
    return parts, pieces


@settings(FUZZ, max_examples=BLK_EXAMPLES)
@given(req=blk_request(), read_only=st.booleans())
def test_blk_requests_of_any_shape_get_a_status_and_stay_inside_their_buffers_and_the_disk(blk_device, req,
                                                                                           read_only):
    from pyvirtio.devices.blk import S_IOERR, S_OK, S_UNSUPP
    dev, path = blk_device
    size = path.stat().st_size
    dev.read_only = read_only
    arena = Arena()
    try:
        chain = make_chain(arena, *req)
    except OverflowError:
        return
    readable = arena.readable_snapshot()
    with deadline(3.0):
        r = dev.prepare(chain)
        used = r if isinstance(r, int) else dev.execute(r)
    arena.check(readable)
    assert path.stat().st_size == size, "the image grew"
    assert 0 <= used <= chain.writable_len
    if chain.writable_len:
        status = chain.writable[-1][-1]
        assert status in (S_OK, S_IOERR, S_UNSUPP)
        event(f"status {status}")
    else:
        assert used == 0
        event("no room for a status")
