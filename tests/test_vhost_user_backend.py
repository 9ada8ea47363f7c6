"""The vhost-user back-end over a real unix socket, driven by a small test
front-end (codec + driver model + memfd memory): negotiation, rings, frames
through `sink` and `loopback`, bad front-ends, reconnects, fd hygiene."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from pyvirtio.devices.net import NetDevice
from pyvirtio.spec import Feature
from pyvirtio.vhost_user import (
    Config,
    Features,
    MemoryRegion,
    MemRegMsg,
    ProtocolFeature,
    Request,
    SetMemTable,
    Status,
    VringAddr,
    VringAddrFlags,
    VringFd,
    VringState,
    encode_frame,
    encode_request,
)
from pyvirtio.vhost_user.backend import Backend
from pyvirtio.vhost_user.server import Server
from vhost_client import HDR, UVA_BASE, Client, Memfd, NetFrontend, fd_count

BIT30 = 1 << 30


@contextlib.contextmanager
def running(tmp_path, backend: str = "loopback", policy: str = "lazy", **kw) -> Iterator[tuple[str, Backend]]:
    dev = NetDevice(backend, **kw)
    be = Backend(dev, policy=policy)  # type: ignore[arg-type]
    path = str(tmp_path / "net.sock")
    srv = Server(be, socket_path=path)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield path, be
    finally:
        srv.stop()
        t.join(10)
        assert not t.is_alive()
        be.close()


def frames(n: int, size: int = 60) -> list[bytes]:
    return [bytes([i & 0xFF]) * 6 + bytes([0xAA]) * 6 + b"\x88\xb5" + os.urandom(size - 14) for i in range(n)]


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def queue_stats(be: Backend, role: str) -> dict:
    for q in be.stats()["queues"]:
        if q["role"] == role:
            return q
    return {}


def loopback_roundtrip(path: str, packed: bool = False, event_idx: bool = True, n: int = 20) -> None:
    fe = NetFrontend(path, packed=packed, event_idx=event_idx)
    try:
        fe.negotiate()
        fe.setup_ring(0)
        fe.setup_ring(1)
        fe.post_rx(0, n + 4)
        sent = frames(n)
        fe.send_frames(1, sent)
        assert len(fe.reap(1, n)) == n
        got = fe.reap(0, n)
        assert len(got) == n
        for (gpa, length), f in zip(got, sent):
            data = fe.mem.mem.read(gpa, length)  # type: ignore[arg-type]
            assert data[HDR:] == f
            assert struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers
    finally:
        fe.close()


# --- negotiation -----------------------------------------------------------------------


def test_features_protocol_features_queue_num_status_and_config_round_trip(tmp_path):
    with running(tmp_path, "sink", queue_pairs=2, mtu=9000) as (path, _be):
        c = Client(path)
        feats = c.call(Request.GET_FEATURES).body.value
        assert feats & BIT30 and feats & Feature.VERSION_1 and feats & Feature.RING_PACKED
        proto = c.call(Request.GET_PROTOCOL_FEATURES).body.value
        for bit in (ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.STATUS):
            assert proto & bit
        c.send(Request.SET_PROTOCOL_FEATURES, Features(proto))
        assert c.call(Request.GET_QUEUE_NUM).body.value == 2  # queue pairs, as QEMU compares
        ack = c.call(Request.SET_STATUS, Status(0x0B), need_reply=True)
        assert ack.body.value == 0
        assert c.call(Request.GET_STATUS).body.value == 0x0B
        cfg = c.call(Request.GET_CONFIG, Config(0, 12, 0, bytes(12))).body
        _mac, status, pairs, mtu = struct.unpack("<6sHHH", cfg.payload)
        assert (status, pairs, mtu) == (1, 2, 9000)
        # GET_VRING_BASE of a ring nobody configured is answered (DPDK reconnect does this)
        assert c.call(Request.GET_VRING_BASE, VringState(3, 0)).body == VringState(3, 0)
        c.close()


def test_reply_ack_only_when_need_reply_is_set(tmp_path):
    with running(tmp_path, "sink") as (path, _be):
        c = Client(path)
        proto = c.call(Request.GET_PROTOCOL_FEATURES).body.value
        c.send(Request.SET_PROTOCOL_FEATURES, Features(proto))
        c.send(Request.SET_OWNER)  # no NEED_REPLY: no answer may come
        c.send(Request.SET_VRING_NUM, VringState(0, 64))
        # the next thing on the socket must be this reply, not a stray ack
        assert c.call(Request.GET_FEATURES).body.value & BIT30
        c.close()


# --- frames ------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
def test_loopback_returns_every_frame_intact(tmp_path, packed, event_idx):
    with running(tmp_path, "loopback") as (path, be):
        loopback_roundtrip(path, packed, event_idx)
        rx, tx = queue_stats(be, "rx0"), queue_stats(be, "tx0")
        assert rx["packets"] == tx["packets"] == 20
        assert rx["bytes"] == tx["bytes"] == 20 * 60


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_loopback_keeps_frame_order_whether_frames_go_straight_into_rx_buffers_or_wait(tmp_path, packed):
    """A tx batch goes straight into the rx ring's buffers when the ring has
    one for every frame and nothing waits before them; otherwise the frames
    wait in the queue and the buffers already taken are filled first. Either
    way later frames never pass earlier ones, and each arrives once, intact."""
    with running(tmp_path, "loopback") as (path, be):
        fe = NetFrontend(path, packed=packed)
        try:
            fe.negotiate()
            fe.setup_ring(0)
            fe.setup_ring(1)
            sent = [bytes([i]) * (60 + i) for i in range(50)]
            got: list[tuple[int, int]] = []

            def step(posted: int, frames: list[bytes], expect: int) -> None:
                if posted:
                    fe.post_rx(0, posted)
                if frames:
                    fe.send_frames(1, frames)
                    assert len(fe.reap(1, len(frames))) == len(frames)
                got.extend(fe.reap(0, expect))

            step(5, sent[:10], 5)        # 5 buffers for 10 frames: 5 wait
            step(25, [], 5)              # the 5 waiting ones; 20 buffers left
            step(0, sent[10:20], 10)     # a buffer for each: straight in
            direct = be.stats()["direct"][0]
            step(0, sent[20:40], 10)     # 10 buffers for 20 frames: taken, filled, 10 wait
            step(10, [], 10)
            step(10, sent[40:], 10)
            assert len(got) == 50
            raw = [fe.mem.mem.read(gpa, length) for gpa, length in got]  # type: ignore[arg-type]
            assert [d[HDR:] for d in raw] == sent
            assert [struct.unpack_from("<H", d, 10)[0] for d in raw] == [1] * 50  # num_buffers
            assert direct >= 1 and be.stats()["direct"][0] >= direct + 1
        finally:
            fe.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("policy", ["lazy", "eager"])
def test_sink_counts_frames_and_bytes_and_accesses(tmp_path, packed, policy):
    with running(tmp_path, "sink", policy=policy) as (path, be):
        fe = NetFrontend(path, packed=packed)
        fe.negotiate()
        fe.setup_ring(0)
        fe.setup_ring(1)
        total = 0
        for _ in range(5):
            fe.send_frames(1, frames(30, 100))
            total += len(fe.reap(1, 30))
        assert total == 150
        assert wait_for(lambda: queue_stats(be, "tx0").get("packets") == 150)
        q = queue_stats(be, "tx0")
        assert q["bytes"] == 150 * 100
        assert q["ring"]["completed"] == 150 and q["errors"] == 0
        assert q["accesses"]["metadata"] > 0 and q["per_packet"]["accesses"] > 0
        json.dumps(be.stats())  # stats are plain JSON
        fe.close()


def test_polling_mode_kick_nofd_is_served(tmp_path):
    with running(tmp_path, "sink") as (path, _be):
        fe = NetFrontend(path)
        fe.negotiate()
        ring = fe.setup_ring(1)
        fe.client.send(Request.SET_VRING_KICK, VringFd(1, None, True))  # replace the kick: polling
        assert fe.client.call(Request.GET_FEATURES).body.value  # barrier
        fe.send_frames(1, frames(10))
        assert len(fe.reap(1, 10)) == 10
        assert ring is fe.rings[1]
        fe.close()


def test_without_protocol_features_rings_are_enabled_when_started(tmp_path):
    with running(tmp_path, "loopback") as (path, _be):
        fe = NetFrontend(path, event_idx=False)
        c = fe.client
        c.call(Request.GET_FEATURES)
        c.send(Request.SET_OWNER)
        c.send(Request.SET_FEATURES, Features(int(Feature.VERSION_1)))  # bit 30 not acked
        c.send(Request.SET_MEM_TABLE, fe.mem.table())
        fe.setup_ring(0, enable=False)
        fe.setup_ring(1, enable=False)
        c.call(Request.GET_FEATURES)  # barrier: everything above is applied
        fe.post_rx(0, 8)
        fe.send_frames(1, frames(5))
        assert len(fe.reap(0, 5)) == 5
        fe.close()


def test_with_protocol_features_rings_wait_for_enable(tmp_path):
    with running(tmp_path, "loopback") as (path, be):
        fe = NetFrontend(path)
        fe.negotiate()
        fe.setup_ring(0, enable=False)
        fe.setup_ring(1, enable=False)
        fe.post_rx(0, 8)
        fe.send_frames(1, frames(5))
        assert len(fe.reap(1, 5)) == 5  # a disabled tx ring is consumed and dropped
        assert fe.reap(0, 1, timeout=0.3) == []
        assert queue_stats(be, "tx0")["dropped"] == 5
        for i in (0, 1):
            assert fe.client.call(Request.SET_VRING_ENABLE, VringState(i, 1), need_reply=True).body.value == 0
        fe.send_frames(1, frames(5))
        assert len(fe.reap(0, 5)) == 5
        fe.close()


def test_get_vring_base_stops_the_ring_and_a_new_connection_resumes_it(tmp_path):
    with running(tmp_path, "loopback") as (path, _be):
        fe = NetFrontend(path)
        fe.negotiate()
        fe.setup_ring(0)
        fe.setup_ring(1)
        fe.post_rx(0, 16)
        fe.send_frames(1, frames(10))
        assert len(fe.reap(0, 10)) == 10
        assert fe.get_vring_base(1) == 10
        # rx: 16 posted, 10 used; the 6 untouched buffers are offered again
        assert fe.get_vring_base(0) == 10
        fe.close()
        loopback_roundtrip(path)  # the next front-end starts cleanly


def test_set_mem_table_while_running_keeps_rings_going(tmp_path):
    with running(tmp_path, "loopback") as (path, be):
        fe = NetFrontend(path)
        fe.negotiate()
        fe.setup_ring(0)
        fe.setup_ring(1)
        fe.post_rx(0, 32)
        fe.send_frames(1, frames(5))
        assert len(fe.reap(0, 5)) == 5
        ack = fe.client.call(Request.SET_MEM_TABLE, fe.mem.table(), need_reply=True)
        assert ack.body.value == 0
        fe.send_frames(1, frames(5))
        assert len(fe.reap(0, 5)) == 5  # held rx buffers were re-offered after the remap
        assert queue_stats(be, "rx0")["starts"] == 2
        fe.close()


def test_add_and_remove_memory_regions(tmp_path):
    with running(tmp_path, "loopback") as (path, _be):
        fe = NetFrontend(path)
        c = fe.client
        proto = c.call(Request.GET_PROTOCOL_FEATURES).body.value
        assert proto & ProtocolFeature.CONFIGURE_MEM_SLOTS
        c.send(Request.SET_PROTOCOL_FEATURES, Features(proto))
        c.send(Request.SET_FEATURES, Features(int(Feature.VERSION_1 | Feature.RING_EVENT_IDX) | BIT30))
        assert c.call(Request.GET_MAX_MEM_SLOTS).body.value >= 8
        region = MemoryRegion(0, fe.mem.size, UVA_BASE, 0)
        assert c.call(Request.ADD_MEM_REG, MemRegMsg(region, fe.mem.fd), need_reply=True).body.value == 0
        extra = Memfd(1 << 20)
        r2 = MemoryRegion(1 << 30, 1 << 20, UVA_BASE + (1 << 30), 0)
        assert c.call(Request.ADD_MEM_REG, MemRegMsg(r2, extra.fd), need_reply=True).body.value == 0
        fe.setup_ring(0)
        fe.setup_ring(1)
        fe.post_rx(0, 8)
        fe.send_frames(1, frames(4))
        assert len(fe.reap(0, 4)) == 4
        assert c.call(Request.REM_MEM_REG, MemRegMsg(r2), need_reply=True).body.value == 0
        assert c.call(Request.REM_MEM_REG, MemRegMsg(r2), need_reply=True).body.value != 0  # gone
        fe.send_frames(1, frames(2))
        assert len(fe.reap(0, 2)) == 2
        fe.close()
        extra.close()


def test_guest_ring_error_retires_only_that_ring(tmp_path):
    with running(tmp_path, "gen:60") as (path, be):
        fe = NetFrontend(path)
        fe.negotiate()
        fe.setup_ring(0)
        tx = fe.setup_ring(1)
        err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        assert fe.client.call(Request.SET_VRING_ERR, VringFd(1, err, False), need_reply=True).body.value == 0
        # a corrupt avail ring: head 1000 on a 64-entry ring
        _desc, avail, _used = tx.addrs
        fe.mem.mem.write(avail + 4, struct.pack("<H", 1000))
        fe.mem.mem.write(avail + 2, struct.pack("<H", 1))
        fe.kick(1)
        assert select.select([err], [], [], 5)[0], "error eventfd was not signalled"
        assert wait_for(lambda: queue_stats(be, "tx0")["errors"] == 1)
        fe.post_rx(0, 8)  # the rx ring of the same device still works
        assert len(fe.reap(0, 8)) == 8
        assert fe.client.call(Request.GET_VRING_BASE, VringState(1, 0)).body.index == 1
        fe.close()
        os.close(err)


def test_control_queue_sets_the_number_of_queue_pairs(tmp_path):
    with running(tmp_path, "sink", queue_pairs=2) as (path, be):
        fe = NetFrontend(path)
        fe.negotiate(extra=(1 << 17) | (1 << 22))  # CTRL_VQ | MQ
        ctrl = fe.setup_ring(4)
        gpa = fe.pool.alloc(16)
        fe.mem.mem.write(gpa, bytes([4, 0]) + struct.pack("<H", 1))  # MQ VQ_PAIRS_SET 1
        ack = fe.pool.alloc(16)
        fe.mem.mem.write(ack, b"\xff")
        ctrl.driver.add([(gpa, 4)], [(ack, 1)], "mq")
        if ctrl.driver.publish():
            fe.kick(4)
        assert fe.reap(4, 1) == [("mq", 1)]
        assert fe.mem.mem.read(ack, 1) == b"\x00"
        assert be.device.active_pairs == 1  # type: ignore[attr-defined]
        fe.close()


# --- bad front-ends --------------------------------------------------------------------

def _bad_truncated_header(c: Client, fe: NetFrontend) -> None:
    c.send_raw(encode_frame(Request.GET_FEATURES, 1)[:7])
    c.sock.shutdown(socket.SHUT_WR)


def _bad_payload_size(c: Client, fe: NetFrontend) -> None:
    c.send_raw(encode_frame(Request.SET_FEATURES, 1, b"\0" * 4))


def _bad_fd_count(c: Client, fe: NetFrontend) -> None:
    data, _ = encode_request(Request.SET_MEM_TABLE, SetMemTable(fe.mem.table().regions, (fe.mem.fd,)))
    c.send_raw(data, [fe.mem.fd, fe.mem.fd])


def _bad_vring_index(c: Client, fe: NetFrontend) -> None:
    c.send(Request.SET_VRING_NUM, VringState(7, 64))


def _bad_ring_address(c: Client, fe: NetFrontend) -> None:
    c.send(Request.SET_FEATURES, Features(int(Feature.VERSION_1) | BIT30))
    c.send(Request.SET_MEM_TABLE, fe.mem.table())
    c.send(Request.SET_VRING_NUM, VringState(1, 64))
    c.send(Request.SET_VRING_ADDR, VringAddr(1, VringAddrFlags(0), UVA_BASE + (64 << 20), UVA_BASE + 0x2000,
                                             UVA_BASE + 0x1800, 0))


def _bad_region_past_file(c: Client, fe: NetFrontend) -> None:
    table = SetMemTable((MemoryRegion(0, fe.mem.size * 2, UVA_BASE, 0),), (fe.mem.fd,))
    c.send(Request.SET_MEM_TABLE, table, need_reply=True)


def _bad_unoffered_feature(c: Client, fe: NetFrontend) -> None:
    c.send(Request.SET_FEATURES, Features(1 << 63))


def _bad_garbage(c: Client, fe: NetFrontend) -> None:
    c.send_raw(os.urandom(3) + b"\xff" * 200)


def _bad_too_many_fds(c: Client, fe: NetFrontend) -> None:
    fds = [os.eventfd(0) for _ in range(12)]
    try:
        c.send_raw(encode_request(Request.SET_OWNER)[0], fds)
    finally:
        for fd in fds:
            os.close(fd)


BAD = [_bad_truncated_header, _bad_payload_size, _bad_fd_count, _bad_vring_index, _bad_ring_address,
       _bad_region_past_file, _bad_unoffered_feature, _bad_garbage, _bad_too_many_fds]


@pytest.mark.parametrize("bad", BAD, ids=[b.__name__[5:] for b in BAD])
def test_bad_frontend_is_disconnected_and_the_next_one_works(tmp_path, bad, caplog):
    before = fd_count()
    with running(tmp_path, "loopback") as (path, _be):
        fe = NetFrontend(path)
        c = fe.client
        c.call(Request.GET_FEATURES)
        bad(c, fe)
        assert c.closed_by_peer(), "the back-end kept a misbehaving front-end connected"
        fe.close()
        loopback_roundtrip(path)
    assert fd_count() == before, "file descriptors leaked"
    if bad is not _bad_truncated_header:
        assert any("frontend protocol error" in r.getMessage() for r in caplog.records)


def test_no_fd_leak_across_many_connections(tmp_path):
    before = fd_count()
    with running(tmp_path, "loopback") as (path, _be):
        for packed in (False, True, False):
            loopback_roundtrip(path, packed=packed)
        during = fd_count()
    assert fd_count() == before
    assert during >= before


# --- the command ------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyvirtio", "net", *args]


def test_print_capabilities():
    out = subprocess.run(_cli("--print-capabilities"), capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0
    assert json.loads(out.stdout) == {"type": "net"}


def test_cli_serves_owner_only_socket_and_exits_cleanly_on_sigterm(tmp_path):
    path = str(tmp_path / "cli.sock")
    stats = tmp_path / "stats.jsonl"
    p = subprocess.Popen(_cli("--socket-path", path, "--backend", "loopback", "--stats-file", str(stats)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: os.path.exists(path), 20)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        loopback_roundtrip(path)
        p.send_signal(signal.SIGUSR1)
        assert wait_for(lambda: stats.exists() and stats.read_text().count("\n") >= 1)
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert time.monotonic() - t < 5
        assert not os.path.exists(path)
        last = json.loads(stats.read_text().splitlines()[-1])
        assert last["event"] == "exit"
        assert {q["role"]: q["packets"] for q in last["queues"]} == {"rx0": 20, "tx0": 20}
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_cli_removes_a_stale_socket_and_refuses_a_live_one(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # a stale socket file: nobody listens
    p = subprocess.Popen(_cli("--socket-path", path), stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: _connectable(path), 20)
        q = subprocess.run(_cli("--socket-path", path), capture_output=True, text=True, timeout=30, check=False)
        assert q.returncode != 0 and "listening" in q.stderr
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.mark.parametrize("listening", [True, False], ids=["listening", "connected"])
def test_cli_fd_accepts_listening_or_connected_socket(tmp_path, listening):
    if listening:
        path = str(tmp_path / "fd.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(1)
        child = lsock
    else:
        mine, child = socket.socketpair()
    p = subprocess.Popen(_cli("--fd", str(child.fileno()), "--backend", "sink"), pass_fds=[child.fileno()],
                         stderr=subprocess.PIPE, text=True)
    child.close()
    try:
        if listening:
            c = Client(path)
        else:
            c = Client.__new__(Client)
            c.sock = mine
            c.sock.settimeout(10)
            from pyvirtio.vhost_user import ReplyDecoder
            c.dec = ReplyDecoder()
        assert c.call(Request.GET_FEATURES).body.value & BIT30
        c.close()
        if not listening:
            assert p.wait(10) == 0  # the one connection is gone: nothing left to serve
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(10)


def test_a_call_fd_replaced_while_the_ring_runs_gets_a_notification(tmp_path):
    """QEMU swaps a ring's call fd right after starting it (every migration
    destination does): a notification the back-end sent in between went to
    the old fd. The new fd gets one at once, so a driver that waits for an
    interrupt (EVENT_IDX: only the crossing of its used_event signals) does
    not stall. Seen as a 6-second TCP stall after live migration before."""
    import select

    from pyvirtio.vhost_user import VringFd

    with running(tmp_path, "sink") as (path, _be):
        fe = NetFrontend(path)
        try:
            fe.negotiate()
            fe.setup_ring(1)
            old = fe.rings[1].call
            new = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fe.client.call(Request.SET_VRING_CALL, VringFd(1, new, False), need_reply=True)
            assert select.select([new], [], [], 2.0)[0] == [new], "no notification on the new call fd"
            fe.rings[1].call = new
            os.close(old)
            assert len(fe.send_frames(1, frames(3))) == 3 and len(fe.reap(1, 3)) == 3  # and the ring works on
        finally:
            fe.close()
