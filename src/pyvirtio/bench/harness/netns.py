"""A private network namespace holding the host end of a guest's network link.

Layout (everything lives in one namespace we create and delete; the root
namespace is never touched):

    root ns:  (nothing)
    pvns-<pid>-<n>:
        lo                      up
        pvtap0 (TAP)            10.213.X.1/24, up     <- QEMU opens it by name
        QEMU                    started with `ip netns exec pvns-<pid>-<n>`
        iperf3 -s, ...          started with `NetNamespace.popen`
    guest:
        eth0 (virtio-net)       10.213.X.2/24 (kernel arg pyvirtio.ip)

A TAP device can only be opened by name from the namespace it lives in, so
QEMU runs inside the namespace instead of the TAP being moved out of QEMU's
reach. Its serial and vhost-user unix sockets are filesystem paths, which
work across network namespaces, so a backend may run in either namespace.
The namespace has no route and no interface besides lo and the TAP, so
guest traffic can only reach addresses on that TAP.

`close` (and `__exit__`, also on exceptions and KeyboardInterrupt) stops
every process started through `popen`, then any other process still in the
namespace (it can only be one of ours, e.g. a QEMU whose `Guest` was not
closed), each by pid, then deletes the TAP and the namespace.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
#: Address block for namespace links; the third octet is per namespace.
SUBNET_PREFIX = "10.213"

_counter = itertools.count()
_counter_lock = threading.Lock()


class NetNamespaceError(RuntimeError):
    """Creating, using or deleting the namespace failed (needs root and iproute2)."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetNamespaceError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def wrap_command(argv: Sequence[str], *, netns: str | None = None, die_with_parent: bool = True) -> list[str]:
    """Prefix `argv` to run inside network namespace `netns` and/or die with its parent.

    Both wrappers (`ip netns exec`, util-linux `setpriv --pdeathsig KILL`)
    exec the next program, so the pid of the started process is the pid of
    the final program, which is what callers stop it by.
    """
    out = list(argv)
    if netns:
        out = ["ip", "netns", "exec", netns, *out]
    if die_with_parent:
        if shutil.which("setpriv"):
            out = ["setpriv", "--pdeathsig", "KILL", "--", *out]
        else:
            log.debug("setpriv not found; %s will not die with its parent", argv[0])
    return out


def netns_exists(name: str) -> bool:
    """Whether a named network namespace `name` exists (as `ip netns` sees it)."""
    return (NETNS_DIR / name).exists()


def remove_stale_namespaces() -> list[str]:
    """Delete `pvns-<pid>-<n>` namespaces whose creating process is gone and that hold no process.

    For recovery after a run died without cleaning up (SIGKILL, an unhandled
    SIGTERM). A namespace whose creator pid is alive, or with any process
    inside, is left alone. Returns the names deleted.
    """
    removed: list[str] = []
    if not NETNS_DIR.is_dir():
        return removed
    for entry in NETNS_DIR.iterdir():
        parts = entry.name.split("-")
        if len(parts) != 3 or parts[0] != "pvns" or not parts[1].isdigit():
            continue
        if Path("/proc", parts[1]).exists():
            continue
        pids = subprocess.run(
            ["ip", "netns", "pids", entry.name], check=False, capture_output=True, text=True
        )
        if pids.stdout.strip():
            continue
        try:
            _ip("netns", "del", entry.name)
        except NetNamespaceError as e:
            log.warning("could not remove stale netns: %s", e)
            continue
        log.info("removed stale netns %s", entry.name)
        removed.append(entry.name)
    return removed


class NetNamespace:
    """A uniquely named network namespace with one TAP device carrying a private /24.

    `host_ip` (x.x.x.1) is on the TAP inside the namespace; `guest_ip`
    (x.x.x.2) is the address to give the guest (`guest_cidr` for
    `Guest(ip=...)`). Use as a context manager; `close` always cleans up.

    Arguments:
        subnet: third octet of 10.213.<subnet>.0/24 (default: from a per-process
            counter). The address only exists inside this namespace, so
            namespaces of concurrent runs never conflict.
        tap: TAP device name inside the namespace.
        multi_queue: create the TAP with IFF_MULTI_QUEUE (needed for a guest
            NIC with mq > 1).
        mtu: TAP MTU (default: the kernel's, 1500).
    """

    def __init__(
        self,
        *,
        subnet: int | None = None,
        tap: str = "pvtap0",
        multi_queue: bool = False,
        mtu: int | None = None,
    ) -> None:
        with _counter_lock:
            n = next(_counter)
        if subnet is None:
            subnet = n % 254 + 1
        if not 0 <= subnet <= 255:
            raise ValueError(f"subnet octet out of range: {subnet}")
        self.tap = tap
        self.multi_queue = multi_queue
        self.mtu = mtu
        self.prefix_len = 24
        self.host_ip = f"{SUBNET_PREFIX}.{subnet}.1"
        self.guest_ip = f"{SUBNET_PREFIX}.{subnet}.2"
        name = f"pvns-{os.getpid()}-{n}"
        while netns_exists(name):  # a stale namespace from an earlier process with our pid
            with _counter_lock:
                n = next(_counter)
            name = f"pvns-{os.getpid()}-{n}"
        self.name = name
        self._created = False
        self._procs: list[subprocess.Popen[Any]] = []

    @property
    def guest_cidr(self) -> str:
        """The guest's address with prefix length, e.g. "10.213.1.2/24"."""
        return f"{self.guest_ip}/{self.prefix_len}"

    @property
    def host_cidr(self) -> str:
        """The namespace-side address with prefix length, e.g. "10.213.1.1/24"."""
        return f"{self.host_ip}/{self.prefix_len}"

    @property
    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def create(self) -> None:
        """Create the namespace and the TAP. On failure, whatever was created is removed again."""
        if self._created:
            raise NetNamespaceError(f"{self.name} already created")
        _ip("netns", "add", self.name)
        self._created = True
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            tuntap = ["-n", self.name, "tuntap", "add", "dev", self.tap, "mode", "tap"]
            if self.multi_queue:
                tuntap.append("multi_queue")
            _ip(*tuntap)
            if self.mtu is not None:
                _ip("-n", self.name, "link", "set", self.tap, "mtu", str(self.mtu))
            _ip("-n", self.name, "addr", "add", self.host_cidr, "dev", self.tap)
            _ip("-n", self.name, "link", "set", self.tap, "up")
        except BaseException:
            self.close()
            raise
        log.info("netns %s: %s %s (guest %s)", self.name, self.tap, self.host_cidr, self.guest_cidr)

    def popen(
        self, args: Sequence[str], *, die_with_parent: bool = True, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start `args` inside the namespace; it is stopped (by pid) on `close` if still running.

        `kwargs` go to `subprocess.Popen` (stdin defaults to /dev/null; the
        process gets its own session so a terminal Ctrl-C reaches only us).
        `die_with_parent` is as for `Guest` (see `wrap_command`): the kernel
        kills the process if ours dies without cleaning up.
        """
        if not self._created:
            raise NetNamespaceError(f"{self.name} not created")
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        argv = wrap_command(args, netns=self.name, die_with_parent=die_with_parent)
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, **kwargs)
        self._procs.append(proc)
        log.debug("netns %s: started pid %d: %s", self.name, proc.pid, " ".join(args))
        return proc

    def run(
        self, args: Sequence[str], *, check: bool = True, timeout: float | None = 60.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run `args` inside the namespace to completion; return its result with text output.

        Output is captured unless `kwargs` say otherwise. Raises
        `subprocess.CalledProcessError` on a non-zero exit when `check`, and
        `subprocess.TimeoutExpired` (after killing it) on timeout.
        """
        if not self._created:
            raise NetNamespaceError(f"{self.name} not created")
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run([*self.exec_prefix, *args], check=check, timeout=timeout, **kwargs)

    @staticmethod
    def stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
        """Stop one process by pid: SIGTERM, then SIGKILL after `timeout`. Return its exit status."""
        if proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
                try:
                    proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        return proc.poll()

    def pids(self) -> list[int]:
        """Process ids currently inside the namespace."""
        if not netns_exists(self.name):
            return []
        proc = subprocess.run(["ip", "netns", "pids", self.name], check=False, capture_output=True, text=True)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def close(self) -> None:
        """Stop our processes, then stray ones in the namespace, then delete the TAP and the namespace.

        Idempotent. Raises `NetNamespaceError` only if the namespace could not
        be deleted.
        """
        for proc in self._procs:
            self.stop(proc)
        self._procs.clear()
        if not self._created:
            return
        strays = self.pids()
        if strays:
            log.warning("netns %s: killing leftover processes %s", self.name, strays)
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
        with contextlib.suppress(NetNamespaceError):
            _ip("-n", self.name, "link", "del", self.tap)
        try:
            _ip("netns", "del", self.name)
        except NetNamespaceError:
            if netns_exists(self.name):
                raise
        self._created = False
        log.debug("netns %s deleted", self.name)

    def __enter__(self) -> Self:
        self.create()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
