"""A real Linux guest on pyvirtio's vhost-user-net back-end.

QEMU 7.2 (TCG) boots Debian's Linux 6.1 with `-netdev vhost-user` and a
`virtio-net-pci,vectors=0` NIC (INTx: QEMU 7.2 under TCG crashes with
vhost-user and MSI-X). Our back-end runs inside a private network namespace
and serves the TAP there; the guest's kernel driver is the front-end's user.
The guest tests need root, QEMU, a guest kernel, busybox-static and
iperf3, so they are marked `guest` and deselected by default; run them with

    .venv/bin/pytest -m guest tests/test_guest_net.py -s

(-s prints throughput and counters). Each boots one guest (about 5 s under
TCG) and runs iperf3 for a few seconds; together they take about 2 minutes.
The unmarked tests at the end (parsing, counters, the benchmark's report)
run in the default suite.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from guest_support import missing_requirements, pid_alive
from pyvirtio.bench.guest import GuestBenchConfig, cpu_us_per_frame, format_table, per_frame, summarize
from pyvirtio.bench.harness import (
    Guest,
    GuestNetwork,
    NetNamespace,
    NetVariant,
    PyvirtioNetBackend,
    feature_bit,
    netns_exists,
    parse_iperf_json,
    queue_counters,
    queue_deltas,
    ring_errors,
    vhost_user_net_args,
)
from pyvirtio.bench.harness.iperf import IperfError, iperf_command
from pyvirtio.devices.net import NetDevice
from pyvirtio.spec import Feature
from pyvirtio.vhost_user import Features, MemoryRegion, MemRegMsg, ProtocolFeature, Request
from pyvirtio.vhost_user.backend import Backend
from pyvirtio.vhost_user.server import Server
from vhost_client import UVA_BASE, NetFrontend

IPERF_SECONDS = 2

# virtio feature bits as the guest's sysfs shows them
F_GUEST_TSO4 = 7
F_HOST_TSO4 = 11
F_MRG_RXBUF = 15
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_RING_PACKED = 34


@pytest.fixture(scope="module")
def _requirements() -> None:
    reason = missing_requirements("iperf3", "ip", "ss", why_root="network namespaces, TAP devices")
    if reason:
        pytest.skip(reason)


@pytest.fixture
def net_guests(_requirements: None, tmp_path: Path) -> Iterator[list[GuestNetwork]]:
    """Collects GuestNetworks; afterwards asserts each left no process, namespace, TAP or socket."""
    nets: list[GuestNetwork] = []
    yield nets
    for gn in nets:
        gn.close()  # idempotent; the test's `with` normally did it
        pids: list[int] = []
        if isinstance(gn.guest, Guest) and gn.guest.pid is not None:
            pids.append(gn.guest.pid)
        if isinstance(gn.backend, PyvirtioNetBackend):
            pids += gn.backend.pids
            assert not os.path.exists(os.path.dirname(gn.backend.socket_path)), "socket directory left behind"
        if gn.server is not None and gn.server.pid is not None:
            pids.append(gn.server.pid)
        for pid in pids:
            assert not pid_alive(pid), f"pid {pid} still running"
        if isinstance(gn.ns, NetNamespace):
            assert not netns_exists(gn.ns.name), f"netns {gn.ns.name} still exists"
            assert not Path("/sys/class/net", gn.ns.tap).exists(), "TAP leaked into the root namespace"


def _start(nets: list[GuestNetwork], variant: NetVariant, log_dir: Path) -> GuestNetwork:
    gn = GuestNetwork(variant, log_dir=log_dir)
    nets.append(gn)
    return gn


def _avg_frame(delta: dict[str, int]) -> float:
    return delta["bytes"] / delta["packets"] if delta.get("packets") else 0.0


@pytest.mark.guest
@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_guest_on_pyvirtio_net_pings_and_moves_tcp_both_ways(
    net_guests: list[GuestNetwork], tmp_path: Path, ring: str, event_idx: bool
) -> None:
    t0 = time.monotonic()
    with _start(net_guests, NetVariant("lazy", ring, event_idx=event_idx), tmp_path) as gn:
        assert gn.guest is not None and gn.backend is not None
        guest = gn.guest
        print(f"\n[{gn.variant.label}] boot {guest.boot_seconds:.2f} s")
        assert guest.check("cat /sys/class/net/eth0/operstate") == "up"
        features = gn.guest_features()
        assert feature_bit(features, F_VERSION_1)
        assert feature_bit(features, F_RING_PACKED) == (ring == "packed")
        assert feature_bit(features, F_EVENT_IDX) == event_idx
        # Checksum/TSO offloads pass through: the guest negotiated TSO both ways.
        assert feature_bit(features, F_HOST_TSO4) and feature_bit(features, F_GUEST_TSO4)
        assert feature_bit(features, F_MRG_RXBUF)
        rc, out = gn.ping(3)
        assert rc == 0 and "3 packets received" in out, out

        s0 = gn.backend.stats()
        tx = gn.iperf("tcp_tx", IPERF_SECONDS)
        s1 = gn.backend.stats()
        rx = gn.iperf("tcp_rx", IPERF_SECONDS)
        s2 = gn.backend.stats()
        d_tx = queue_deltas(s0, s1)["tx0"]
        d_rx = queue_deltas(s1, s2)["rx0"]
        print(
            f"[{gn.variant.label}] TCP tx {tx.gbps:.3f} Gbit/s ({_avg_frame(d_tx):.0f} B/frame, "
            f"{d_tx['kick_count'] / max(d_tx['packets'], 1):.3f} kicks/frame), "
            f"TCP rx {rx.gbps:.3f} Gbit/s ({_avg_frame(d_rx):.0f} B/frame)"
        )
        assert tx.bits_per_second > 1e6 and rx.bits_per_second > 1e6
        # TSO in effect through the TAP: frames far larger than the 1500-byte MTU.
        assert _avg_frame(d_tx) > 3000, d_tx
        assert _avg_frame(d_rx) > 3000, d_rx
        assert ring_errors(s2) == 0, queue_counters(s2)
        nic = gn.guest_nic_errors()
        assert not any(nic.values()), nic  # the guest driver dropped nothing
        assert s2["negotiated"].count("TSO") >= 4, s2["negotiated"]
    assert gn.backend.last_stats is not None and ring_errors(gn.backend.last_stats) == 0
    print(f"[{gn.variant.label}] test time {time.monotonic() - t0:.1f} s")


@pytest.mark.guest
def test_eager_policy_moves_udp_and_tcp_without_stalling(
    net_guests: list[GuestNetwork], tmp_path: Path
) -> None:
    # The eager baseline publishes and decides an interrupt per completion, and
    # arms kicks inside every empty check: a kick drained after that check
    # used to be lost, stalling the ring under an unthrottled UDP flood.
    with _start(net_guests, NetVariant("eager"), tmp_path) as gn:
        assert gn.backend is not None
        udp = gn.iperf("udp_tx", IPERF_SECONDS)
        tcp = gn.iperf("tcp_rx", IPERF_SECONDS)
        stats = gn.backend.stats()
        pps = udp.packets_per_second or 0.0
        print(f"\n[eager] UDP tx {pps:.0f} packets/s, TCP rx {tcp.gbps:.3f} Gbit/s")
        assert pps > 100 and tcp.bits_per_second > 1e6
        assert ring_errors(stats) == 0
        counters = queue_counters(stats)
        assert counters["rx0"]["interrupts"] > 0 and counters["tx0"]["interrupts"] > 0
        nic = gn.guest_nic_errors()
        assert not any(nic.values()), nic


@pytest.mark.guest
def test_two_queue_pairs_start_on_one_connection_and_carry_traffic(
    net_guests: list[GuestNetwork], tmp_path: Path
) -> None:
    # QEMU runs one vhost_dev per queue pair on the same socket; with
    # CONFIGURE_MEM_SLOTS each of them sends ADD_MEM_REG for the same guest RAM.
    with _start(net_guests, NetVariant("lazy", queues=2), tmp_path) as gn:
        assert gn.guest is not None and gn.backend is not None
        assert gn.guest.check("ls /sys/class/net/eth0/queues").split() == ["rx-0", "rx-1", "tx-0", "tx-1"]
        tcp = gn.iperf("tcp_tx", IPERF_SECONDS)  # two streams (-P 2)
        stats = gn.backend.stats()
        counters = queue_counters(stats)
        print(f"\n[2 queue pairs] TCP tx {tcp.gbps:.3f} Gbit/s, frames per queue "
              f"{ {r: c['packets'] for r, c in sorted(counters.items())} }")  # fmt: skip
        assert tcp.bits_per_second > 1e6
        assert stats["connections"] == 1, "the back-end dropped QEMU's connection"
        assert {"rx0", "tx0", "rx1", "tx1"} <= set(counters)
        assert all(c["starts"] == 1 and c["errors"] == 0 for c in counters.values()), counters


@pytest.mark.guest
def test_driver_reload_brings_the_device_back(net_guests: list[GuestNetwork], tmp_path: Path) -> None:
    with _start(net_guests, NetVariant("lazy"), tmp_path) as gn:
        assert gn.guest is not None and gn.backend is not None
        assert gn.ping(1)[0] == 0
        before = queue_counters(gn.backend.stats())
        # The driver resets the device on unload (QEMU stops our rings: GET_VRING_BASE) and
        # negotiates and starts it again on load.
        gn.reload_driver()
        assert gn.guest.check("cat /sys/class/net/eth0/operstate") == "up"
        rc, out = gn.ping(3)
        assert rc == 0 and "3 packets received" in out, out
        tcp = gn.iperf("tcp_tx", IPERF_SECONDS)
        after = queue_counters(gn.backend.stats())
        print(f"\n[reload] TCP tx after modprobe {tcp.gbps:.3f} Gbit/s")
        assert tcp.bits_per_second > 1e6
        for role in ("rx0", "tx0"):
            assert after[role]["starts"] == before[role]["starts"] + 1, (before, after)
            assert after[role]["errors"] == 0


@pytest.mark.guest
def test_backend_killed_and_restarted_traffic_resumes(net_guests: list[GuestNetwork], tmp_path: Path) -> None:
    # chardev reconnect=1: QEMU reconnects to the restarted back-end and sets
    # the split rings up again from the used index in guest memory.
    with _start(net_guests, NetVariant("lazy", "split"), tmp_path) as gn:
        assert gn.guest is not None and gn.backend is not None
        gn.iperf("tcp_tx", 1, omit=0)  # traffic in flight before the crash
        gn.backend.kill()
        # QEMU notices the closed socket and takes the guest's link down.
        gn.guest.check(
            'n=0; while [ "$(cat /sys/class/net/eth0/operstate)" != down ]; do '
            "[ $n -ge 100 ] && exit 1; usleep 50000; n=$((n + 1)); done",
            timeout=15,
        )
        gn.backend.start()
        t = gn.wait_reachable(30)
        print(f"\n[reconnect] namespace reachable {t:.2f} s after the restart")
        assert gn.guest.check("cat /sys/class/net/eth0/operstate") == "up"
        tx = gn.iperf("tcp_tx", IPERF_SECONDS)
        rx = gn.iperf("tcp_rx", IPERF_SECONDS)
        stats = gn.backend.stats()
        print(f"[reconnect] TCP tx {tx.gbps:.3f} Gbit/s, rx {rx.gbps:.3f} Gbit/s on the new back-end")
        assert tx.bits_per_second > 1e6 and rx.bits_per_second > 1e6
        assert ring_errors(stats) == 0
        assert stats["connections"] == 1
        assert queue_counters(stats)["tx0"]["packets"] > 0


@pytest.mark.guest
def test_packed_ring_after_backend_restart_resumes_once_the_driver_resets(
    net_guests: list[GuestNetwork], tmp_path: Path
) -> None:
    # QEMU 7.2 keeps no copy of a packed ring's position (it only learns it
    # from GET_VRING_BASE, which a dead back-end cannot answer), so after a
    # reconnect it restarts the packed rings at their initial state while the
    # guest's driver is elsewhere in the ring. What a user sees: the link comes
    # back, traffic does not, until the driver resets the device.
    with _start(net_guests, NetVariant("lazy", "packed"), tmp_path) as gn:
        assert gn.guest is not None and gn.backend is not None
        assert gn.ping(3)[0] == 0
        gn.backend.kill()
        gn.backend.start()
        time.sleep(2.0)  # QEMU reconnects within reconnect=1 s
        rc, _ = gn.ping(2)
        print(
            f"\n[packed reconnect] traffic {'resumed' if rc == 0 else 'did not resume'} without a driver reset"
        )
        gn.reload_driver()
        gn.wait_reachable(30)
        tx = gn.iperf("tcp_tx", IPERF_SECONDS)
        print(f"[packed reconnect] after rmmod/modprobe: TCP tx {tx.gbps:.3f} Gbit/s")
        assert tx.bits_per_second > 1e6
        assert ring_errors(gn.backend.stats()) == 0


# --- no guest needed: parsing, counters, the benchmark's report ---------------------------------

_TCP_JSON = {
    "start": {"test_start": {"protocol": "TCP"}},
    "end": {
        "sum_sent": {"seconds": 2.0, "bytes": 250_000_000, "bits_per_second": 1.0e9, "retransmits": 3},
        "sum_received": {"seconds": 2.0, "bytes": 249_000_000, "bits_per_second": 0.996e9},
        "cpu_utilization_percent": {"host_total": 98.5, "remote_total": 3.0},
    },
}
_UDP_JSON = {
    "end": {
        "sum_sent": {"seconds": 2.0, "bytes": 30_000_000, "bits_per_second": 1.2e8, "packets": 21000},
        "sum_received": {
            "seconds": 2.0,
            "bytes": 29_000_000,
            "bits_per_second": 1.16e8,
            "packets": 21000,
            "lost_packets": 1000,
        },
    }
}


def test_iperf_json_gives_receiver_rates_and_udp_packets_per_second() -> None:
    tcp = parse_iperf_json("tcp_tx", "iperf3 noise before\n" + json.dumps(_TCP_JSON))
    assert tcp.bits_per_second == 0.996e9 and tcp.retransmits == 3
    assert tcp.guest_cpu_percent == 98.5 and tcp.packets_per_second is None
    udp = parse_iperf_json("udp_tx", json.dumps(_UDP_JSON))
    assert udp.packets == 20000 and udp.lost_packets == 1000 and udp.sent_packets == 21000
    assert udp.packets_per_second == 10000.0


def test_iperf_failure_is_reported_with_iperf3s_own_message() -> None:
    with pytest.raises(IperfError, match="No route to host"):
        parse_iperf_json(
            "tcp_tx", json.dumps({"end": {}, "error": "unable to connect to server: No route to host"})
        )
    with pytest.raises(IperfError, match="not JSON"):
        parse_iperf_json("tcp_tx", "{ truncated")


def test_iperf_commands_run_from_the_guest_towards_the_namespace() -> None:
    assert iperf_command("tcp_rx", "10.213.1.1", 3) == "iperf3 -c 10.213.1.1 -p 5201 -t 3 -O 1 -i 0 -J -R"
    assert iperf_command("udp_tx", "10.213.1.1", 2.5, omit=0, parallel=2).endswith(
        "-O 0 -i 0 -J -P 2 -u -b 0"
    )
    with pytest.raises(ValueError):
        iperf_command("sctp", "10.213.1.1", 1)


def test_variant_maps_to_the_same_device_properties_for_every_backend() -> None:
    v = NetVariant("lazy", "packed", event_idx=False, offloads=False)
    assert v.label == "lazy packed no-event-idx no-offloads"
    args = vhost_user_net_args("/tmp/x.sock", **v.device_props())
    dev = args[-1]
    for prop in ("vectors=0", "packed=on", "event_idx=off", "host_tso4=off", "guest_csum=off"):
        assert prop in dev
    assert v.with_backend("builtin").device_props() == v.device_props()
    with pytest.raises(ValueError):
        NetVariant("vhost-net")


def _stats(rx: dict[str, int], tx: dict[str, int]) -> dict[str, object]:
    def q(role: str, c: dict[str, int]) -> dict[str, object]:
        return {"role": role, **{k: v for k, v in c.items() if k != "acc"}, "accesses": {"total": c["acc"]}}

    return {"queues": [q("rx0", rx), q("tx0", tx)]}


def test_per_frame_counters_use_the_queue_carrying_the_tests_data() -> None:
    before = _stats({"packets": 10, "bytes": 100, "kick_count": 1, "interrupts": 5, "acc": 50},
                    {"packets": 20, "bytes": 2000, "kick_count": 4, "interrupts": 2, "acc": 80})  # fmt: skip
    after = _stats({"packets": 110, "bytes": 10100, "kick_count": 1, "interrupts": 55, "acc": 1050},
                   {"packets": 220, "bytes": 12002000, "kick_count": 54, "interrupts": 42, "acc": 880})  # fmt: skip
    d = queue_deltas(before, after)
    assert d["tx0"]["packets"] == 200 and d["rx0"]["interrupts"] == 50
    tx = per_frame("tcp_tx", d)
    assert tx["frames"] == 200 and tx["bytes_per_frame"] == 60000.0
    assert tx["kicks_per_packet"] == 0.25 and tx["interrupts_per_packet"] == 0.2
    assert tx["accesses_per_packet"] == 4.0 and tx["all_interrupts_per_packet"] == 0.45
    rx = per_frame("tcp_rx", d)
    assert rx["frames"] == 100 and rx["kicks_per_packet"] == 0.0 and rx["interrupts_per_packet"] == 0.5


def test_benchmark_report_has_medians_spreads_counters_and_ratios() -> None:
    cfg = GuestBenchConfig(backends=("lazy", "builtin"), tests=("tcp_tx", "udp_tx"), repeat=3, seconds=1)
    cpu = {"vcpu": 80.0, "qemu": 5.0, "backend": 20.0, "iperf3_server": 2.0}
    runs: dict[str, dict[str, object]] = {}
    for b, scale in (("lazy", 1.0), ("builtin", 0.5)):
        samples: dict[str, list[dict[str, object]]] = {"tcp_tx": [], "udp_tx": []}
        for i, v in enumerate((0.9, 1.0, 1.2)):
            counters = {"frames": 100, "kicks_per_packet": 0.1 * (i + 1), "interrupts_per_packet": 0.2,
                        "accesses_per_packet": 5.0, "metadata_accesses_per_packet": 4.0,
                        "bytes_per_frame": 50000.0, "all_kicks_per_packet": 0.3,
                        "all_interrupts_per_packet": 0.5, "backend_cpu_us_per_frame": 10.0 * (i + 1)}  # fmt: skip
            for t in ("tcp_tx", "udp_tx"):
                samples[t].append({"value": v * scale, "value_per_vcpu": v * scale / 0.8, "host_cpu": cpu,
                                   "guest_cpu_percent": 99.0,
                                   **({"counters": counters} if b == "lazy" else {})})  # fmt: skip
        runs[b] = {"samples": samples, "errors": [], "ring_errors": 0}
    res = {"config": asdict(cfg), "runs": runs, **summarize(cfg, runs)}
    s = res["summary"]["lazy"]["tcp_tx"]
    assert (s["median"], s["min"], s["max"], s["kicks_per_packet"]) == (1.0, 0.9, 1.2, 0.2)
    assert s["backend_cpu_us_per_frame"] == 20.0
    assert res["ratios"]["lazy/builtin"] == {"tcp_tx": 2.0, "udp_tx": 2.0}
    text = format_table(res)
    assert "1.000 [0.900-1.200]" in text and "lazy/builtin" in text and "builtin" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("lazy       tcp_tx"))
    assert row.split()[-1] == "20.0"  # the back-end's CPU per frame, last column
    # 25% of a core for 2 s over 10,000 frames: 50 us each
    assert cpu_us_per_frame(25.0, 2.0, 10_000) == 50.0


def test_the_same_memory_region_added_once_per_queue_pair_is_kept_until_its_last_removal(
    tmp_path: Path,
) -> None:
    # What QEMU 7.2 does with `queues=2` and CONFIGURE_MEM_SLOTS: one vhost_dev per
    # queue pair, each sending ADD_MEM_REG (and later REM_MEM_REG) for all of guest RAM.

    be = Backend(NetDevice("loopback", queue_pairs=2))
    path = str(tmp_path / "net.sock")
    srv = Server(be, socket_path=path)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        fe = NetFrontend(path)
        c = fe.client
        proto = c.call(Request.GET_PROTOCOL_FEATURES).body.value
        assert proto & ProtocolFeature.CONFIGURE_MEM_SLOTS
        c.send(Request.SET_PROTOCOL_FEATURES, Features(proto))
        c.send(Request.SET_FEATURES, Features(int(Feature.VERSION_1) | 1 << 30))
        region = MemoryRegion(0, fe.mem.size, UVA_BASE, 0)
        for _pair in range(2):
            assert c.call(Request.ADD_MEM_REG, MemRegMsg(region, fe.mem.fd), need_reply=True).body.value == 0
        assert c.call(Request.REM_MEM_REG, MemRegMsg(region), need_reply=True).body.value == 0
        assert len(be.mem.regions) == 1  # still used by the other pair's vhost_dev
        assert c.call(Request.REM_MEM_REG, MemRegMsg(region), need_reply=True).body.value == 0
        assert len(be.mem.regions) == 0
        assert srv.connections == 1 and srv.last_error is None
        fe.close()
    finally:
        srv.stop()
        t.join(10)
        be.close()
