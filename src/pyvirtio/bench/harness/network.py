"""A guest on a chosen virtio-net back-end, with its host end in a private namespace.

`GuestNetwork(NetVariant(...))` is the whole setup the tests, `pyvirtio
bench guest` and the demo share:

    namespace pvns-*:  TAP (host address .1)  <-  pyvirtio net --backend tap:TAP
                       iperf3 -s                    ^ vhost-user socket
                       QEMU (ip netns exec)  -------'   (or QEMU's own virtio-net on the TAP)
    guest:             eth0 = virtio-net-pci,vectors=0 (address .2)

Back-ends (`NetVariant.backend`):

- "lazy", "eager": pyvirtio's vhost-user-net (`--policy`), started inside
  the namespace so that it opens the namespace's TAP;
- "builtin": QEMU's own userspace virtio-net on the same TAP
  (`-netdev tap,vhost=off`), the baseline, with the same `vectors=0`.

Both give the guest the same virtio-net-pci device properties (ring format,
EVENT_IDX, indirect descriptors, mergeable rx buffers, checksum/TSO
offloads, queue pairs), so comparisons are like for like. The namespace
holds nothing but lo and the TAP: the guest can reach the namespace's
address and nothing else.

Closing (also on exceptions and Ctrl-C) powers the guest off, stops the
back-end and the iperf3 server by pid, and deletes the TAP and the namespace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pyvirtio._engine import PURE_ENV
from pyvirtio.bench.harness.backend import PyvirtioNetBackend
from pyvirtio.bench.harness.initramfs import InitramfsError, find_busybox, find_kernel
from pyvirtio.bench.harness.iperf import DEFAULT_PORT, IperfResult, IperfServer, run_iperf
from pyvirtio.bench.harness.netns import NetNamespace
from pyvirtio.bench.harness.qemu import Guest, GuestError, builtin_net_args, vhost_user_net_args

log = logging.getLogger(__name__)

#: "-pure": the same back-end on the pure-Python ring engine (PYVIRTIO_PURE=1)
BACKENDS = ("lazy", "eager", "lazy-pure", "eager-pure", "builtin")
RINGS = ("split", "packed")


@dataclass(slots=True, frozen=True)
class NetVariant:
    """Which back-end serves the guest's NIC, and the device's properties.

    `queues` is the number of queue pairs; the guest gets as many vCPUs
    (Linux uses min(vCPUs, pairs) pairs). `offloads` switches checksum and
    TSO offload in both directions on or off together.
    """

    backend: str = "lazy"
    ring: str = "split"
    event_idx: bool = True
    indirect: bool = True
    mrg_rxbuf: bool = True
    offloads: bool = True
    queues: int = 1

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.ring not in RINGS:
            raise ValueError(f"ring must be split or packed, got {self.ring!r}")
        if not 1 <= self.queues <= 8:
            raise ValueError(f"queues must be 1..8, got {self.queues}")

    @property
    def ours(self) -> bool:
        """Served by pyvirtio (not QEMU's built-in device)."""
        return self.backend != "builtin"

    @property
    def label(self) -> str:
        """A short description: "lazy split", "builtin packed no-event-idx 2q", ..."""
        parts = [self.backend, self.ring]
        for flag, name in (
            (self.event_idx, "event-idx"),
            (self.indirect, "indirect"),
            (self.mrg_rxbuf, "mrg-rxbuf"),
            (self.offloads, "offloads"),
        ):
            if not flag:
                parts.append(f"no-{name}")
        if self.queues > 1:
            parts.append(f"{self.queues}q")
        return " ".join(parts)

    def with_backend(self, backend: str) -> NetVariant:
        return replace(self, backend=backend)

    def device_props(self) -> dict[str, Any]:
        """Keyword arguments for `virtio_net_device_args` (vectors=0 is its default)."""
        return {
            "packed": self.ring == "packed",
            "event_idx": self.event_idx,
            "indirect_desc": self.indirect,
            "mrg_rxbuf": self.mrg_rxbuf,
            "csum": self.offloads,
            "guest_csum": self.offloads,
            "host_tso": self.offloads,
            "guest_tso": self.offloads,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class GuestNetwork:
    """Namespace + back-end + guest for one `NetVariant`; a context manager.

    Attributes once entered: `ns` (the namespace), `backend` (the
    `PyvirtioNetBackend`, None for "builtin"), `guest` (the booted `Guest`).

    Arguments:
        log_dir: keep serial.log, qemu.log, backend.log and the counters
            here; by default a temporary directory, removed on a clean close
            and kept (path logged) when something failed.
        reconnect: QEMU's `reconnect=` seconds on the vhost-user chardev
            (None: QEMU does not reconnect to a restarted back-end).
        profile_dir: profile our back-end's queue workers (cProfile dumps).
        memory_mib, boot_timeout: for the `Guest`.
        backend_args, backend_env: extra `pyvirtio net` arguments and
            environment variables for our back-end.
    """

    def __init__(
        self,
        variant: NetVariant,
        *,
        log_dir: Path | None = None,
        reconnect: int | None = 1,
        profile_dir: Path | None = None,
        memory_mib: int = 512,
        boot_timeout: float = 120.0,
        backend_args: tuple[str, ...] = (),
        backend_env: dict[str, str] | None = None,
    ) -> None:
        self.variant = variant
        self.reconnect = reconnect
        self.profile_dir = profile_dir
        self.memory_mib = memory_mib
        self.boot_timeout = boot_timeout
        self.backend_args = backend_args
        self.backend_env = backend_env
        self._user_log_dir = log_dir
        self.log_dir: Path | None = log_dir
        self.ns: NetNamespace | None = None
        self.backend: PyvirtioNetBackend | None = None
        self.guest: Guest | None = None
        self.server: IperfServer | None = None
        self._stack = contextlib.ExitStack()
        self._failed = False

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Create the namespace, start the back-end, boot the guest (with eth0 up and addressed)."""
        v = self.variant
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="pyvirtio-guestnet-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.ns = self._stack.enter_context(NetNamespace(multi_queue=v.queues > 1))
            if v.ours:
                self.backend = self._stack.enter_context(
                    PyvirtioNetBackend(
                        self.ns,
                        policy=v.backend.removesuffix("-pure"),
                        queues=v.queues,
                        log_dir=self.log_dir,
                        profile_dir=self.profile_dir,
                        extra_args=self.backend_args,
                        env={**(self.backend_env or {}), **({PURE_ENV: "1"} if v.backend.endswith("-pure") else {})},
                    )
                )
                device_args = vhost_user_net_args(
                    self.backend.socket_path, mq=v.queues, reconnect=self.reconnect, **v.device_props()
                )
            else:
                device_args = builtin_net_args(self.ns.tap, mq=v.queues, **v.device_props())
            guest = Guest(
                device_args=device_args,
                ip=self.ns.guest_cidr,
                netns=self.ns.name,
                smp=v.queues,
                memory_mib=self.memory_mib,
                log_dir=self.log_dir,
                boot_timeout=self.boot_timeout,
            )
            # Entered last, so it is closed first: the guest powers off before its back-end stops.
            self.guest = self._stack.enter_context(guest)
        except BaseException:
            self._failed = True
            self.close()
            raise

    def close(self) -> None:
        """Power the guest off, stop the iperf3 server and the back-end, delete the namespace."""
        try:
            self._stack.close()
        finally:
            if self._user_log_dir is None and self.log_dir is not None:
                if self._failed:
                    log.warning("guest network logs kept in %s", self.log_dir)
                else:
                    shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._failed = True
        self.close()

    # -- using it ----------------------------------------------------------------------------------

    def _need(self) -> tuple[NetNamespace, Guest]:
        if self.ns is None or self.guest is None:
            raise GuestError("guest network not started")
        return self.ns, self.guest

    def ping(self, count: int = 3, timeout: float = 30.0) -> tuple[int, str]:
        """Ping the namespace's address from the guest; (exit status, output)."""
        ns, guest = self._need()
        return guest.run(f"ping -c {count} -W 2 {ns.host_ip}", timeout=timeout)

    def wait_reachable(self, timeout: float = 30.0) -> float:
        """Ping once a second until the namespace answers; return the seconds it took."""
        ns, guest = self._need()
        t0 = time.monotonic()
        while True:
            rc, _ = guest.run(f"ping -c 1 -W 1 {ns.host_ip}", timeout=10)
            if rc == 0:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise GuestError(f"{ns.host_ip} not reachable from the guest within {timeout:g} s")

    def start_iperf_server(self) -> IperfServer:
        """Start `iperf3 -s` in the namespace (if not yet running); stopped on close."""
        ns, _ = self._need()
        if self.server is None:
            self.server = self._stack.enter_context(IperfServer(ns, port=DEFAULT_PORT))
        return self.server

    def iperf(self, test: str, seconds: float, *, omit: int = 1, parallel: int | None = None) -> IperfResult:
        """Run one iperf3 test (see `pyvirtio.bench.harness.iperf.TESTS`); starts the server on first use."""
        ns, guest = self._need()
        self.start_iperf_server()
        streams = parallel if parallel is not None else self.variant.queues
        return run_iperf(guest, ns.host_ip, test, seconds, omit=omit, parallel=streams)

    def configure_eth0(self, carrier_timeout: float = 10.0) -> None:
        """Bring eth0 up with its address again (after the driver was reloaded) and wait for carrier."""
        ns, guest = self._need()
        guest.check(f"ip link set eth0 up && ip addr add {ns.guest_cidr} dev eth0")
        guest.check(
            'n=0; while [ "$(cat /sys/class/net/eth0/operstate)" != up ]; do '
            f"[ $n -ge {int(carrier_timeout * 20)} ] && exit 1; usleep 50000; n=$((n + 1)); done",
            timeout=carrier_timeout + 10,
        )

    def reload_driver(self) -> None:
        """`rmmod virtio_net; modprobe virtio_net` in the guest, then configure eth0 again."""
        _, guest = self._need()
        guest.check("rmmod virtio_net")
        guest.check("[ ! -e /sys/class/net/eth0 ]")
        guest.check("modprobe virtio_net && [ -e /sys/class/net/eth0 ]")
        self.configure_eth0()

    def guest_nic_errors(self) -> dict[str, int]:
        """The guest driver's error and drop counters for eth0 (sysfs statistics).

        `rx_length_errors` counts frames the driver threw away as malformed,
        e.g. a mergeable frame whose buffers were not all published together.
        """
        _, guest = self._need()
        names = ("rx_errors", "rx_length_errors", "rx_dropped", "tx_errors", "tx_dropped")
        out = guest.check("cd /sys/class/net/eth0/statistics && cat " + " ".join(names))
        return dict(zip(names, (int(x) for x in out.split()), strict=True))

    def guest_features(self) -> str:
        """The feature bits the guest driver negotiated (virtio sysfs `features`, bit 0 first)."""
        _, guest = self._need()
        return guest.check("cat /sys/class/net/eth0/device/features")


def missing_requirements() -> str | None:
    """Why a guest network cannot be set up here (None if it can): root, QEMU, iperf3, a kernel."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    for tool in ("qemu-system-x86_64", "iperf3", "ip", "ss", "ldd"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/setup.sh --peers)"
    try:
        find_kernel()
        find_busybox()
    except InitramfsError as e:
        return str(e)
    return None


def feature_bit(features: str, bit: int) -> bool:
    """Whether `bit` is set in a virtio sysfs feature string ("1101...", bit 0 first)."""
    return bit < len(features) and features[bit] == "1"


__all__ = ["BACKENDS", "RINGS", "GuestNetwork", "NetVariant", "feature_bit", "missing_requirements"]
