"""The Python vhost-user front-end against DPDK's own back-end (testpmd with
`--vdev net_vhost0`), forwarding what it receives back to us.

Run with `.venv/bin/pytest -m dpdk tests/test_frontend_dpdk.py`; needs DPDK
22.11's dpdk-testpmd (no hugepages: `--no-huge`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pyvirtio.bench.dpdk import DPDK_RUNTIME_DIR, parse_rates, pmd_command
from pyvirtio.bench.net import ManagedProcess, wait_for_socket
from pyvirtio.driver.frontend import RX_QUEUE, TX_QUEUE, VhostUserFrontend, make_frame
from pyvirtio.spec import Feature

pytestmark = [
    pytest.mark.dpdk,
    pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd is not installed"),
]

RINGS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
_FWD_STATS = re.compile(r"Forward statistics for port 0.*?RX-packets:\s+(\d+).*?TX-packets:\s+(\d+)", re.DOTALL)
_CPU = (os.cpu_count() or 1) - 1


class NetVhost:
    """testpmd with a net_vhost port looped to itself in `mode` forwarding."""

    def __init__(self, tmp_path: object, mode: str) -> None:
        self.sock = os.path.join(str(tmp_path), "vhost.sock")
        self.prefix = f"pyvirtio-test-{os.getpid()}-{time.monotonic_ns()}"
        self.proc = ManagedProcess(
            pmd_command(_CPU, self.prefix, f"net_vhost0,iface={self.sock},queues=1", mode),
            "testpmd-net_vhost", log_dir=str(tmp_path))
        wait_for_socket(self.sock, self.proc, 30.0)

    def stop(self) -> tuple[int, int]:
        """Stop testpmd; return its final forward statistics (rx, tx packets)."""
        self.proc.stop()
        shutil.rmtree(os.path.join(DPDK_RUNTIME_DIR, self.prefix), ignore_errors=True)
        m = _FWD_STATS.search(self.proc.output())
        assert m, "testpmd printed no forward statistics:\n" + self.proc.output()[-2000:]
        return int(m.group(1)), int(m.group(2))

    def cleanup(self) -> None:
        self.proc.stop()
        shutil.rmtree(os.path.join(DPDK_RUNTIME_DIR, self.prefix), ignore_errors=True)


@pytest.fixture
def io_fwd(tmp_path) -> Iterator[NetVhost]:
    t = NetVhost(tmp_path, "io")
    try:
        yield t
    finally:
        t.cleanup()


@pytest.fixture
def macswap_fwd(tmp_path) -> Iterator[NetVhost]:
    t = NetVhost(tmp_path, "macswap")
    try:
        yield t
    finally:
        t.cleanup()


def exchange(fe: VhostUserFrontend, frames: list[bytes], burst: int = 32, timeout: float = 5.0) -> list[bytes]:
    """Send `frames` in bursts, each collected before the next goes out (the
    forwarding peer drops what finds no receive buffer), and return what
    came back."""
    got: list[bytes] = []
    for i in range(0, len(frames), burst):
        chunk = frames[i:i + burst]
        assert fe.send(chunk) == len(chunk)
        want = len(got) + len(chunk)
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            got += fe.recv(0.2)
    return got


def sizes(n: int) -> list[int]:
    return [(64, 60, 128, 1514, 777, 1500, 65)[i % 7] for i in range(n)]


@RINGS
def test_frames_forwarded_by_dpdk_come_back_intact_and_counts_agree(io_fwd, packed):
    frames = [make_frame(s, i) for i, s in enumerate(sizes(1000))]
    with VhostUserFrontend(io_fwd.sock, packed=packed, connect_timeout=10) as fe:
        assert fe.features is not None and bool(fe.features & Feature.RING_PACKED) == packed
        got = exchange(fe, frames)
        assert fe.flush(2.0)
        assert got == frames
        assert fe.stats["tx_frames"] == fe.stats["rx_frames"] == len(frames)
    assert io_fwd.stop() == (len(frames), len(frames))


@RINGS
def test_macswap_forwarding_returns_our_frames_with_addresses_swapped(macswap_fwd, packed):
    frames = [make_frame(64 + i % 200, i) for i in range(300)]
    with VhostUserFrontend(macswap_fwd.sock, packed=packed, connect_timeout=10) as fe:
        got = exchange(fe, frames)
    assert got == [f[6:12] + f[0:6] + f[12:] for f in frames]


@pytest.mark.parametrize("opts", [
    {"event_idx": True},
    {"mrg_rxbuf": True, "rx_buffer_size": 512},
    {"indirect": True, "tx_segments": 2},
    {"tx_segments": 2},
    {"event_idx": True, "indirect": True, "tx_segments": 2, "mrg_rxbuf": True, "rx_buffer_size": 256},
], ids=["event_idx", "mrg_rxbuf_small_buffers", "indirect_2seg", "direct_2seg", "all"])
@RINGS
def test_optional_features_move_traffic_intact(io_fwd, packed, opts):
    frames = [make_frame(s, i) for i, s in enumerate(sizes(700))]
    with VhostUserFrontend(io_fwd.sock, packed=packed, connect_timeout=10, **opts) as fe:
        f = fe.features or 0
        if opts.get("event_idx"):
            assert f & Feature.RING_EVENT_IDX
        if opts.get("indirect"):
            assert f & Feature.RING_INDIRECT_DESC
        got = exchange(fe, frames)
    assert got == frames


@RINGS
def test_ring_bases_after_stop_match_the_buffers_completed(io_fwd, packed):
    n = 300  # more than one lap of a 256-entry ring
    frames = [make_frame(64, i) for i in range(n)]
    with VhostUserFrontend(io_fwd.sock, packed=packed, connect_timeout=10) as fe:
        assert exchange(fe, frames) == frames
        assert fe.flush(2.0)
        bases = fe.stop()
        for ring in (RX_QUEUE, TX_QUEUE):
            assert bases[ring] & 0xFFFF == fe.used_position(ring)
        if packed:
            assert bases[TX_QUEUE] == (n - 256) | 0 << 15  # second lap: wrap counter 0
        else:
            assert bases[TX_QUEUE] == bases[RX_QUEUE] == n


@RINGS
def test_reconnect_after_a_clean_disconnect_moves_traffic_again(io_fwd, packed):
    for round_ in range(3):
        frames = [make_frame(100, 1000 * round_ + i) for i in range(150)]
        with VhostUserFrontend(io_fwd.sock, packed=packed, connect_timeout=10) as fe:
            assert exchange(fe, frames) == frames
    assert io_fwd.stop() == (450, 450)


_KILLED_FRONTEND = """
import sys, time
from pyvirtio.driver.frontend import VhostUserFrontend, make_frame
fe = VhostUserFrontend(sys.argv[1], packed=sys.argv[2] == "1", connect_timeout=10)
fe.connect()
print("connected", flush=True)
i = 0
while True:
    fe.send([make_frame(64, i + k) for k in range(32)])
    fe.recv(0)
    i += 32
"""


@RINGS
def test_reconnect_after_the_frontend_is_killed_mid_traffic(io_fwd, packed, tmp_path):
    child = subprocess.Popen([sys.executable, "-c", _KILLED_FRONTEND, io_fwd.sock, "1" if packed else "0"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "connected"
        time.sleep(1.0)
        assert child.poll() is None, "the traffic generator died by itself"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    time.sleep(0.5)
    frames = [make_frame(200, i) for i in range(200)]
    with VhostUserFrontend(io_fwd.sock, packed=packed, connect_timeout=10) as fe:
        assert exchange(fe, frames) == frames


def test_probe_passes_against_dpdk_net_vhost(io_fwd):
    r = subprocess.run([sys.executable, "-m", "pyvirtio", "probe", "--socket-path", io_fwd.sock],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL " not in r.stdout
    assert r.stdout.count("PASS") >= 18, r.stdout  # 2 rings x 2 connections x 4 checks, + the dirty log twice
    # DPDK's lib/vhost logs for live migration: its marks agree with the log
    # our front-end hands over (page size, bit order, the ring LOG flag)
    dirty = [line for line in r.stdout.splitlines() if ": dirty log: " in line]
    assert len(dirty) == 2 and all(line.startswith("PASS") for line in dirty), r.stdout
    assert "REPLY_ACK" in r.stdout and "RING_PACKED" in r.stdout


def test_testpmd_stats_parser_reads_periodic_blocks():
    text = ("Port statistics ====\n  ######### NIC statistics for port 0  #####\n  RX-packets: 10  RX-missed: 0\n"
            "  TX-packets: 7\n  Throughput (since last show)\n  Rx-pps:   5  Rx-bps: 0\n  Tx-pps:   3\n") * 2
    assert parse_rates(text) == {"rx_pps": [5, 5], "tx_pps": [3, 3], "rx_packets": [10, 10], "tx_packets": [7, 7]}


def test_bench_net_measures_our_frontend_through_dpdk(io_fwd):
    from pyvirtio.bench.net import NetBenchConfig, run

    r = run(NetBenchConfig(socket_path=io_fwd.sock, seconds=1.0))
    assert r["looped_back"] and r["tx_pps"] > 1000 and r["rx_lost"] == 0
    assert r["vring_base"]["tx"] == r["tx_packets"] + 8 & 0xFFFF  # + the 8 loopback-detection frames


def test_bench_dpdk_runs_both_backends_in_one_run():
    r = subprocess.run([sys.executable, "-m", "pyvirtio", "bench", "dpdk", "--mode", "tx", "--seconds", "2",
                        "--json"], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    labels = {run["label"]: run for run in res["runs"]}
    assert labels["dpdk-net_vhost"]["pps"] > 0 and labels["pyvirtio-lazy"]["pps"] > 0
    assert res["ratio_to_dpdk"]["lazy"] > 0
    from pyvirtio import _engine
    if _engine.is_compiled():  # both engines side by side, what compiling bought printed
        assert labels["pyvirtio-lazy"]["engine"] == "compiled" and labels["pyvirtio-lazy-pure"]["engine"] == "pure"
        assert labels["pyvirtio-lazy-pure"]["pps"] > 0 and res["compiled_over_pure"]["lazy"] > 0
    assert subprocess.run(["pgrep", "-f", "pyvirtio-bench-dpdk-"], check=False).returncode == 1  # nothing left
    assert labels["pyvirtio-lazy"]["accesses_per_packet"] is not None
