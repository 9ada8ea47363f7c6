"""Guest vsock benchmark and workload: a Linux 6.1 guest (QEMU 7.2, TCG,
`vhost-user-vsock-pci`, `vectors=0`) with `pyvirtio vsock` behind it moves
bytes over stream sockets with host programs on the hybrid Unix sockets:

- guest to host: `socat` in the guest connects to host port N (`VSOCK-CONNECT:2:N`)
  and sends a file of random bytes; a host thread accepts on `HOST_SOCK_N`
  and reads to the end;
- host to guest: `socat` in the guest listens on port N (`VSOCK-LISTEN:N`)
  and writes a tmpfs file; a host thread connects to `HOST_SOCK`, writes
  `CONNECT N`, reads `OK`, sends random bytes and half-closes.

Every connection's bytes are compared by sha256 on both ends (`sha256sum`
in the guest). Time is the host's wall clock from the first connection's
first byte to the last connection's end (end of file seen by the host: for
host to guest, once the guest read everything and closed), so MiB/s counts
payload only.

There is no QEMU-internal vsock to compare with: QEMU's other vsock device,
`vhost-vsock-pci`, needs the host kernel's vhost_vsock module
(/dev/vhost-vsock); `kernel_baseline_available()` says whether this host
has it (when it has not, only our numbers are printed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyvirtio.bench.harness.initramfs import DEFAULT_MODULES
from pyvirtio.bench.procs import BenchError, stop_process

MiB = 1 << 20
#: the guest modules for virtio-vsock
VSOCK_MODULES = (*DEFAULT_MODULES, "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")
#: host binaries the guest gets (socat has VSOCK-LISTEN / VSOCK-CONNECT since 1.7.4)
VSOCK_BINARIES = ("socat",)
GUEST_CID = 3
#: guest ports: guest-to-host connections use host ports G2H_PORT + i, host-to-guest guest ports H2G_PORT + i
G2H_PORT = 6000
H2G_PORT = 5000


@dataclasses.dataclass(slots=True)
class VsockBenchConfig:
    #: MiB per direction and connection count (split among the connections)
    mib: int = 32
    #: connection counts measured
    connections: tuple[int, ...] = (1, 4)
    memory_mib: int = 512
    guest_cid: int = GUEST_CID
    work_dir: Path | None = None
    #: extra arguments for our back-end (e.g. ["--buf-alloc", "1048576"])
    pyvirtio_args: tuple[str, ...] = ()


def kernel_baseline_available() -> bool:
    """Whether QEMU's kernel-backed vhost-vsock-pci could run here (/dev/vhost-vsock)."""
    if not os.path.exists("/dev/vhost-vsock"):
        subprocess.run(["modprobe", "vhost_vsock"], capture_output=True, check=False)
    return os.path.exists("/dev/vhost-vsock")


@dataclasses.dataclass(slots=True)
class VsockBackend:
    device_args: list[str]
    pid: int
    uds_path: str
    log_path: Path


@contextlib.contextmanager
def vsock_device(cfg: VsockBenchConfig, work: Path) -> Iterator[VsockBackend]:
    """`pyvirtio vsock` for the guest; its sockets in a short /tmp directory
    (Unix socket paths are at most 107 bytes). Stopped by pid on exit, the
    directory removed."""
    from pyvirtio.bench.harness import vhost_user_vsock_args

    sock_dir = Path(tempfile.mkdtemp(prefix="pyvirtio-vsock-"))
    sock, uds = sock_dir / "vu.sock", sock_dir / "h.sock"
    log_path = work / "pyvirtio-vsock.log"
    argv = [sys.executable, "-m", "pyvirtio", "vsock", "--socket-path", str(sock), "--guest-cid",
            str(cfg.guest_cid), "--uds-path", str(uds), *cfg.pyvirtio_args]
    with open(log_path, "wb") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (sock.exists() and uds.exists()):
            if proc.poll() is not None:
                raise BenchError(f"pyvirtio vsock exited with {proc.returncode}: {log_path.read_text()[-1500:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"pyvirtio vsock did not create {sock}")
            time.sleep(0.02)
        yield VsockBackend(vhost_user_vsock_args(sock), proc.pid, str(uds), log_path)
    finally:
        stop_process(proc)
        shutil.rmtree(sock_dir, ignore_errors=True)


# --- host ends ----------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _HostEnd:
    """One connection's host side: what it sent or got, when."""

    port: int
    sent_sha: str = ""
    got_sha: str = ""
    nbytes: int = 0
    start: float = 0.0
    end: float = 0.0
    error: str = ""


def _read_to_end(s: socket.socket, end: _HostEnd) -> None:
    h = hashlib.sha256()
    buf = bytearray(1 * MiB)
    mv = memoryview(buf)
    while True:
        n = s.recv_into(mv)
        if not n:
            break
        if not end.start:
            end.start = time.monotonic()
        h.update(mv[:n])
        end.nbytes += n
    end.end = time.monotonic()
    end.got_sha = h.hexdigest()


def _receive(listener: socket.socket, end: _HostEnd, timeout: float) -> None:
    """Guest to host: accept the guest's connection on HOST_SOCK_N and read it to the end."""
    try:
        listener.settimeout(timeout)
        s, _ = listener.accept()
        with s:
            s.settimeout(timeout)
            _read_to_end(s, end)
    except OSError as e:
        end.error = f"port {end.port}: {e}"


def _send(uds: str, end: _HostEnd, payload: bytes, timeout: float) -> None:
    """Host to guest: CONNECT to the guest's listener (again until it
    listens), send `payload`, half-close, wait for the guest to close."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(uds)
            s.sendall(f"CONNECT {end.port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                b = s.recv(1)
                if not b:
                    break
                line += b
            if line.startswith(b"OK "):
                break
            s.close()  # not listening yet: the guest refused
            if time.monotonic() > deadline:
                raise TimeoutError(f"the guest never accepted on port {end.port}")
            time.sleep(0.1)
        with s:
            end.start = time.monotonic()
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):  # the guest sends nothing back; EOF once it read everything and closed
                pass
            end.end = time.monotonic()
            end.nbytes = len(payload)
    except OSError as e:
        end.error = f"port {end.port}: {e}"


def _guest_sums(guest: Any, pattern: str) -> dict[str, str]:
    out = guest.check(f"sha256sum {pattern}", timeout=120)
    sums = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1]] = parts[0]
    return sums


def exchange(guest: Any, uds: str, *, to_host: int = 0, to_guest: int = 0, size: int = 8 * MiB,
             timeout: float = 600.0) -> list[dict[str, Any]]:
    """`to_host` guest-to-host and `to_guest` host-to-guest connections,
    all at once, `size` random bytes each; every one checked by sha256 on
    both ends (raises `BenchError` on any difference). Returns a result per
    direction used: connections, MiB, seconds, MiB/s."""
    g2h = [_HostEnd(G2H_PORT + i) for i in range(to_host)]
    h2g = [_HostEnd(H2G_PORT + i) for i in range(to_guest)]
    if to_host:
        guest.check(f"for i in $(seq 0 {to_host - 1}); do head -c {size} /dev/urandom > /tmp/g2h.$i; done",
                    timeout=timeout)
        sums = _guest_sums(guest, "/tmp/g2h.*")
        for i, e in enumerate(g2h):
            e.sent_sha = sums.get(f"/tmp/g2h.{i}", "?")
    if to_guest:
        # listeners in the background, each into a tmpfs file (summed after the clock stops) and a done mark
        guest.check(f"rm -f /tmp/h2g.*; for i in $(seq 0 {to_guest - 1}); do "
                    f"(socat -u -b 65536 VSOCK-LISTEN:$(({H2G_PORT} + i)) CREATE:/tmp/h2g.$i.bin; "
                    "touch /tmp/h2g.$i.done) </dev/null >/dev/null 2>&1 & done")
    payloads = [os.urandom(size) for _ in h2g]
    for e, p in zip(h2g, payloads):
        e.sent_sha = hashlib.sha256(p).hexdigest()
    listeners = []
    threads = []
    try:
        for e in g2h:
            path = f"{uds}_{e.port}"
            ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            ls.bind(path)
            ls.listen(4)
            listeners.append((ls, path))
            threads.append(threading.Thread(target=_receive, args=(ls, e, timeout), daemon=True))
        for e, p in zip(h2g, payloads):
            threads.append(threading.Thread(target=_send, args=(uds, e, p, timeout), daemon=True))
        for t in threads:
            t.start()
        if to_host:
            guest.check(f"for i in $(seq 0 {to_host - 1}); do socat -u -b 65536 OPEN:/tmp/g2h.$i "
                        f"VSOCK-CONNECT:2:$(({G2H_PORT} + i)) & done; wait", timeout=timeout)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise BenchError("host ends still running after the timeout")
    finally:
        for ls, path in listeners:
            ls.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
    if to_guest:
        for _ in range(600):
            done = guest.check("ls /tmp/h2g.*.done 2>/dev/null | wc -l").strip()
            if done == str(to_guest):
                break
            time.sleep(0.1)
        sums = _guest_sums(guest, "/tmp/h2g.*.bin")
        for i, e in enumerate(h2g):
            e.got_sha = sums.get(f"/tmp/h2g.{i}.bin", "")
    guest.check("rm -f /tmp/g2h.* /tmp/h2g.*")
    for e in g2h + h2g:
        if e.error:
            raise BenchError(e.error)
        if e.sent_sha != e.got_sha or e.nbytes != size:
            raise BenchError(f"port {e.port}: {e.nbytes} of {size} bytes, sha256 sent {e.sent_sha[:16]} "
                             f"got {e.got_sha[:16]}")
    results = []
    for name, ends in (("guest->host", g2h), ("host->guest", h2g)):
        if not ends:
            continue
        seconds = max(e.end for e in ends) - min(e.start for e in ends)
        total = size * len(ends) / MiB
        results.append({"direction": name, "connections": len(ends), "mib": total,
                        "seconds": round(seconds, 3), "MiBps": round(total / max(seconds, 1e-6), 2),
                        "intact": True})
    return results


def run(cfg: VsockBenchConfig, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Boot one guest and measure each direction with each connection count."""
    from pyvirtio.bench.harness import Guest, build_initramfs

    work = Path(tempfile.mkdtemp(prefix="pyvirtio-vsockbench-", dir=cfg.work_dir))
    try:
        initrd = build_initramfs(modules=VSOCK_MODULES, binaries=VSOCK_BINARIES)
        results: list[dict[str, Any]] = []
        with (vsock_device(cfg, work) as dev,
              Guest(device_args=dev.device_args, memory_mib=cfg.memory_mib, initrd=initrd,
                    log_dir=work / "guest") as g):
            for n in cfg.connections:
                size = max(1, cfg.mib * MiB // n)
                for direction in ("guest->host", "host->guest"):
                    if progress:
                        progress(f"{direction}, {n} connection(s), {cfg.mib} MiB")
                    kw = {"to_host": n} if direction == "guest->host" else {"to_guest": n}
                    results.extend(exchange(g, dev.uds_path, size=size, **kw))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def format_table(results: list[dict[str, Any]], baseline_note: bool = True) -> str:
    lines = [f"{'direction':>12} {'conns':>5} {'MiB':>6} {'seconds':>8} {'MiB/s':>8}"]
    for r in results:
        lines.append(f"{r['direction']:>12} {r['connections']:>5} {r['mib']:>6.0f} {r['seconds']:>8.2f} "
                     f"{r['MiBps']:>8.2f}")
    if baseline_note and not kernel_baseline_available():
        lines.append("(no baseline: QEMU's vhost-vsock-pci needs the host's vhost_vsock module, "
                     "which this host does not have)")
    return "\n".join(lines)


__all__ = ["VSOCK_BINARIES", "VSOCK_MODULES", "BenchError", "VsockBenchConfig", "exchange", "format_table",
           "kernel_baseline_available", "run", "vsock_device"]
