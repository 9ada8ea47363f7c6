"""Guest entropy benchmark: the same Linux 6.1 guest (QEMU 7.2, TCG) reads
/dev/hwrng, once per virtio-rng back-end, in one run:

- `pyvirtio`: `pyvirtio rng --source /dev/urandom` through `vhost-user-rng-pci`;
- `builtin`: QEMU's own `virtio-rng-pci` on `-object rng-random,filename=/dev/urandom`,
  with QEMU's default rate limit (`max-bytes` 2^63-1 per `period` 65536 ms: none).

Both devices use `vectors=0` (INTx). The guest's driver (virtio_rng) asks
for 64 bytes per request (one cache line), one request at a time, so this
measures the round trip of a request more than the copying. The time comes
from the guest's /proc/uptime around `dd if=/dev/hwrng` (10 ms ticks: read
enough for a second or more). With `rounds` > 1 the targets are cycled and
the best rate of each is kept.

`run(cfg)` returns one result per target; `format_table` prints them with
the ratio to QEMU's built-in device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyvirtio.bench.harness.initramfs import DEFAULT_MODULES
from pyvirtio.bench.procs import BenchError, stop_process, wait_socket

TARGETS = ("pyvirtio", "builtin")
#: the guest modules for virtio-rng (rng-core is built into Debian's 6.1 kernel)
RNG_MODULES = (*DEFAULT_MODULES, "virtio_rng")


@dataclasses.dataclass(slots=True)
class RngBenchConfig:
    targets: tuple[str, ...] = TARGETS
    #: KiB the guest reads from /dev/hwrng per measurement
    kib: int = 1024
    rounds: int = 1
    source: str = "/dev/urandom"
    memory_mib: int = 256
    work_dir: Path | None = None
    #: extra arguments for our back-end (e.g. ["--policy", "eager"])
    pyvirtio_args: tuple[str, ...] = ()



@contextlib.contextmanager
def rng_device(target: str, cfg: RngBenchConfig, work: Path) -> Iterator[tuple[list[str], int | None]]:
    """Start the target's back-end (if it has one); yield QEMU's device
    arguments and the back-end's pid (None: in QEMU). Stopped by pid on exit."""
    from pyvirtio.bench.harness import builtin_rng_args, vhost_user_rng_args

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r} (one of {', '.join(TARGETS)})")
    if target == "builtin":
        yield builtin_rng_args(cfg.source), None
        return
    # (a unix socket path is at most 107 bytes: sockets go under /tmp, whatever the work directory)
    sock_dir = Path(tempfile.mkdtemp(prefix="pyvirtio-rngbench-"))
    sock = sock_dir / "rng.sock"
    log_path = work / f"{target}.log"
    argv = [sys.executable, "-m", "pyvirtio", "rng", "--socket-path", str(sock), "--source", cfg.source,
            *cfg.pyvirtio_args]
    with open(log_path, "wb") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_socket(proc, sock, "pyvirtio rng", log_path)
        yield vhost_user_rng_args(sock), proc.pid
    finally:
        stop_process(proc)
        shutil.rmtree(sock_dir, ignore_errors=True)


def read_hwrng(guest: Any, nbytes: int, out: str = "/dev/null", timeout: float = 600) -> float:
    """Seconds the guest takes to read `nbytes` from /dev/hwrng into `out`
    (its /proc/uptime around the `dd`); raises if it got fewer bytes."""
    bs = 4096 if nbytes % 4096 == 0 else 1
    count = nbytes // bs
    cmd = (f"a=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/hwrng of={out} bs={bs} count={count} "
           "iflag=fullblock 2>/tmp/dd.err || { cat /tmp/dd.err; exit 1; }; b=$(cut -d' ' -f1 /proc/uptime); "
           "echo $a $b; grep 'records out' /tmp/dd.err")
    lines = guest.check(cmd, timeout=timeout).splitlines()
    a, b = lines[-2].split()
    if not lines[-1].startswith(f"{count}+0 records out"):  # busybox dd: full+partial blocks
        raise BenchError(f"the guest read {lines[-1]!r} from /dev/hwrng, not {count} blocks of {bs} bytes")
    return max(0.01, float(b) - float(a))


def _measure(target: str, cfg: RngBenchConfig, work: Path) -> dict[str, Any]:
    from pyvirtio.bench.harness import Guest, build_initramfs

    initrd = build_initramfs(modules=RNG_MODULES)
    with (rng_device(target, cfg, work) as (device_args, _pid),
          Guest(device_args=device_args, memory_mib=cfg.memory_mib, initrd=initrd, log_dir=work / target) as g):
        current = g.check("cat /sys/class/misc/hw_random/rng_current")
        if not current.startswith("virtio_rng"):
            raise BenchError(f"{target}: the guest's current hwrng is {current!r}, not virtio_rng")
        seconds = read_hwrng(g, cfg.kib * 1024)
    return {"target": target, "hwrng": current, "kib": cfg.kib, "seconds": seconds, "KiBps": cfg.kib / seconds}


def run(cfg: RngBenchConfig, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every target `cfg.rounds` times; the best rate per target."""
    work = Path(tempfile.mkdtemp(prefix="pyvirtio-rngbench-", dir=cfg.work_dir))
    try:
        samples: dict[str, list[dict[str, Any]]] = {t: [] for t in cfg.targets}
        for rnd in range(cfg.rounds):
            for t in cfg.targets:
                if progress:
                    progress(f"round {rnd + 1}/{cfg.rounds}: {t}, {cfg.kib} KiB from /dev/hwrng")
                samples[t].append(_measure(t, cfg, work))
        return [{**max(s, key=lambda x: x["KiBps"]), "rounds": len(s), "samples": s} for s in samples.values()]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def format_table(results: list[dict[str, Any]], reference: str = "builtin") -> str:
    ref = next((r for r in results if r["target"] == reference), None)
    head = f"{'target':>10} {'guest hwrng':>12} {'KiB':>7} {'seconds':>8} {'KiB/s':>8}"
    if ref:
        head += f" {'x' + reference:>9}"
    lines = [head]
    for r in results:
        line = f"{r['target']:>10} {r['hwrng']:>12} {r['kib']:>7} {r['seconds']:>8.2f} {r['KiBps']:>8.1f}"
        if ref:
            line += f" {r['KiBps'] / ref['KiBps']:>9.2f}"
        lines.append(line)
    return "\n".join(lines)


__all__ = ["RNG_MODULES", "TARGETS", "BenchError", "RngBenchConfig", "format_table", "read_hwrng", "rng_device",
           "run"]
