"""Dirty logging for live migration: every guest page the device writes is
marked in the front-end's bitmap (and nothing the device only read), at
the queue level for every chain form, and end to end through vhost-user
(SET_LOG_BASE, VHOST_F_LOG_ALL, the ring LOG flag) with a net device.

The real-QEMU migrations are in test_guest_migration.py.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pyvirtio import dirtylog
from pyvirtio.dirtylog import LOG_PAGE, SKIP_ENV, DirtyLog, traced_ranges
from pyvirtio.driver.frontend import VhostUserFrontend, make_frame
from pyvirtio.queue.bulk import Bulk
from pyvirtio.queue.chain import IOV_MIN_SEGMENTS, IovChain
from pyvirtio.testing import QueuePair


def pages(gpa: int, n: int) -> set[int]:
    return set(range(gpa >> 12, ((gpa + n - 1) >> 12) + 1)) if n else set()


def log_for(pair: QueuePair, *, skip: bool = False) -> DirtyLog:
    size = pair.raw.regions[0].size
    return DirtyLog(bytearray(size // LOG_PAGE // 8), pair.raw, skip=skip)


def ring_pages(pair: QueuePair) -> set[int]:
    if pair.packed:
        return pages(pair.desc, 16 * pair.size) | pages(pair.device_area, 4)
    return pages(pair.device_area, 6 + 8 * pair.size)


# --- the bitmap ---------------------------------------------------------------------------


def test_marks_cover_exactly_the_pages_a_range_touches() -> None:
    pair = QueuePair("split", mem_size=1 << 20)
    d = log_for(pair)
    d.mark(0x1FFF, 2)         # crosses into page 2
    d.mark(0x5000, 0x1000)    # exactly page 5
    d.mark(0x9000, 0)         # nothing
    d.mark(0x10000, 9 * LOG_PAGE + 1)  # pages 16..25: crosses byte boundaries of the bitmap
    assert set(d.dirty_pages().tolist()) == {1, 2, 5, *range(16, 26)}
    assert d.pages_marked == 2 + 1 + 10 and d.out_of_range == 0


def test_a_range_beyond_the_log_is_counted_not_written() -> None:
    pair = QueuePair("split", mem_size=1 << 20)
    d = log_for(pair)  # 256 pages
    d.mark(255 * LOG_PAGE, 2 * LOG_PAGE)
    assert d.out_of_range == 1 and len(d.dirty_pages()) == 0


def test_a_retired_log_forwards_late_marks_to_its_successor() -> None:
    pair = QueuePair("split", mem_size=1 << 20)
    old, new = log_for(pair), log_for(pair)
    old.retire(new)
    old.mark(0x3000, 1)
    assert len(old.dirty_pages()) == 0 and set(new.dirty_pages().tolist()) == {3}


def test_the_test_trace_lists_every_page_a_mark_covered_even_when_marks_are_skipped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the migration tests use to tell the back-end's pages from the
    vCPUs' when RAM differs after a move (PYVIRTIO_TEST_DIRTY_TRACE)."""
    assert traced_ranges() is None  # off unless asked for
    monkeypatch.setattr(dirtylog, "_trace", set())
    pair = QueuePair("split", mem_size=1 << 20)
    skipping, marking = log_for(pair, skip=True), log_for(pair)
    skipping.mark(0x1FFF, 2)               # pages 1, 2
    skipping.mark(0x9000, 0)               # nothing
    marking.mark(0x3000, 3 * LOG_PAGE)     # pages 3..5: joins the run of 1, 2
    marking.mark(0x20000, 1)               # page 32
    assert traced_ranges() == [(1, 5), (32, 32)]
    assert len(skipping.dirty_pages()) == 0 and set(marking.dirty_pages().tolist()) == {3, 4, 5, 32}


def test_concurrent_marks_of_neighbouring_pages_lose_no_bit() -> None:
    pair = QueuePair("split", mem_size=1 << 22)
    d = log_for(pair)  # 1024 pages

    def worker(k: int) -> None:
        for rep in range(50):
            for p in range(k, 1024, 8):  # 8 threads share every byte of the bitmap
                d.mark(p * LOG_PAGE, 1)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(d.dirty_pages()) == 1024


# --- the queue: what a completion marks ----------------------------------------------------


FORMS = ["chain", "indirect", "iov", "bulk"]


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("form", FORMS)
def test_completion_marks_every_writable_buffer_and_the_ring_and_nothing_read(ring: str, form: str) -> None:
    pair = QueuePair(ring, size=64, event_idx=True, indirect=form in ("indirect", "iov"), mem_size=4 << 20)
    d = log_for(pair)
    pair.vq.set_dirty_log(d)
    assert set(d.dirty_pages().tolist()) == ring_pages(pair)  # the device-written ring area, at once
    d.bits[:] = bytes(d.size)  # as the front-end does when it syncs
    readable: set[int] = set()
    writable: set[int] = set()
    nseg = {"chain": 2, "indirect": 3, "iov": IOV_MIN_SEGMENTS + 4, "bulk": 1}[form]
    for i in range(6):
        if form == "bulk":  # single-descriptor device-writable buffers
            ins = [(pair.pool.alloc(LOG_PAGE), 1500)]
            outs = []
        else:
            outs = [(pair.pool.alloc(LOG_PAGE), 64)]
            ins = [(pair.pool.alloc(LOG_PAGE), 700) for _ in range(nseg - 1)]
        for a, n in outs:
            readable |= pages(a, n)
        for a, n in ins:
            writable |= pages(a, n)
        pair.driver.add(outs, ins, token=i)
    pair.driver.publish()
    if form == "bulk":
        got = pair.vq.pop_bulk()
        assert isinstance(got, Bulk) and got.n == 6
        for v in got.views():
            v[:4] = b"data"
        pair.vq.complete_bulk(got, 4)
    else:
        chains = pair.vq.pop_batch()
        assert len(chains) == 6
        if form == "iov":
            assert all(isinstance(c, IovChain) for c in chains)
        for c in chains:
            pair.vq.complete(c, c.write(b"x" * 10))  # less than the buffers hold: all of them are marked
    assert len(d.dirty_pages()) == 0, "marked before the used ring was published"
    pair.vq.flush()
    marked = set(d.dirty_pages().tolist())
    assert writable <= marked
    assert not readable & marked, "a page the device only read was marked"
    assert marked == writable | ring_pages(pair)
    assert len(pair.driver.get_used()) == 6


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_event_writes_at_the_sleep_boundary_are_marked(ring: str) -> None:
    pair = QueuePair(ring, size=16, event_idx=True)
    d = log_for(pair)
    pair.vq.set_dirty_log(d)
    d.bits[:] = bytes(d.size)
    assert pair.vq.pop_batch() == []
    pair.vq.arm()  # writes avail_event / the device event structure
    assert set(d.dirty_pages().tolist()) == ring_pages(pair)


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_no_log_no_marks_and_the_test_switch_marks_nothing(ring: str) -> None:
    pair = QueuePair(ring, size=16)
    d = log_for(pair)
    pair.vq.set_dirty_log(d)
    pair.vq.set_dirty_log(None)
    d.bits[:] = bytes(d.size)
    pair.post(4, out=0, in_=512)
    assert pair.serve(written=512) == 4
    assert len(d.dirty_pages()) == 0
    skipping = log_for(pair, skip=True)
    pair.vq.set_dirty_log(skipping)
    pair.post(4, out=0, in_=512)
    assert pair.serve(written=512) == 4
    assert len(skipping.dirty_pages()) == 0


# --- end to end over vhost-user ------------------------------------------------------------


@pytest.fixture
def net_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    from pyvirtio.devices.net import NetDevice
    from pyvirtio.vhost_user.backend import Backend
    from pyvirtio.vhost_user.server import Server

    def start(skip: bool = False):  # type: ignore[no-untyped-def]
        if skip:
            monkeypatch.setenv(SKIP_ENV, "1")
        be = Backend(NetDevice("loopback"))
        sock = str(tmp_path / "net.sock")
        srv = Server(be, socket_path=sock)
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        started.append((srv, t, be))
        return sock, be

    started: list = []  # type: ignore[type-arg]
    yield start
    for srv, t, be in started:
        srv.stop()
        t.join(10)
        be.close()


def _exchange(fe: VhostUserFrontend, n: int) -> list[bytes]:
    frames = [make_frame(1000, i) for i in range(n)]
    fe.send(frames)
    got: list[bytes] = []
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        got += fe.recv(timeout=1.0)
    assert got == frames
    return got


@pytest.mark.parametrize("packed", [False, True])
def test_vhost_user_logging_marks_received_frames_and_stops_when_turned_off(net_loopback, packed: bool) -> None:  # type: ignore[no-untyped-def]
    sock, be = net_loopback()
    with VhostUserFrontend(sock, packed=packed, event_idx=True) as fe:
        assert fe.offered_features is not None
        _exchange(fe, 8)  # before logging: no bitmap exists
        bitmap = fe.start_dirty_log()
        assert len(bitmap) > 0 and be.logging
        fe.clear_dirty_log()
        _exchange(fe, 40)
        marked = fe.dirty_pages()
        addrs = fe.buffer_addresses()
        rx = set().union(*(pages(a, fe.rx_buffer_size) for a in addrs["rx"]))
        tx = set().union(*(pages(a, 2048) for a in addrs["tx"]))
        assert marked & rx, "no received frame was marked"
        assert not (marked & tx) - rx, "a transmit buffer (only read by the device) was marked"
        stats = be.stats()["dirty_log"]
        assert stats["active"] and stats["bases"] == 1 and stats["pages_marked"] >= len(marked & rx)
        fe.stop_dirty_log()
        assert not be.logging
        fe.clear_dirty_log()
        _exchange(fe, 16)
        assert fe.dirty_pages() == set()


def test_vhost_user_test_switch_accepts_logging_but_marks_nothing(net_loopback) -> None:  # type: ignore[no-untyped-def]
    sock, be = net_loopback(skip=True)
    with VhostUserFrontend(sock) as fe:
        fe.start_dirty_log()
        _exchange(fe, 20)
        assert fe.dirty_pages() == set()
        assert be.stats()["dirty_log"]["skip"] is True


def test_a_resized_log_takes_the_marks_from_then_on(net_loopback) -> None:  # type: ignore[no-untyped-def]
    sock, be = net_loopback()
    with VhostUserFrontend(sock) as fe:
        fe.start_dirty_log()
        fe.start_dirty_log()  # QEMU resizes by sending a new base: the old one is synced and dropped
        fe.clear_dirty_log()
        _exchange(fe, 20)
        assert fe.dirty_pages()
        assert be.stats()["dirty_log"]["bases"] == 2
    assert os.environ.get(SKIP_ENV) is None


@pytest.mark.parametrize("skip", [False, True], ids=["logging", "test-switch"])
def test_probe_judges_a_backends_dirty_logging(net_loopback, skip: bool) -> None:  # type: ignore[no-untyped-def]
    from pyvirtio.driver.probe import probe

    sock, _be = net_loopback(skip=skip)
    report = probe(sock, frames=16, timeout=3.0)
    dirty = [c for c in report.checks if c.name.endswith(": dirty log")]
    assert [c.name.split(",")[0] for c in dirty] == ["split", "packed"]
    if skip:  # a back-end that offers migration but does not mark its writes
        assert all(c.verdict == "FAIL" for c in dirty), dirty
        assert "not marked" in dirty[0].detail
    else:
        assert all(c.verdict == "PASS" for c in dirty), dirty
        assert report.ok
