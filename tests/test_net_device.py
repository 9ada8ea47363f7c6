"""virtio-net device: frame delivery, header fix-ups, ports, and DPDK's
virtio-user PMD (testpmd) as a real front-end (`-m dpdk`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.devices.net import (
    GSO_TCPV4,
    HDR_F_NEEDS_CSUM,
    LoopbackPort,
    NetDevice,
    NetFeature,
    TapPort,
    _checksum,
    deliver,
    make_port,
)
from pyvirtio.queue import Chain
from pyvirtio.vhost_user.backend import Backend
from test_vhost_user_backend import queue_stats, running, wait_for
from vhost_client import HDR, NetFrontend

# --- device pieces --------------------------------------------------------------------


def _rx_chain(size: int, i: int = 0) -> tuple[Chain, bytearray]:
    buf = bytearray(size)
    return Chain(i, i, 1, [], [memoryview(buf)], 0, size), buf


def test_mergeable_frame_spans_buffers_and_sets_num_buffers():
    chains = [_rx_chain(32, i) for i in range(4)]
    held = deque(c for c, _ in chains)
    frame = bytes(HDR) + bytes(range(70))
    done: list[tuple[Chain, int]] = []
    assert deliver(held, frame, HDR, True, done) == 3
    assert [w for _, w in done] == [32, 32, 18]
    data = b"".join(bytes(b) for _, b in chains)[:len(frame)]
    assert struct.unpack_from("<H", data, 10)[0] == 3
    assert data[HDR:] == frame[HDR:]
    assert len(held) == 1


def test_frame_too_big_without_mergeable_takes_no_buffer():
    held = deque([_rx_chain(32)[0]])
    done: list[tuple[Chain, int]] = []
    assert deliver(held, bytes(100), HDR, False, done) == 0
    assert not done and len(held) == 1


def test_loopback_checksums_in_software_when_guest_lacks_guest_csum():
    port = LoopbackPort(1)
    port.configure(int(NetFeature.CSUM), HDR)  # the guest offloads tx csum but cannot take it on rx
    payload = bytearray(os.urandom(41))
    start, off = 20, 6
    payload[start + off:start + off + 2] = b"\0\0"  # no pseudo-header sum: the region then sums to zero
    hdr = struct.pack("<BBHHHHH", HDR_F_NEEDS_CSUM, 0, 0, 0, start, off, 0)
    fixed = port.fix_header(hdr + bytes(payload))
    assert fixed is not None
    assert fixed[0] & HDR_F_NEEDS_CSUM == 0
    assert _checksum(fixed[HDR + start:]) == 0  # a correct checksum sums to zero
    gso = struct.pack("<BBHHHHH", 0, GSO_TCPV4, 54, 1448, 0, 0, 0)
    assert port.fix_header(gso + bytes(100)) is None  # no GUEST_TSO4: dropped, not mangled


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_loopback_rx_fills_buffers_with_the_queued_frames_in_order(ring):
    """The rx side of a loopback: frames queued by tx land one per buffer,
    in order, num_buffers set; buffers are only taken for frames there are
    (the rest stay with the guest). A frame too long for its buffer falls
    back to the per-chain path and spans buffers (mergeable)."""
    from pyvirtio.runtime import QueueLoop, Step
    from pyvirtio.spec import Feature
    from pyvirtio.testing import QueuePair

    dev = NetDevice("loopback")
    dev.set_features(int(Feature.VERSION_1 | NetFeature.MRG_RXBUF))
    pair = QueuePair(ring, 16)
    loop = QueueLoop(pair.vq, None, lambda: None, index=0)
    loop.attach(dev.service)

    def run() -> None:
        for _ in range(100):
            if loop.step() is Step.SLEEP:
                loop.woke([])
                return
        raise AssertionError("the loop never slept")

    q = dev.port.queues[0]  # type: ignore[attr-defined]
    gpas = pair.post(8, out=0, in_=128)
    frames = [bytes(HDR) + bytes([i]) * (60 + i) for i in range(5)]
    q.push(frames, loop.counters, 0)
    run()
    used = pair.driver.get_used()
    assert [t for t, _ in used] == [0, 1, 2, 3, 4]
    assert not pair.vq.inflight  # the other three buffers stay with the guest until frames come
    for (t, w), g in zip(used, gpas):
        got = pair.raw.read(g, w)
        assert w == len(frames[t]) and got[HDR:] == frames[t][HDR:] and struct.unpack_from("<H", got, 10)[0] == 1
    big = bytes(HDR) + bytes(range(200))
    q.push([frames[0], big], loop.counters, 0)
    run()
    used = pair.driver.get_used()
    assert [w for _, w in used] == [len(frames[0]), 128, len(big) - 128]
    data = pair.raw.read(gpas[6], 128) + pair.raw.read(gpas[7], len(big) - 128)
    assert data[HDR:] == big[HDR:] and struct.unpack_from("<H", data, 10)[0] == 2
    assert not q.frames
    dev.close()


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_loopback_tx_never_passes_frames_waiting_for_rx_buffers(ring):
    """A tx batch goes straight into rx buffers only when no earlier frame
    waits: frames queued for want of buffers (and buffers already taken for
    them) come first, whatever the rx ring holds when the next batch comes.
    The two loops run in one thread, as a loopback pair's `LoopGroup` runs
    them; this drives their steps in a chosen order."""
    import threading

    from pyvirtio.runtime import LoopGroup, QueueLoop, Step
    from pyvirtio.spec import Feature
    from pyvirtio.testing import QueuePair

    # the group whose thread serves both loops: this one stands for its thread
    group = LoopGroup("test")
    group.thread = threading.current_thread()
    group.ident = threading.get_ident()

    dev = NetDevice("loopback")
    dev.set_features(int(Feature.VERSION_1))
    rxp, txp = QueuePair(ring, 16), QueuePair(ring, 16)
    loops = []
    for index, p in ((0, rxp), (1, txp)):
        lp = QueueLoop(p.vq, None, lambda: None, index=index)
        lp.attach(dev.service)
        lp.group = group
        loops.append(lp)
    rx, tx = loops

    def send(frames: list[bytes]) -> None:
        for f in frames:
            g = txp.pool.alloc(len(f))
            txp.raw.write(g, f)
            txp.driver.add([(g, len(f))], [], token=f)
        txp.driver.publish()
        assert tx.step() is Step.BUSY

    def post(n: int) -> list[int]:
        gpas = [rxp.pool.alloc(128) for _ in range(n)]
        for g in gpas:
            rxp.driver.add([], [(g, 128)], token=g)
        rxp.driver.publish()
        return gpas

    frames = [bytes(HDR) + bytes([i]) * (60 + i) for i in range(7)]
    post(2)
    send(frames[:4])      # 2 buffers for 4 frames: both taken, all 4 frames wait
    post(10)
    send(frames[4:])      # buffers for these 3 now, but 2 frames still wait before them
    for _ in range(10):
        if rx.step() is Step.SLEEP:
            break
    used = rxp.driver.get_used()
    got = [rxp.raw.read(g, w)[HDR:] for g, w in used]
    assert got == [f[HDR:] for f in frames]
    dev.close()


def test_make_port_rejects_unknown_backends():
    for bad in ("tap:", "bogus", "sink:1", "gen:5"):
        with pytest.raises(ValueError):
            make_port(bad, 1, b"\x02" * 6)


def test_gen_fills_rx_buffers_with_frames_of_the_asked_size(tmp_path):
    with running(tmp_path, "gen:100") as (path, be):
        fe = NetFrontend(path)
        fe.negotiate()
        fe.setup_ring(0)
        fe.post_rx(0, 40, size=256)
        got = fe.reap(0, 40)
        assert [n for _, n in got] == [HDR + 100] * 40
        assert queue_stats(be, "rx0")["bytes"] == 4000
        fe.close()


def test_features_offered_follow_the_port_and_queue_pairs():
    d = NetDevice("sink", queue_pairs=1)
    assert not d.features & NetFeature.MQ and d.num_queues == 2
    d2 = NetDevice("loopback", queue_pairs=3)
    assert d2.features & NetFeature.MQ and d2.features & NetFeature.CTRL_VQ and d2.num_queues == 7
    assert d2.features & NetFeature.GUEST_CSUM and d2.features & NetFeature.MRG_RXBUF
    assert d2.queue_role(6) == "ctrl" and d2.queue_role(3) == "tx1"
    d2.close()
    d.close()


def _tap_available() -> bool:
    try:
        p = TapPort("pvprobe0")
    except OSError:
        return False
    p.close()
    return True


@pytest.mark.skipif(not _tap_available(), reason="no /dev/net/tun or no CAP_NET_ADMIN")
@pytest.mark.parametrize("mergeable", [False, True], ids=["plain", "mrg_rxbuf"])
def test_tap_passes_frames_both_ways(tmp_path, mergeable):
    """Guest tx comes out of the TAP's host side; frames sent on the host
    side arrive on guest rx, zero-copy through the 12-byte header."""
    name = f"pvt{uuid.uuid4().hex[:8]}"
    with running(tmp_path, f"tap:{name}") as (path, be):
        subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
        host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        host.bind((name, 0))
        host.settimeout(5)
        fe = NetFrontend(path)
        fe.negotiate(extra=int(NetFeature.MRG_RXBUF) if mergeable else 0)
        fe.setup_ring(0)
        fe.setup_ring(1)
        fe.post_rx(0, 32, size=1024 if mergeable else 2048)
        sent = [b"\xff" * 6 + b"\x02\0\0\0\0\x09" + b"\x88\xb5" + os.urandom(n) for n in (50, 1400)]
        fe.send_frames(1, sent)
        assert len(fe.reap(1, 2)) == 2
        seen = []
        while len(seen) < 2:
            f = host.recv(4096)
            if f[12:14] == b"\x88\xb5":
                seen.append(f)
        assert seen == sent
        for f in sent:
            host.send(f)
        got: list[bytes] = []
        used: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            used += [fe.mem.mem.read(gpa, n) for gpa, n in fe.reap(0, 1, timeout=0.2)]  # type: ignore[arg-type]
            while used:
                nbuf = struct.unpack_from("<H", used[0], 10)[0]
                assert nbuf >= 1
                if len(used) < nbuf:
                    break  # the rest of a merged frame is not reaped yet
                data = b"".join(used[:nbuf])
                del used[:nbuf]
                if data[HDR + 12:HDR + 14] == b"\x88\xb5":
                    got.append(data[HDR:])
        assert got == sent
        assert queue_stats(be, "tx0")["dropped"] == 0
        host.close()
        fe.close()


def _tap_rx_frames(fe: NetFrontend, want: int, timeout: float) -> list[bytes]:
    """Frames (without the header) the guest's rx ring received, merged
    buffers joined, only this test's ethertype."""
    got: list[bytes] = []
    used: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        used += [fe.mem.mem.read(gpa, n) for gpa, n in fe.reap(0, 1, timeout=0.05)]  # type: ignore[arg-type]
        while used:
            nbuf = struct.unpack_from("<H", used[0], 10)[0] if fe.features & NetFeature.MRG_RXBUF else 1
            if len(used) < nbuf:
                break
            data = b"".join(used[:nbuf])
            del used[:nbuf]
            if data[HDR + 12:HDR + 14] == b"\x88\xb5":
                got.append(data[HDR:])
    return got


@contextlib.contextmanager
def _tap_guest(tmp_path: Path, mergeable: bool, queue_size: int = 64) -> Iterator[tuple[NetFrontend, Backend, socket.socket]]:
    name = f"pvt{uuid.uuid4().hex[:8]}"
    with running(tmp_path, f"tap:{name}") as (path, be):
        # no IPv6 on it: the host's own neighbour discovery would take the few buffers these tests post
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=True, capture_output=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
        host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        host.bind((name, 0))
        fe = NetFrontend(path, queue_size=queue_size)
        try:
            fe.negotiate(extra=int(NetFeature.MRG_RXBUF) if mergeable else 0)
            fe.setup_ring(0)
            fe.setup_ring(1)
            yield fe, be, host
        finally:
            host.close()
            fe.close()


def _frame(n: int) -> bytes:
    return b"\xff" * 6 + b"\x02\0\0\0\0\x09" + b"\x88\xb5" + os.urandom(n - 14)


@pytest.mark.skipif(not _tap_available(), reason="no /dev/net/tun or no CAP_NET_ADMIN")
def test_tap_rx_completes_a_frame_longer_than_the_buffers_when_the_driver_adds_more(tmp_path):
    """The driver has made 1 KiB available (the TAP could send 1.5 KiB): a
    short frame goes in at once; a 1400-byte one is not cut to 1 KiB but
    waits for the driver's next buffers, then arrives whole over two of
    them, and the frame after it follows."""
    with _tap_guest(tmp_path, mergeable=True) as (fe, be, host):
        fe.post_rx(0, 1, size=1024)
        small, frame, after = _frame(100), _frame(1400), _frame(200)
        host.send(small)
        assert _tap_rx_frames(fe, 1, timeout=5) == [small], "a frame that fits waited"
        fe.post_rx(0, 1, size=1024)
        host.send(frame)
        host.send(after)
        assert _tap_rx_frames(fe, 1, timeout=0.5) == [], "the frame was delivered into too little room"
        fe.post_rx(0, 2, size=1024)
        assert _tap_rx_frames(fe, 2, timeout=5) == [frame, after]
        assert queue_stats(be, "rx0")["dropped"] == 0


@pytest.mark.skipif(not _tap_available(), reason="no /dev/net/tun or no CAP_NET_ADMIN")
@pytest.mark.parametrize("mergeable", [False, True], ids=["plain", "mrg_rxbuf"])
def test_tap_rx_drops_a_frame_longer_than_every_buffer_the_ring_can_hold(tmp_path, mergeable):
    """No truncated frame ever reaches the guest. Plain buffers: a frame
    longer than the buffer is dropped, the buffer takes the next frame.
    Mergeable: with the whole ring (8 x 128 bytes) in hand there is nothing
    to wait for; the long frame is dropped, the short one delivered."""
    with _tap_guest(tmp_path, mergeable, queue_size=8) as (fe, be, host):
        fe.post_rx(0, 8 if mergeable else 1, size=128 if mergeable else 1000)
        long, short = _frame(1400), _frame(100)
        host.send(long)
        host.send(short)
        assert _tap_rx_frames(fe, 2, timeout=1.0) == [short]
        assert queue_stats(be, "rx0")["dropped"] == 1


@pytest.mark.skipif(not _tap_available(), reason="no /dev/net/tun or no CAP_NET_ADMIN")
def test_after_a_migration_send_rarp_announces_the_guest_on_the_tap(tmp_path):
    """QEMU sends SEND_RARP with the guest's MAC when a migrated guest
    starts on this host (its driver has no GUEST_ANNOUNCE): a RARP from that
    MAC comes out of the TAP, so bridges learn where the guest now is."""
    from pyvirtio.driver.frontend import VhostUserFrontend
    from pyvirtio.vhost_user import ProtocolFeature, Rarp, Request

    name = f"pvr{uuid.uuid4().hex[:8]}"
    mac = bytes.fromhex("02aabbccdd01")
    with running(tmp_path, f"tap:{name}") as (path, _be):
        subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
        host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035))
        host.bind((name, 0))
        host.settimeout(5)
        want = int(ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ | ProtocolFeature.RARP)
        with VhostUserFrontend(path, want_protocol_features=want) as fe:
            assert fe.protocol_features is not None and fe.protocol_features & ProtocolFeature.RARP
            fe.request(Request.SEND_RARP, Rarp(mac), need_reply=True)  # acked 0: announced
            frame = host.recv(2048)
        host.close()
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x80\x35"
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, 14)
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 3)  # Ethernet/IPv4, request reverse
    assert frame[22:28] == mac and frame[32:38] == mac


def test_send_rarp_on_a_port_without_a_network_is_refused_in_the_ack(tmp_path):
    from pyvirtio.driver.frontend import FrontendError, VhostUserFrontend
    from pyvirtio.vhost_user import ProtocolFeature, Rarp, Request

    with running(tmp_path, "loopback") as (path, _be):
        want = int(ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ | ProtocolFeature.RARP)
        with VhostUserFrontend(path, want_protocol_features=want) as fe:
            with pytest.raises(FrontendError, match="refused SEND_RARP"):
                fe.request(Request.SEND_RARP, Rarp(b"\x02" * 6), need_reply=True)
            assert fe.send([b"\x02" * 6 + b"\x04" * 6 + b"\x88\xb5" + bytes(50)]) == 1  # the device still works


# --- DPDK testpmd with the virtio-user PMD ------------------------------------------------

PMD_DIR = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0"
dpdk = pytest.mark.dpdk


def _cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) > 1 else (cpus[0], cpus[0])


@contextlib.contextmanager
def pyvirtio_net(tmp_path: Path, *args: str) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    sock = str(tmp_path / f"net-{uuid.uuid4().hex[:6]}.sock")
    stats = tmp_path / "stats.jsonl"
    cpu = _cpus()[0]
    cmd = [sys.executable, "-m", "pyvirtio", "net", "--socket-path", sock, "--stats-file", str(stats), *args]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    log = open(tmp_path / "backend.log", "w")  # noqa: SIM115 - closed in the finally below
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: os.path.exists(sock), 20), "back-end did not create its socket"
        yield sock, stats, p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def run_testpmd(tmp_path: Path, sock: str, packed: bool, mode: str, seconds: float, *extra: str) -> dict[str, int]:
    """Run testpmd's virtio-user against `sock` for `seconds`; return its
    final port counters. Interactive (commands on stdin): forwarding is
    stopped before the port counters are read, so packets and bytes come
    from one moment (periodic counters, read while the forwarding core
    updates them, can count a burst's bytes but not yet its packets).
    `--tx-first` in `extra` becomes `start tx_first`."""
    cpu = _cpus()[1]
    prefix = f"pv{uuid.uuid4().hex[:8]}"
    start = "start tx_first" if "--tx-first" in extra else "start"
    extra = tuple(e for e in extra if e != "--tx-first")
    cmd = ["dpdk-testpmd", "--lcores", f"0@{cpu},1@{cpu}", "-d", PMD_DIR, "--no-pci", "--no-huge", "-m", "1024",
           "--file-prefix", prefix,
           "--vdev", f"net_virtio_user0,path={sock},queues=1,packed_vq={int(packed)}",
           "--", "-i", "--total-num-mbufs=16384", "--disable-link-check", f"--forward-mode={mode}", *extra]
    out_path = tmp_path / f"testpmd-{prefix}.log"
    with open(out_path, "w") as out:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, text=True)
        assert p.stdin is not None
        try:
            p.stdin.write(f"{start}\n")
            p.stdin.flush()
            time.sleep(seconds)
            assert p.poll() is None, f"testpmd exited early:\n{out_path.read_text()[-3000:]}"
            p.stdin.write("stop\nshow port stats 0\nquit\n")
            p.stdin.flush()
            p.wait(20)
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            with contextlib.suppress(OSError):
                p.stdin.close()
            shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)
    text = out_path.read_text()
    counts = {}
    # the forward statistics printed at exit: final totals
    for key, nxt in (("RX-packets", "RX-dropped"), ("TX-packets", "TX-dropped")):
        found = re.findall(rf"{key}:\s+(\d+)\s+{nxt}", text)
        counts[key] = int(found[-1]) if found else 0
    # the port counters shown after forwarding stopped: packets and bytes of one moment
    for d, mid in (("RX", "RX-missed"), ("TX", "TX-errors")):
        found = re.findall(rf"{d}-packets:\s+(\d+)\s+{mid}:\s+\d+\s+{d}-bytes:\s+(\d+)", text)
        counts[f"nic_{d}_packets"], counts[f"nic_{d}_bytes"] = map(int, found[-1]) if found else (0, 0)
    return counts


def last_stats(stats: Path) -> dict:
    lines = stats.read_text().splitlines()
    return json.loads(lines[-1])


def _by_role(s: dict) -> dict[str, dict]:
    return {q["role"]: q for q in s["queues"]}


needs_testpmd = pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd not installed")


@dpdk
@needs_testpmd
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dpdk_txonly_into_sink_counts_what_testpmd_sent(tmp_path, packed):
    with pyvirtio_net(tmp_path, "--backend", "sink") as (sock, stats, p):
        tp = run_testpmd(tmp_path, sock, packed, "txonly", 5)
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
    s = _by_role(last_stats(stats))
    tx = s["tx0"]
    assert tp["TX-packets"] > 10_000
    # every frame testpmd put on the ring was consumed: counted, or dropped
    # while testpmd disabled the ring at shutdown (at most a ring's worth)
    assert abs(tx["packets"] + tx["dropped"] - tp["TX-packets"]) <= 256
    assert tx["packets"] >= tp["TX-packets"] - 256
    assert tx["bytes"] == tx["packets"] * 64  # testpmd's default 64-byte frames
    assert tx["errors"] == 0
    # polling front-end: NO_INTERRUPT honoured, kicks suppressed while busy
    assert tx["interrupts"] <= 2
    assert tx["per_packet"]["kicks"] < 0.2


@dpdk
@needs_testpmd
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mode", ["io", "macswap"])
def test_dpdk_forwarding_through_loopback_returns_intact_frames(tmp_path, packed, mode):
    with pyvirtio_net(tmp_path, "--backend", "loopback") as (sock, stats, p):
        tp = run_testpmd(tmp_path, sock, packed, mode, 5, "--tx-first")
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
    s = _by_role(last_stats(stats))
    assert tp["RX-packets"] > 10_000
    # the frames keep circulating: what testpmd sent comes back, same size
    assert tp["TX-packets"] - tp["RX-packets"] <= 512
    assert tp["nic_RX_bytes"] == tp["nic_RX_packets"] * 64
    assert s["rx0"]["packets"] >= tp["RX-packets"]
    assert s["rx0"]["bytes"] == s["rx0"]["packets"] * 64
    assert s["tx0"]["dropped"] <= 512 and s["rx0"]["errors"] == s["tx0"]["errors"] == 0


@dpdk
@needs_testpmd
def test_dpdk_rxonly_from_gen(tmp_path):
    with pyvirtio_net(tmp_path, "--backend", "gen:64") as (sock, stats, p):
        tp = run_testpmd(tmp_path, sock, False, "rxonly", 4)
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
    s = _by_role(last_stats(stats))
    assert tp["RX-packets"] > 10_000
    assert tp["nic_RX_bytes"] == tp["nic_RX_packets"] * 64
    assert s["rx0"]["packets"] >= tp["RX-packets"]


@dpdk
@needs_testpmd
def test_dpdk_reconnect_after_testpmd_restarts(tmp_path):
    with pyvirtio_net(tmp_path, "--backend", "sink") as (sock, stats, p):
        first = run_testpmd(tmp_path, sock, False, "txonly", 3)
        second = run_testpmd(tmp_path, sock, False, "txonly", 3)
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
    s = last_stats(stats)
    assert s["connections"] == 2
    tx = _by_role(s)["tx0"]
    assert first["TX-packets"] > 10_000 and second["TX-packets"] > 10_000
    assert abs(tx["packets"] + tx["dropped"] - first["TX-packets"] - second["TX-packets"]) <= 512


def test_loopback_takes_a_bulk_of_tx_frames_without_chain_objects_and_drops_what_is_not_a_frame():
    """The vectorised tx path (`tx_bulk`) gives the rx side the same frames
    as the per-chain path: device-writable buffers and buffers shorter than
    the header are dropped and counted."""
    from pyvirtio.queue.bulk import Bulk
    from pyvirtio.runtime import QueueCounters
    from pyvirtio.testing import QueuePair

    pair = QueuePair("split", size=16)
    port = LoopbackPort(1)
    frames = [bytes(HDR) + bytes([i]) * (60 + i) for i in range(5)]
    for i, f in enumerate(frames):
        gpa = pair.pool.alloc(len(f))
        pair.raw.write(gpa, f)
        pair.driver.add([(gpa, len(f))], [], token=i)
    short = pair.pool.alloc(8)
    pair.driver.add([(short, 8)], [], token="short")
    pair.driver.add([], [(pair.pool.alloc(128), 128)], token="writable")
    pair.driver.publish()
    bulk = pair.vq.pop_bulk()
    assert isinstance(bulk, Bulk) and bulk.n == 7
    c = QueueCounters()
    port.tx_bulk(0, bulk, c)
    assert list(port.queues[0].frames) == frames
    assert c.packets == 5 and c.dropped == 2 and c.bytes == sum(len(f) - HDR for f in frames)
    port.close()
