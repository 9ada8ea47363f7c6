"""Live-migrate a test guest from one QEMU to another on this host.

    src = Guest(device_args=..., qmp=True, append="init_on_alloc=0")
    with src:
        ...                                   # the guest boots and starts working
        dst = destination(src, device_args=...)   # same guest, its own devices' sockets
        with dst:                             # QEMU -incoming defer: no boot
            result = migrate(src, dst)        # over a unix socket, polled until done
            dst.run("...")                    # the guest, now running in dst

`destination` builds a `Guest` with the source's command line (CPU, RAM,
kernel, initramfs, kernel arguments, extra arguments) and the caller's
device arguments, started with `-incoming defer`, its own serial console
and QMP socket. `migrate` tells the destination to listen
(`migrate-incoming unix:...`, a socket in a private temporary directory,
removed afterwards), the source to `migrate` there, and polls
`query-migrate` until it says `completed`; `failed` or `cancelled` raise
`MigrationError` with QEMU's reason, a timeout cancels the migration first.
On success the destination is marked running (`Guest.migrated_in`: its
`run` talks to the guest that booted in the source) and the source as left
(`Guest.migrated_out`: closing it does not wait for a poweroff).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pyvirtio.bench.harness.initramfs import build_initramfs, find_kernel
from pyvirtio.bench.harness.qemu import Guest, GuestError
from pyvirtio.bench.harness.qmp import QMPError

log = logging.getLogger(__name__)


class MigrationError(GuestError):
    """The migration failed, was cancelled or did not finish in time."""


@dataclasses.dataclass(slots=True, frozen=True)
class MigrationResult:
    """What `query-migrate` said when the migration completed (times in ms, sizes in bytes)."""

    total_time_ms: int
    downtime_ms: int
    setup_time_ms: int
    transferred: int  #: RAM bytes sent
    dirty_sync_count: int  #: dirty-bitmap syncs: how many RAM passes QEMU made
    normal_pages: int  #: non-zero pages sent (every pass)
    zero_pages: int  #: zero pages sent as markers
    wall_ms: int  #: our own clock, `migrate` to `completed` seen
    raw: dict[str, Any]

    @classmethod
    def from_query(cls, info: Mapping[str, Any], wall_ms: int) -> MigrationResult:
        ram = info.get("ram", {})
        return cls(
            total_time_ms=int(info.get("total-time", 0)),
            downtime_ms=int(info.get("downtime", 0)),
            setup_time_ms=int(info.get("setup-time", 0)),
            transferred=int(ram.get("transferred", 0)),
            dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
            normal_pages=int(ram.get("normal", 0)),
            zero_pages=int(ram.get("duplicate", 0)),
            wall_ms=wall_ms,
            raw=dict(info),
        )


def destination(source: Guest, *, device_args: Sequence[str], log_dir: Any = None, paused: bool = False,
                **overrides: Any) -> Guest:
    """A `Guest` ready to receive `source` by live migration: the same machine,
    memory, kernel, initramfs and kernel command line, `device_args` (the same
    devices as the source's, each on its own back-end socket or image access),
    its own serial console and QMP socket, started with `-incoming defer`.
    `paused`: the guest stays paused once it is in (QEMU `-S`), e.g. for
    `ram_diff`; QMP `cont` runs it. `overrides` replace any other `Guest`
    argument."""
    kernel = source.kernel or find_kernel()
    initrd = source.initrd or build_initramfs(source.cache_dir, kernel=kernel)  # cached: the source's own
    kwargs: dict[str, Any] = {
        "device_args": device_args,
        "smp": source.smp,
        "memory_mib": source.memory_mib,
        "ip": source.ip,
        "append": source.append,
        "netns": source.netns,
        "kernel": kernel,
        "initrd": initrd,
        "pvh": source.pvh,
        "cache_dir": source.cache_dir,
        "log_dir": log_dir,
        "machine": source.machine,
        "cpu": source.cpu,
        "accel": source.accel,
        "qemu_binary": source.qemu_binary,
        "extra_args": [*source.extra_args, *(["-S"] if paused else [])],
        "die_with_parent": source.die_with_parent,
        "qmp": True,
        "incoming": "defer",
    }
    kwargs.update(overrides)
    return Guest(**kwargs)


def migrate(
    source: Guest,
    dest: Guest,
    *,
    max_bandwidth: int | None = None,
    downtime_limit_ms: int | None = None,
    timeout: float = 180.0,
    poll: float = 0.05,
) -> MigrationResult:
    """Live-migrate the guest running in `source` into `dest` (started with
    `incoming="defer"`) over a unix socket; return the migration's numbers.

    `max_bandwidth` (bytes/s) and `downtime_limit_ms` are set on the source
    first when given (QEMU's defaults otherwise). Raises `MigrationError` if
    QEMU reports the migration failed or cancelled, or after `timeout`
    seconds (the migration is cancelled then, the guest stays in the source).
    """
    if dest.incoming is None:
        raise MigrationError("the destination was not started with incoming=...")
    if not source.booted:
        raise MigrationError("the source guest is not running")
    sqmp, dqmp = source.qmp(), dest.qmp()
    params: dict[str, Any] = {}
    if max_bandwidth is not None:
        params["max-bandwidth"] = int(max_bandwidth)
    if downtime_limit_ms is not None:
        params["downtime-limit"] = int(downtime_limit_ms)
    if params:
        sqmp.command("migrate-set-parameters", **params)
    # A short private directory: unix socket paths are limited to 107 bytes.
    sock_dir = tempfile.mkdtemp(prefix="pvm-")
    try:
        uri = f"unix:{sock_dir}/migrate.sock"
        t0 = time.monotonic()
        try:
            dqmp.command("migrate-incoming", uri=uri)
            sqmp.command("migrate", uri=uri)
        except QMPError as e:  # e.g. a device that puts a migration blocker on the VM
            raise MigrationError(f"QEMU refused to migrate: {e}") from e
        deadline = t0 + timeout
        while True:
            info = sqmp.command("query-migrate")
            status = info.get("status")
            if status == "completed":
                wall_ms = int((time.monotonic() - t0) * 1000)
                break
            if status in ("failed", "cancelled"):
                raise MigrationError(f"migration {status}: {info.get('error-desc', info)}")
            if time.monotonic() > deadline:
                with contextlib.suppress(QMPError, OSError):
                    sqmp.command("migrate_cancel")
                raise MigrationError(f"migration not completed after {timeout:.0f} s: {info}")
            time.sleep(poll)
        # The destination resumes the guest by itself once the stream is in (unless started with -S:
        # then it stays paused, e.g. to compare its RAM with the source's).
        deadline = time.monotonic() + 30.0
        paused = "-S" in dest.extra_args
        while True:
            st = dqmp.command("query-status")
            if st.get("running") or (paused and st.get("status") == "paused"):
                break
            if time.monotonic() > deadline or st.get("status") not in ("inmigrate", "paused", "prelaunch"):
                raise MigrationError(f"the destination did not resume the guest: {st}")
            time.sleep(poll)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    result = MigrationResult.from_query(info, wall_ms)
    log.info("migration completed: total %d ms, downtime %d ms, %d passes, %d MiB",
             result.total_time_ms, result.downtime_ms, result.dirty_sync_count, result.transferred >> 20)
    source.migrated_out()
    dest.migrated_in()
    return result


def ram_diff(source: Guest, dest: Guest, work_dir: str | os.PathLike[str]) -> list[int]:
    """Guest-physical addresses of the 4 KiB pages whose contents differ between
    the source (stopped after the migration) and a destination that has not run
    yet (`destination(..., paused=True)`). An exact migration differs nowhere; a
    device write that reached the source's RAM after QEMU copied the page, and
    was never logged, differs.

    Both guests' RAM is read from their shared memory files (the
    `memory-backend-memfd` each QEMU holds, reached through /proc/PID/fd):
    under a second for 512 MiB, so the stopped guest is not held long enough
    for the peers of its TCP connections to back off (QMP `pmemsave` of both
    takes about 8 s here, after which a host-to-guest stream's retransmission
    timer is ~7 s and the stream cannot resume within seconds of `cont`).
    `pmemsave` into files under `work_dir` stays the fallback when a QEMU holds
    no such file (another memory backend)."""
    size = source.memory_mib << 20
    files: list[str] = []
    dumped: list[str] = []
    try:
        for guest, name in (source, "src"), (dest, "dst"):
            path = _ram_file(guest, size)
            if path is None:
                log.info("%s: no memory-backend-memfd of %d bytes found: RAM dumped with pmemsave", name, size)
                path = os.path.join(work_dir, f"ram-{name}.bin")
                guest.qmp().command("pmemsave", val=0, size=size, filename=path)
                dumped.append(path)
            files.append(path)
        diff: list[int] = []
        chunk = 64 << 20
        with open(files[0], "rb") as a, open(files[1], "rb") as b:
            for base in range(0, size, chunk):
                x, y = os.pread(a.fileno(), chunk, base), os.pread(b.fileno(), chunk, base)
                if x != y:
                    diff += [base + i for i in range(0, len(x), 4096) if x[i:i + 4096] != y[i:i + 4096]]
        return diff
    finally:
        for path in dumped:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


#: QEMU names the memfd of `-object memory-backend-memfd` after the type.
_RAM_MEMFD = "/memfd:memory-backend-memfd"


def _ram_file(guest: Guest, size: int) -> str | None:
    """/proc/PID/fd/N of the guest's RAM (the memfd of its `-object
    memory-backend-memfd`, of the guest's RAM size), or None."""
    pid = guest.pid
    if pid is None:
        return None
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return None
    for fd in names:
        path = os.path.join(fds, fd)
        try:
            if os.readlink(path).startswith(_RAM_MEMFD) and os.stat(path).st_size == size:
                return path
        except OSError:
            continue
    return None


__all__ = ["MigrationError", "MigrationResult", "destination", "migrate", "ram_diff"]
