"""Inputs the fuzzers found, inlined as regression tests.

Each test names the fuzzer that found the input (hypothesis in
tests/test_fuzz_codec_devices.py, or an atheris target under fuzz/) and the
shrunk input. A test for a bug in code owned elsewhere is a strict xfail
whose reason carries "BUG:"; when the fix lands the xfail turns into a
failure (XPASS), which is the signal to drop the mark (and, for the net
frames, to set `SHORT_FRAMES_FIXED` in the hypothesis file).
"""

from __future__ import annotations

import os
import struct
import sys
from collections import deque
from pathlib import Path

import pytest

from pyvirtio.devices.net import NET_HDR_SIZE, LoopbackPort, deliver
from pyvirtio.queue import Chain
from pyvirtio.runtime import QueueCounters
from pyvirtio.vhost_user import Decoder, FrontendProtocolError, UnusableDecoderError


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rx_chain(*sizes: int) -> Chain:
    w = [memoryview(bytearray(n)) for n in sizes if n]
    return Chain(0, 0, 1, [], w, 0, sum(map(len, w)))


def tx_chain(data: bytes) -> Chain:
    r = [memoryview(bytearray(data))] if data else []
    return Chain(0, 0, 1, r, [], len(data), 0)


# --- vhost-user codec ----------------------------------------------------------------------


def test_fds_trickled_on_an_incomplete_message_are_refused_at_the_ninth():
    """Found by test_hostile_frontend (fds_trickled_with_a_slow_payload):
    a header announcing a 4000-byte payload, then one byte at a time with 8
    fds each. The decoder held every fd until the message completed, so a
    front-end could fill the fd table. Fixed in codec.py: refused as soon as
    the message in progress holds more than MAX_FDS fds."""
    before = fd_count()
    dec = Decoder()
    dec.feed(struct.pack("<III", 99, 1, 4000))
    assert dec.next_message() is None
    dec.feed(b"\0", [os.eventfd(0) for _ in range(8)])
    assert dec.next_message() is None and dec.pending_fds == 8
    dec.feed(b"\0", [os.eventfd(0)])
    with pytest.raises(FrontendProtocolError, match="more than 8 file descriptors"):
        dec.next_message()
    assert dec.pending_fds == 0 and fd_count() == before
    with pytest.raises(UnusableDecoderError):
        dec.feed(b"\0")


def _fuzz_target(name: str):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds fuzz/
    from fuzz import targets
    return targets.TARGETS[name]


#: atheris `codec` target, 30 executions into a run against the pre-fix decoder
#: (fuzz/crashes/codec-crash-5ab5b367...): Decoder(max_queues=2); a chunk of 0
#: bytes with 1 fd, then 0xfc... : fds piling up on a message that never completes.
ATHERIS_CODEC_CRASH_1 = bytes.fromhex("0400000100fcfff7fffffffeff000000000000")


def test_atheris_codec_crash_1_fds_held_by_an_incomplete_message():
    before = fd_count()
    _fuzz_target("codec")(ATHERIS_CODEC_CRASH_1)  # asserts pending_fds <= MAX_FDS after every read
    assert fd_count() == before


def test_fds_fed_before_a_partial_header_count_toward_the_bound():
    """The same bound while the header itself is incomplete."""
    before = fd_count()
    dec = Decoder()
    dec.feed(b"\x01", [os.eventfd(0) for _ in range(5)])
    assert dec.next_message() is None
    dec.feed(b"\x00", [os.eventfd(0) for _ in range(5)])
    with pytest.raises(FrontendProtocolError, match="a message: carries more than 8"):
        dec.next_message()
    assert fd_count() == before


def test_eight_fds_spread_over_a_message_are_still_accepted():
    """The bound is the protocol's: SET_MEM_TABLE's 8 fds may arrive split."""
    from pyvirtio.vhost_user import MemoryRegion, Request, SetMemTable, encode_request
    fds = [os.eventfd(0) for _ in range(8)]
    regions = tuple(MemoryRegion(i << 20, 1 << 20, i << 20, 0) for i in range(8))
    data, _ = encode_request(Request.SET_MEM_TABLE, SetMemTable(regions, tuple(fds)))
    dec = Decoder()
    dec.feed(data[:5], fds[:3])
    assert dec.next_message() is None
    dec.feed(data[5:100], fds[3:])
    assert dec.next_message() is None
    dec.feed(data[100:])
    msg = dec.next_message()
    assert msg is not None and list(msg.fds) == fds
    msg.close_fds()


# --- virtio-net: tx frames shorter than the header (hypothesis, test_fuzz_codec_devices) -----------

@pytest.mark.parametrize("frame", [b"", b"\x01", b"\x00" * 11], ids=["empty", "1 byte", "11 bytes"])
def test_loopback_drops_a_tx_frame_shorter_than_the_header(frame):
    """Shrunk by hypothesis (test_loopback_tx_to_rx_...): tx frames b"" and
    b"\\x01" before a full one. Expected: the short frame is dropped and
    counted; the full frame behind it still arrives; nothing raises."""
    port = LoopbackPort(1)
    try:
        port.configure(0, NET_HDR_SIZE)
        ctx, crx = QueueCounters(), QueueCounters()
        good = bytes(NET_HDR_SIZE) + b"\xaa" * 60
        port.tx(0, [tx_chain(frame), tx_chain(good)], ctx)
        held = deque([rx_chain(2048), rx_chain(2048)])
        done: list[tuple[Chain, int]] = []
        port.queues[0].fill(held, done, crx, list)
        assert [n for _, n in done] == [len(good)]
        assert crx.packets == 1 and ctx.dropped + crx.dropped == 1
        assert ctx.bytes >= 0
    finally:
        port.close()


def test_loopback_header_fixup_keeps_the_length_of_a_short_frame():
    """Shrunk by hypothesis (test_loopback_header_fixup_...): a 10-byte
    frame with flags set under a 12-byte header came back 12 bytes long
    (`out[10:12] = num_buffers` extends it); b"\\x01" raises struct.error."""
    port = LoopbackPort(1)
    try:
        port.configure(0, NET_HDR_SIZE)
        for frame in (b"\x01" + bytes(9), b"\x01"):
            out = port.fix_header(frame)
            assert out is None or len(out) == len(frame)
    finally:
        port.close()


def test_deliver_of_an_empty_frame_into_a_chain_without_writable_buffers():
    """Shrunk by hypothesis (test_frame_delivery_...): frame b"", one rx
    chain with no writable descriptor."""
    held = deque([rx_chain()])
    done: list[tuple[Chain, int]] = []
    assert deliver(held, b"", NET_HDR_SIZE, False, done) in (0, 1)
