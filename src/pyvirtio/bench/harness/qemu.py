"""Boot a real Linux guest under QEMU and run shell commands in it.

`Guest` starts `qemu-system-x86_64` (TCG: nested KVM hangs on the machines
this project runs on) with shared guest memory (`memory-backend-memfd`,
`share=on`, which vhost-user backends need), the kernel from /boot and the
initramfs from `build_initramfs`, and talks to the guest's /init over the
serial port. Devices come from the caller as QEMU arguments, built by the
helpers below, so the same guest runs with QEMU's built-in virtio-net /
virtio-blk or with a vhost-user backend (ours or anybody's):

    with NetNamespace() as ns, Guest(device_args=builtin_net_args(ns.tap),
                                     ip=ns.guest_cidr, netns=ns.name) as g:
        rc, out = g.run(f"ping -c 1 {ns.host_ip}", timeout=10)

The serial port is a unix socket that *we* listen on and QEMU connects to
as a client when it starts, so no guest output is lost and nothing has to be
polled for. Everything read from it is appended to `serial.log`; QEMU's own
stdout/stderr go to `qemu.log` (both in `Guest.log_dir`).

The QEMU process is always stopped, by its pid, when the `Guest` is closed:
on normal exit (after a `poweroff -f` in the guest), on exceptions and on
KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from pyvirtio.bench.harness.initramfs import (
    BEGIN_MARKER,
    DONE_RE,
    READY_MARKER,
    InitramfsError,
    KernelInfo,
    build_initramfs,
    extract_vmlinux,
    find_kernel,
    kernel_supports_pvh,
)
from pyvirtio.bench.harness.netns import wrap_command
from pyvirtio.bench.harness.qmp import QMP

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"

#: Kernel command line used before the caller's `append`. `mitigations=off`
#: because speculative-execution mitigations cost a lot of emulated cycles
#: per syscall under TCG and the guest is a throwaway test VM.
DEFAULT_APPEND = "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off no_timer_check tsc=reliable"

#: Longest command `Guest.run` accepts: the guest's tty line buffer is 4095 bytes.
MAX_COMMAND_BYTES = 4000


class GuestError(RuntimeError):
    """The guest or QEMU did not behave: failed to start, crashed, or broke the serial protocol."""


class GuestTimeout(GuestError, TimeoutError):
    """A boot or command did not finish in time. The guest may still be running."""


class GuestExited(GuestError):
    """QEMU exited (guest poweroff, kernel panic with panic=-1, or a QEMU error)."""


# --- QEMU argument builders ---------------------------------------------------------------------
#
# Every virtio PCI device below gets `vectors=0` by default: no MSI-X, the
# device interrupts through legacy INTx. QEMU 7.2 under TCG segfaults when a
# vhost-user device uses MSI-X (irqfd-less MSI-X notification path), so the
# vhost-user devices must use INTx, and the built-in devices get the same so
# that built-in vs vhost-user comparisons are like for like.


def qemu_escape(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's `key=value,...` option syntax (a comma is written as two)."""
    return os.fspath(value).replace(",", ",,")


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _device(driver: str, props: Mapping[str, object]) -> str:
    parts = [driver]
    for key, value in props.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = _onoff(value)
        parts.append(f"{key}={qemu_escape(str(value))}")
    return ",".join(parts)


def virtio_net_device_args(
    netdev_id: str,
    *,
    mac: str = "52:54:00:12:34:56",
    vectors0: bool = True,
    mq: int = 1,
    packed: bool = False,
    event_idx: bool = True,
    indirect_desc: bool = True,
    mrg_rxbuf: bool = True,
    csum: bool = True,
    guest_csum: bool = True,
    host_tso: bool = True,
    guest_tso: bool = True,
    rx_queue_size: int | None = None,
    tx_queue_size: int | None = None,
    extra: Mapping[str, object] | None = None,
) -> list[str]:
    """Return `-device virtio-net-pci,...` for the netdev `netdev_id`, whatever backs it.

    The flags map to the device's feature properties (the driver only sees a
    feature if the backend offers it too): `csum`/`guest_csum` are
    VIRTIO_NET_F_CSUM/GUEST_CSUM, `host_tso` is HOST_TSO4+6 (guest->host
    segmentation offload), `guest_tso` is GUEST_TSO4+6. TSO needs the
    matching checksum offload, so it is forced off without it. `mq > 1`
    enables multiqueue with that many queue pairs. `extra` adds or overrides
    properties verbatim.
    """
    if mq < 1:
        raise ValueError(f"mq must be >= 1, got {mq}")
    props: dict[str, object] = {
        "netdev": netdev_id,
        "id": f"{netdev_id}-dev",
        "mac": mac,
        "vectors": 0 if vectors0 else None,
        "mq": True if mq > 1 else None,
        "packed": packed,
        "event_idx": event_idx,
        "indirect_desc": indirect_desc,
        "mrg_rxbuf": mrg_rxbuf,
        "csum": csum,
        "guest_csum": guest_csum,
        "host_tso4": host_tso and csum,
        "host_tso6": host_tso and csum,
        "guest_tso4": guest_tso and guest_csum,
        "guest_tso6": guest_tso and guest_csum,
        "rx_queue_size": rx_queue_size,
        "tx_queue_size": tx_queue_size,
        "romfile": "",  # no iPXE option ROM: the guest boots with -kernel, the ROM only costs boot time
    }
    props.update(extra or {})
    return ["-device", _device("virtio-net-pci", props)]


def builtin_net_args(
    tap: str,
    *,
    netdev_id: str = "net0",
    mq: int = 1,
    **device: object,
) -> list[str]:
    """Return QEMU args for QEMU's built-in virtio-net on the existing TAP device `tap`.

    `-netdev tap,ifname=<tap>,script=no,downscript=no,vhost=off` (the
    userspace virtio-net in QEMU, no vhost-net kernel accelerator) plus the
    device from `virtio_net_device_args` (all its keyword flags are accepted
    here; `vectors0=True` by default, see the note above). The TAP must exist
    in the network namespace QEMU runs in, and be created `multi_queue` when
    `mq > 1`.
    """
    netdev = f"tap,id={netdev_id},ifname={qemu_escape(tap)},script=no,downscript=no,vhost=off"
    if mq > 1:
        netdev += f",queues={mq}"
    return ["-netdev", netdev, *virtio_net_device_args(netdev_id, mq=mq, **device)]  # type: ignore[arg-type]


def vhost_user_net_args(
    socket_path: str | os.PathLike[str],
    *,
    netdev_id: str = "net0",
    mq: int = 1,
    reconnect: int | None = 1,
    **device: object,
) -> list[str]:
    """Return QEMU args for a virtio-net device served by a vhost-user backend at `socket_path`.

    QEMU is the socket *client* (the backend listens); `reconnect` (seconds,
    None to disable) makes QEMU retry the connection if the backend restarts.
    The device flags are those of `virtio_net_device_args`, with
    `vectors0=True` by default: QEMU 7.2 under TCG segfaults with vhost-user
    and MSI-X, so the device must use INTx.
    """
    chardev = f"socket,id={netdev_id}-chr,path={qemu_escape(socket_path)}"
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    netdev = f"vhost-user,id={netdev_id},chardev={netdev_id}-chr"
    if mq > 1:
        netdev += f",queues={mq}"
    return [
        "-chardev",
        chardev,
        "-netdev",
        netdev,
        *virtio_net_device_args(netdev_id, mq=mq, **device),  # type: ignore[arg-type]
    ]


def builtin_blk_args(
    image: str | os.PathLike[str],
    *,
    drive_id: str = "blk0",
    fmt: str = "raw",
    cache: str = "none",
    aio: str = "threads",
    readonly: bool = False,
    vectors0: bool = True,
    num_queues: int = 1,
    packed: bool = False,
    event_idx: bool = True,
    queue_size: int | None = None,
    extra: Mapping[str, object] | None = None,
) -> list[str]:
    """Return QEMU args for QEMU's built-in virtio-blk over the image file `image`.

    `cache="none"` opens the image with O_DIRECT (what the guest wrote is on
    the host file once the guest's write completes; pass "writeback" on
    filesystems without O_DIRECT such as tmpfs). The guest sees it as
    /dev/vda (vdb, ... for later disks in argument order).
    """
    drive = (
        f"file={qemu_escape(image)},if=none,id={drive_id},format={fmt},cache={cache},aio={aio}"
        f",readonly={_onoff(readonly)}"
    )
    props: dict[str, object] = {
        "drive": drive_id,
        "id": f"{drive_id}-dev",
        "vectors": 0 if vectors0 else None,
        "num-queues": num_queues,
        "packed": packed,
        "event_idx": event_idx,
        "queue-size": queue_size,
    }
    props.update(extra or {})
    return ["-drive", drive, "-device", _device("virtio-blk-pci", props)]


def vhost_user_blk_args(
    socket_path: str | os.PathLike[str],
    *,
    chardev_id: str = "blk0-chr",
    vectors0: bool = True,
    num_queues: int = 1,
    queue_size: int | None = None,
    reconnect: int | None = 1,
    extra: Mapping[str, object] | None = None,
) -> list[str]:
    """Return QEMU args for a virtio-blk device served by a vhost-user-blk backend at `socket_path`.

    QEMU is the socket client; `vectors0=True` by default (INTx; QEMU 7.2
    under TCG segfaults with vhost-user and MSI-X).
    """
    chardev = f"socket,id={chardev_id},path={qemu_escape(socket_path)}"
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    props: dict[str, object] = {
        "chardev": chardev_id,
        "vectors": 0 if vectors0 else None,
        "num-queues": num_queues,
        "queue-size": queue_size,
    }
    props.update(extra or {})
    return ["-chardev", chardev, "-device", _device("vhost-user-blk-pci", props)]


def builtin_rng_args(
    filename: str | os.PathLike[str] = "/dev/urandom",
    *,
    object_id: str = "rng0",
    vectors0: bool = True,
    max_bytes: int | None = None,
    period_ms: int | None = None,
    extra: Mapping[str, object] | None = None,
) -> list[str]:
    """Return QEMU args for QEMU's built-in virtio-rng reading `filename`
    (`-object rng-random` + `virtio-rng-pci`).

    QEMU rate-limits it to `max-bytes` per `period` ms; its defaults
    (2^63-1 bytes per 65536 ms) mean no limit. None keeps QEMU's default.
    """
    props: dict[str, object] = {
        "rng": object_id,
        "id": f"{object_id}-dev",
        "vectors": 0 if vectors0 else None,
        "max-bytes": max_bytes,
        "period": period_ms,
    }
    props.update(extra or {})
    return ["-object", f"rng-random,id={object_id},filename={qemu_escape(filename)}",
            "-device", _device("virtio-rng-pci", props)]


def vhost_user_rng_args(
    socket_path: str | os.PathLike[str],
    *,
    chardev_id: str = "rng0-chr",
    vectors0: bool = True,
    reconnect: int | None = None,
    extra: Mapping[str, object] | None = None,
) -> list[str]:
    """Return QEMU args for a virtio-rng device served by a vhost-user back-end
    at `socket_path` (`vhost-user-rng-pci`).

    QEMU is the socket client; `vectors0=True` by default (INTx; QEMU 7.2
    under TCG segfaults with vhost-user and MSI-X).
    """
    chardev = f"socket,id={chardev_id},path={qemu_escape(socket_path)}"
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    props: dict[str, object] = {"chardev": chardev_id, "vectors": 0 if vectors0 else None}
    props.update(extra or {})
    return ["-chardev", chardev, "-device", _device("vhost-user-rng-pci", props)]


def vhost_user_vsock_args(
    socket_path: str | os.PathLike[str],
    *,
    chardev_id: str = "vsock0-chr",
    vectors0: bool = True,
    extra: Mapping[str, object] | None = None,
) -> list[str]:
    """Return QEMU args for a virtio-vsock device served by a vhost-user
    back-end at `socket_path` (`vhost-user-vsock-pci`). The guest's CID
    comes from the back-end (QEMU reads the config space with GET_CONFIG);
    QEMU serves the event queue itself. `vectors0=True` by default (INTx).
    """
    props: dict[str, object] = {"chardev": chardev_id, "vectors": 0 if vectors0 else None}
    props.update(extra or {})
    return ["-chardev", f"socket,id={chardev_id},path={qemu_escape(socket_path)}",
            "-device", _device("vhost-user-vsock-pci", props)]


def vhost_user_fs_args(
    socket_path: str | os.PathLike[str],
    *,
    tag: str,
    chardev_id: str = "fs0-chr",
    vectors0: bool = True,
    num_request_queues: int = 1,
    queue_size: int | None = None,
    reconnect: int | None = None,
    extra: Mapping[str, object] | None = None,
) -> list[str]:
    """Return QEMU args for a virtio-fs device (`vhost-user-fs-pci`) served at `socket_path`.

    The guest mounts it with `mount -t virtiofs <tag> /mnt` (QEMU 7.2 puts
    `tag` in the config space itself). `vectors0=True` by default (INTx;
    QEMU 7.2 under TCG segfaults with vhost-user and MSI-X).
    """
    chardev = f"socket,id={chardev_id},path={qemu_escape(socket_path)}"
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    props: dict[str, object] = {
        "chardev": chardev_id,
        "tag": tag,
        "vectors": 0 if vectors0 else None,
        "num-request-queues": num_request_queues,
        "queue-size": queue_size,
    }
    props.update(extra or {})
    return ["-chardev", chardev, "-device", _device("vhost-user-fs-pci", props)]


def builtin_9p_args(
    path: str | os.PathLike[str],
    *,
    tag: str,
    fsdev_id: str = "fsdev0",
    security_model: str = "none",
    vectors0: bool = True,
    extra: Mapping[str, object] | None = None,
) -> list[str]:
    """Return QEMU args for QEMU's built-in virtio-9p sharing the host directory `path`.

    The guest mounts it with `mount -t 9p -o trans=virtio,version=9p2000.L <tag> /mnt`
    (modules 9p and 9pnet_virtio). `vectors0=True` by default, like every device here.
    """
    fsdev = f"local,id={fsdev_id},path={qemu_escape(path)},security_model={security_model}"
    props: dict[str, object] = {"fsdev": fsdev_id, "mount_tag": tag, "vectors": 0 if vectors0 else None}
    props.update(extra or {})
    return ["-fsdev", fsdev, "-device", _device("virtio-9p-pci", props)]


# --- the guest ----------------------------------------------------------------------------------


class Guest:
    """One QEMU/TCG guest running the pyvirtio initramfs, driven over its serial console.

    Use as a context manager: `__enter__` starts QEMU and waits for the
    guest's control loop (`boot_timeout`), `__exit__` powers it off and always
    stops the QEMU process by pid. Outside a `with`, call `start`,
    `wait_booted` and (in a `finally`) `close` yourself.

    Arguments:
        device_args: QEMU arguments adding the devices under test (see the
            `*_args` helpers); no NIC or disk exists otherwise.
        smp, memory_mib: vCPUs and guest RAM. RAM is a shared memfd, as
            vhost-user needs.
        ip: "addr/prefix" given to the guest's eth0 (kernel arg `pyvirtio.ip`).
        kernel, initrd: default `find_kernel()` and `build_initramfs()`.
        pvh: boot the kernel's uncompressed vmlinux through QEMU's PVH entry
            (`extract_vmlinux`, cached) when the kernel supports it: halves
            the boot time under TCG. Falls back to the bzImage otherwise.
        cache_dir: cache for the initramfs and vmlinux (default ~/.cache/pyvirtio).
        append: extra kernel command line, after `DEFAULT_APPEND`.
        netns: run QEMU inside this network namespace (`ip netns exec`), so
            that a TAP device in that namespace can be opened by name.
        log_dir: where serial.log and qemu.log go; kept. By default a
            temporary directory, removed on a clean close and kept (its path
            logged as a warning) when the guest failed or the `with` body raised.
        machine, cpu, accel: QEMU `-machine` type (memory-backend is added),
            `-cpu` and `-accel`.
        extra_args: more QEMU arguments, verbatim.
        die_with_parent: start QEMU under `setpriv --pdeathsig KILL`, so the
            kernel kills it if our process dies without cleaning up (SIGKILL,
            an unhandled SIGTERM). The signal fires when the *thread* that
            called `start` exits, so start the guest from a thread that
            outlives it (the main thread, or pass False).
        qmp: give QEMU a QMP socket (in the private socket directory); `qmp()`
            returns a client connected to it.
        incoming: start QEMU as a live-migration destination (`-incoming
            <incoming>`, e.g. "defer"): it runs no guest of its own, so
            entering the `with` only starts it (no boot to wait for);
            `migration.migrate` brings the guest in and calls
            `migrated_in`, after which `run` talks to the guest that booted
            in the source. Implies `qmp`.
    """

    def __init__(
        self,
        *,
        device_args: Sequence[str] = (),
        smp: int = 1,
        memory_mib: int = 512,
        ip: str | None = None,
        append: str = "",
        netns: str | None = None,
        kernel: KernelInfo | None = None,
        initrd: Path | None = None,
        pvh: bool = True,
        cache_dir: Path | None = None,
        log_dir: Path | None = None,
        machine: str = "q35",
        cpu: str = "max",
        accel: str = "tcg",
        qemu_binary: str = QEMU_BINARY,
        boot_timeout: float = 120.0,
        extra_args: Sequence[str] = (),
        die_with_parent: bool = True,
        qmp: bool = False,
        incoming: str | None = None,
    ) -> None:
        if smp < 1 or memory_mib < 64:
            raise ValueError("smp must be >= 1 and memory_mib >= 64")
        if ip is not None and (" " in ip or "/" not in ip):
            raise ValueError(f"ip must look like 10.0.2.15/24, got {ip!r}")
        self.device_args = list(device_args)
        self.smp = smp
        self.memory_mib = memory_mib
        self.ip = ip
        self.append = append
        self.netns = netns
        self.kernel = kernel
        self.initrd = initrd
        self.pvh = pvh
        self.cache_dir = cache_dir
        self.machine = machine
        self.cpu = cpu
        self.accel = accel
        self.qemu_binary = qemu_binary
        self.boot_timeout = boot_timeout
        self.extra_args = list(extra_args)
        self.die_with_parent = die_with_parent
        self.incoming = incoming
        self.want_qmp = qmp or incoming is not None
        self._user_log_dir = log_dir
        self.log_dir: Path | None = log_dir
        self.boot_seconds: float | None = None

        self._proc: subprocess.Popen[bytes] | None = None
        self._sock_dir: str | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._serial_log: Path | None = None
        self._qemu_log: Path | None = None
        self._cond = threading.Condition()
        self._lines: list[str] = []  # complete serial lines, '\r' stripped
        self._cursor = 0  # index of the first line not yet consumed by run()/wait_booted()
        self._eof = False
        self._booted = False
        self._failed = False  # set on boot/protocol failure: skip graceful poweroff, keep logs
        self._keep_logs = False
        self._ids = itertools.count(1)
        self._t_start = 0.0
        self._qmp_path: str | None = None
        self._qmp: QMP | None = None
        self._migrated_out = False  # the guest now runs elsewhere: this QEMU is paused for good

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The QEMU process id (None before `start`)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def qmp_path(self) -> str | None:
        """The QMP socket (None without `qmp=True` or before `start`)."""
        return self._qmp_path

    def qmp(self) -> QMP:
        """The QMP client of this QEMU, connected on first use and closed by `close`
        (QEMU serves one QMP client at a time on a socket)."""
        if self._qmp_path is None:
            raise GuestError("this guest has no QMP socket (Guest(qmp=True)) or is not started")
        if self._qmp is None:
            self._qmp = QMP(self._qmp_path)
        return self._qmp

    @property
    def booted(self) -> bool:
        """Whether `run` may be used: the guest booted here, or migrated in."""
        return self._booted

    def migrated_in(self) -> None:
        """The guest now runs in this (destination) QEMU: `run` talks to it.
        Called by `migration.migrate` once the migration completed."""
        if self.incoming is None:
            raise GuestError("not a migration destination (Guest(incoming=...))")
        with self._cond:
            self._booted = True
            self.boot_seconds = 0.0

    def migrated_out(self) -> None:
        """The guest left this (source) QEMU, which stays paused: `close` stops
        it without asking the guest to power off (it would never answer)."""
        self._migrated_out = True

    @property
    def serial_log(self) -> Path | None:
        """The file receiving everything the guest printed on its serial console."""
        return self._serial_log

    def _kernel_image(self, kernel: KernelInfo) -> Path:
        with open(kernel.image, "rb") as f:
            if f.read(4) == b"\x7fELF" or not self.pvh:
                return kernel.image
        if not kernel_supports_pvh(kernel):
            log.info("kernel %s has no PVH entry; booting the bzImage", kernel.version)
            return kernel.image
        try:
            return extract_vmlinux(kernel, self.cache_dir)
        except InitramfsError as e:
            log.info("booting the bzImage: %s", e)
            return kernel.image

    def command_line(self, serial_socket: str, kernel_image: Path, initrd: Path) -> list[str]:
        """Return the full QEMU argv (including the `ip netns exec` prefix when `netns` is set)."""
        append = DEFAULT_APPEND
        if self.ip:
            append += f" pyvirtio.ip={self.ip}"
        if self.append:
            append += " " + self.append
        # fmt: off
        argv = [
            self.qemu_binary,
            "-name", "pyvirtio-guest,debug-threads=on",  # vCPU threads named "CPU n/TCG" (CPU accounting)
            "-accel", self.accel,
            "-machine", f"{self.machine},memory-backend=mem",
            "-cpu", self.cpu,
            "-smp", str(self.smp),
            "-m", f"{self.memory_mib}M",
            "-object", f"memory-backend-memfd,id=mem,size={self.memory_mib}M,share=on",
            "-nographic", "-nodefaults", "-no-user-config", "-no-reboot",
            "-monitor", "none",
            "-chardev", f"socket,id=serial0,path={qemu_escape(serial_socket)}",
            "-serial", "chardev:serial0",
            "-kernel", str(kernel_image),
            "-initrd", str(initrd),
            "-append", append,
            *self.device_args,
            *self.extra_args,
        ]
        if self._qmp_path is not None:
            argv += ["-qmp", f"unix:{qemu_escape(self._qmp_path)},server=on,wait=off"]
        if self.incoming is not None:
            argv += ["-incoming", self.incoming]
        # fmt: on
        return wrap_command(argv, netns=self.netns, die_with_parent=self.die_with_parent)

    def start(self) -> None:
        """Start QEMU and accept its serial connection. Does not wait for the guest to boot.

        On failure QEMU is stopped again and `GuestError` is raised.
        """
        if self._proc is not None:
            raise GuestError("guest already started")
        kernel = self.kernel or find_kernel()
        initrd = self.initrd or build_initramfs(self.cache_dir, kernel=kernel)
        kernel_image = self._kernel_image(kernel)
        try:
            self._spawn(kernel_image, initrd)
        except BaseException:
            self._failed = True
            self.close()
            raise

    def _spawn(self, kernel_image: Path, initrd: Path) -> None:
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="pyvirtio-guest-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._serial_log = self.log_dir / "serial.log"
        self._qemu_log = self.log_dir / "qemu.log"
        self._serial_log.write_bytes(b"")
        # A short private directory: unix socket paths are limited to 107 bytes.
        self._sock_dir = tempfile.mkdtemp(prefix="pvg-")
        sock_path = os.path.join(self._sock_dir, "serial.sock")
        if self.want_qmp:
            self._qmp_path = os.path.join(self._sock_dir, "qmp.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener = listener
        listener.bind(sock_path)
        listener.listen(1)
        argv = self.command_line(sock_path, kernel_image, initrd)
        log.info("starting guest: %s", " ".join(argv))
        self._t_start = time.monotonic()
        with open(self._qemu_log, "wb") as qlog:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT, start_new_session=True
            )
        log.debug("qemu pid %d, logs in %s", self._proc.pid, self.log_dir)
        self._conn = self._accept_serial(listener, deadline=time.monotonic() + 30.0)
        self._reader = threading.Thread(
            target=self._read_serial, name=f"guest-serial-{self._proc.pid}", daemon=True
        )
        self._reader.start()

    def _accept_serial(self, listener: socket.socket, deadline: float) -> socket.socket:
        assert self._proc is not None
        listener.settimeout(0.2)
        while True:
            try:
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            except TimeoutError:
                pass
            if self._proc.poll() is not None:
                raise GuestExited(
                    f"qemu exited with status {self._proc.returncode} before connecting "
                    f"its serial port:\n{self._tail(self._qemu_log)}"
                )
            if time.monotonic() > deadline:
                raise GuestTimeout("qemu did not connect its serial port within 30 s")

    def _read_serial(self) -> None:
        """Reader thread: append serial bytes to serial.log and split them into lines."""
        assert self._conn is not None and self._serial_log is not None
        partial = b""
        with open(self._serial_log, "ab", buffering=0) as out:
            while True:
                try:
                    data = self._conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                out.write(data)
                partial += data
                *complete, partial = partial.split(b"\n")
                if complete:
                    text = [c.decode("utf-8", "replace").replace("\r", "") for c in complete]
                    with self._cond:
                        self._lines.extend(text)
                        self._cond.notify_all()
        with self._cond:
            if partial:
                self._lines.append(partial.decode("utf-8", "replace").replace("\r", ""))
            self._eof = True
            self._cond.notify_all()

    def wait_booted(self, timeout: float | None = None) -> float:
        """Wait until the guest's control loop is ready; return the boot time in seconds.

        The boot time counts from QEMU's start to the ready marker. Raises
        `GuestTimeout` after `timeout` (default `boot_timeout`) and
        `GuestExited` if QEMU exits or the kernel panics first.
        """
        if self._booted:
            assert self.boot_seconds is not None
            return self.boot_seconds
        if self._proc is None:
            raise GuestError("guest not started")
        deadline = time.monotonic() + (self.boot_timeout if timeout is None else timeout)
        with self._cond:
            while True:
                while self._cursor < len(self._lines):
                    line = self._lines[self._cursor]
                    self._cursor += 1
                    if READY_MARKER in line:
                        self._booted = True
                        self.boot_seconds = time.monotonic() - self._t_start
                        log.info("guest booted in %.2f s", self.boot_seconds)
                        return self.boot_seconds
                    if "Kernel panic" in line:
                        self._failed = True
                        raise GuestExited(f"guest kernel panic:\n{self._tail(self._serial_log)}")
                self._wait_locked(deadline, "boot")

    def _wait_locked(self, deadline: float, what: str) -> None:
        """With `_cond` held: wait for more serial lines; raise if QEMU is gone or time is up."""
        if self._eof or (self._proc is not None and self._proc.poll() is not None):
            self._failed = True
            status = self._proc.poll() if self._proc is not None else None
            raise GuestExited(
                f"qemu exited (status {status}) during {what}:\n"
                f"{self._tail(self._qemu_log)}\n{self._tail(self._serial_log)}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if what == "boot":
                self._failed = True
            raise GuestTimeout(f"guest {what} timed out:\n{self._tail(self._serial_log)}")
        self._cond.wait(min(remaining, 0.5))

    def run(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run a shell command in the guest; return (exit status, combined stdout+stderr).

        The command runs in a subshell of the guest's init shell, with stdin
        from /dev/null; it must be one line of at most `MAX_COMMAND_BYTES`
        without control characters (the guest reads it through a tty).
        Output lines lose their trailing newline and are joined with "\\n".
        Raises `GuestTimeout` if the command does not finish in `timeout`
        seconds (it keeps running in the guest; later commands queue behind
        it and their output is still matched correctly), `GuestExited` if
        QEMU exits.
        """
        if any(ord(c) < 0x20 and c != "\t" for c in cmd) or "\x7f" in cmd:
            raise ValueError("guest commands must be one line without control characters (tty specials)")
        if len(cmd.encode()) > MAX_COMMAND_BYTES:
            raise ValueError(f"guest command longer than {MAX_COMMAND_BYTES} bytes")
        if not self._booted:
            raise GuestError("guest not booted (call wait_booted first, or migrate it in)")
        assert self._conn is not None
        cid = f"c{next(self._ids)}"
        begin = BEGIN_MARKER.format(id=cid)
        log.debug("guest run [%s]: %s", cid, cmd)
        self._conn.sendall(f"{cid} {cmd}\n".encode())
        deadline = time.monotonic() + timeout
        output: list[str] = []
        started = False
        with self._cond:
            while True:
                while self._cursor < len(self._lines):
                    line = self._lines[self._cursor]
                    self._cursor += 1
                    if not started:
                        started = line == begin
                        continue
                    m = DONE_RE.search(line)
                    if m and m.group(1) == cid:
                        if m.start() > 0:
                            output.append(line[: m.start()])  # last output line had no newline
                        rc = int(m.group(2))
                        log.debug("guest run [%s] -> %d", cid, rc)
                        return rc, "\n".join(output)
                    output.append(line)
                self._wait_locked(deadline, f"command {cmd!r}")

    def check(self, cmd: str, timeout: float = 30.0) -> str:
        """Like `run`, but raise `GuestError` (with the output) unless the exit status is 0."""
        rc, out = self.run(cmd, timeout)
        if rc != 0:
            raise GuestError(f"guest command {cmd!r} exited with {rc}:\n{out}")
        return out

    def shutdown(self, timeout: float = 10.0) -> None:
        """Power the guest off (`poweroff -f`) and wait for QEMU to exit; kill it if it does not.

        Idempotent; safe to call on a guest that never booted.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        if self._booted and self._conn is not None and not self._migrated_out:
            with contextlib.suppress(OSError):
                self._conn.sendall(b"off poweroff -f\n")
            try:
                proc.wait(timeout)
                log.debug("qemu %d exited with %s", proc.pid, proc.returncode)
                return
            except subprocess.TimeoutExpired:
                log.warning("guest did not power off within %.0f s; killing qemu %d", timeout, proc.pid)
        self._kill()

    def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue
        raise GuestError(f"qemu pid {proc.pid} survived SIGKILL")

    def close(self) -> None:
        """Stop the guest: graceful poweroff if it is booted, then SIGTERM/SIGKILL by pid.

        Always leaves no QEMU process behind (or raises `GuestError` if the
        kernel refuses to kill it). Closes the serial socket and removes
        temporary files; a temporary log directory is kept if the guest failed.
        """
        try:
            try:
                if not self._failed:
                    self.shutdown()
            finally:
                self._kill()
        finally:
            if self._qmp is not None:
                with contextlib.suppress(OSError):
                    self._qmp.close()
                self._qmp = None
            for s in (self._conn, self._listener):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                    s.close()
            self._conn = self._listener = None
            if self._reader is not None:
                self._reader.join(5.0)
                self._reader = None
            if self._sock_dir is not None:
                shutil.rmtree(self._sock_dir, ignore_errors=True)
                self._sock_dir = None
            if self._user_log_dir is None and self.log_dir is not None:
                if self._failed or self._keep_logs:
                    log.warning("guest logs kept in %s", self.log_dir)
                else:
                    shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
            if self.incoming is None:
                self.wait_booted()
        except BaseException:
            self._failed = True
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._keep_logs = True  # whatever went wrong, the serial log may explain it
            if issubclass(exc_type, KeyboardInterrupt):
                self._failed = True  # the user wants out now: no graceful poweroff
        self.close()

    @staticmethod
    def _tail(path: Path | None, lines: int = 30) -> str:
        if path is None or not path.exists():
            return ""
        text = path.read_text(errors="replace").replace("\r", "")
        return "\n".join(text.splitlines()[-lines:])
