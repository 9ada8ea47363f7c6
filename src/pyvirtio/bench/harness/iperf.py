"""iperf3 between a guest and its network namespace.

The server (`iperf3 -s`) runs inside the `NetNamespace`, bound to the host
address of its TAP; the client runs in the guest (`Guest.run`) and prints
JSON on the serial console, which `run_iperf` parses into an `IperfResult`.
Three tests, named from the guest's point of view:

| test   | iperf3 client flags | measures |
|--------|---------------------|----------|
| tcp_tx | (none)              | TCP guest -> namespace, receiver's bit/s |
| tcp_rx | `-R`                | TCP namespace -> guest, receiver's bit/s |
| udp_tx | `-u -b 0`           | UDP guest -> namespace unthrottled, packets/s the server received |

Every run uses `-O OMIT` (the first seconds, TCP slow start, are left out of
the totals) and `-i 0` (no per-interval reports: less serial output).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Self

from pyvirtio.bench.harness.netns import NetNamespace
from pyvirtio.bench.harness.qemu import Guest, GuestError

#: test name -> iperf3 client flags
TESTS: dict[str, str] = {"tcp_tx": "", "tcp_rx": "-R", "udp_tx": "-u -b 0"}
DEFAULT_PORT = 5201


class IperfError(GuestError):
    """iperf3 failed (could not connect, the test broke off, unparsable output)."""


@dataclass(slots=True, frozen=True)
class IperfResult:
    """One iperf3 run. Rates are the receiver's unless named `sent_`."""

    test: str
    seconds: float
    bits_per_second: float
    sent_bits_per_second: float
    bytes: int
    retransmits: int | None = None  # TCP, sender side
    packets: int | None = None  # UDP: datagrams the server received
    sent_packets: int | None = None  # UDP: datagrams the client sent
    lost_packets: int | None = None
    guest_cpu_percent: float | None = None  # iperf3's own CPU use in the guest
    host_cpu_percent: float | None = None  # iperf3's own CPU use in the namespace

    @property
    def gbps(self) -> float:
        return self.bits_per_second / 1e9

    @property
    def packets_per_second(self) -> float | None:
        if self.packets is None or not self.seconds:
            return None
        return self.packets / self.seconds

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["packets_per_second"] = self.packets_per_second
        return d


def parse_iperf_json(test: str, text: str) -> IperfResult:
    """Parse the JSON an iperf3 client printed (`-J`) for `test`. Raises `IperfError`."""
    start = text.find("{")
    try:
        doc = json.loads(text[start:]) if start >= 0 else None
    except ValueError as e:
        raise IperfError(f"iperf3 {test}: output is not JSON ({e}):\n{text[-2000:]}") from None
    if not isinstance(doc, dict):
        raise IperfError(f"iperf3 {test}: no JSON in the output:\n{text[-2000:]}")
    if doc.get("error"):
        raise IperfError(f"iperf3 {test}: {doc['error']}")
    end = doc.get("end") or {}
    sent = end.get("sum_sent") or {}
    recv = end.get("sum_received") or {}
    if not recv or not recv.get("seconds"):
        raise IperfError(f"iperf3 {test}: no receiver summary in the output")
    cpu = end.get("cpu_utilization_percent") or {}
    # The client runs in the guest: "host" is iperf3's word for the client's side.
    guest_cpu, host_cpu = cpu.get("host_total"), cpu.get("remote_total")
    if test.startswith("udp"):
        lost = int(recv.get("lost_packets", 0))
        got = int(recv.get("packets", 0)) - lost
        return IperfResult(
            test, float(recv["seconds"]), float(recv.get("bits_per_second", 0.0)),
            float(sent.get("bits_per_second", 0.0)), int(recv.get("bytes", 0)),
            packets=got, sent_packets=int(sent.get("packets", 0)), lost_packets=lost,
            guest_cpu_percent=guest_cpu, host_cpu_percent=host_cpu,
        )  # fmt: skip
    retrans = sent.get("retransmits")
    return IperfResult(
        test, float(recv["seconds"]), float(recv.get("bits_per_second", 0.0)),
        float(sent.get("bits_per_second", 0.0)), int(recv.get("bytes", 0)),
        retransmits=None if retrans is None else int(retrans),
        guest_cpu_percent=guest_cpu, host_cpu_percent=host_cpu,
    )  # fmt: skip


def iperf_command(
    test: str, server_ip: str, seconds: float, *, port: int = DEFAULT_PORT, omit: int = 1, parallel: int = 1
) -> str:
    """The guest-side iperf3 client command for `test`."""
    if test not in TESTS:
        raise ValueError(f"unknown iperf3 test {test!r} (one of {', '.join(TESTS)})")
    cmd = f"iperf3 -c {server_ip} -p {port} -t {seconds:g} -O {omit} -i 0 -J"
    if parallel > 1:
        cmd += f" -P {parallel}"
    flags = TESTS[test]
    return f"{cmd} {flags}" if flags else cmd


def run_iperf(
    guest: Guest,
    server_ip: str,
    test: str,
    seconds: float,
    *,
    port: int = DEFAULT_PORT,
    omit: int = 1,
    parallel: int = 1,
    timeout: float | None = None,
) -> IperfResult:
    """Run one iperf3 test from the guest against the server at `server_ip`."""
    cmd = iperf_command(test, server_ip, seconds, port=port, omit=omit, parallel=parallel)
    # iperf3 gives up on its own when the path stalls; the serial output of -J adds a few seconds.
    rc, out = guest.run(cmd, timeout=timeout if timeout is not None else seconds + omit + 60)
    try:
        return parse_iperf_json(test, out)
    except IperfError as e:
        if rc != 0:
            raise IperfError(f"{e} (exit status {rc})") from None
        raise


class IperfServer:
    """`iperf3 -s` inside `ns`, bound to its host address; stopped by pid on close.

    It serves one test at a time, any number in sequence.
    """

    def __init__(self, ns: NetNamespace, *, port: int = DEFAULT_PORT) -> None:
        self.ns = ns
        self.port = port
        self._proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._proc = self.ns.popen(
            ["iperf3", "-s", "-B", self.ns.host_ip, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            out = self.ns.run(["ss", "-Hltn", f"sport = :{self.port}"], check=False).stdout
            if out.strip():
                return
            if self._proc.poll() is not None:
                raise IperfError(f"iperf3 -s exited with status {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise IperfError(f"iperf3 -s is not listening on port {self.port} after {timeout:g} s")
            time.sleep(0.05)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        if self._proc is not None:
            NetNamespace.stop(self._proc)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = [
    "DEFAULT_PORT",
    "TESTS",
    "IperfError",
    "IperfResult",
    "IperfServer",
    "iperf_command",
    "parse_iperf_json",
    "run_iperf",
]
