"""Guest block benchmark: the same Linux 6.1 guest (QEMU 7.2, TCG) and the
same image file behind each disk, one after the other in one run:

- `pyvirtio-lazy`, `pyvirtio-eager`: our back-end (`pyvirtio blk`) with the
  two notification policies, through `vhost-user-blk-pci`;
  `pyvirtio-lazy-pure` (`-eager-pure`): the same on the pure-Python ring
  engine (PYVIRTIO_PURE=1), run beside the compiled one by default when
  the engine is compiled, to show what compiling bought;
- `qsd`: `qemu-storage-daemon --export vhost-user-blk`, the reference
  vhost-user-blk back-end, through `vhost-user-blk-pci`;
- `builtin`: QEMU's own virtio-blk (`virtio-blk-pci`, `aio=threads`).

Every disk uses the host page cache (ours without --direct, qsd
`cache.direct=off`, built-in `cache=writeback`), one queue of
`queue_size` entries, `vectors=0` (INTx). In the guest, with `dd`:
sequential write (`oflag=direct`, 1 MiB blocks; the closing `sync` is not timed),
sequential read (`iflag=direct`, 1 MiB; `read_passes` times over the
image), and 4 KiB direct reads one at a time (the per-request cost). Times
come from the guest's /proc/uptime around each `dd` (10 ms ticks: every
test runs for a second or more). With `rounds` > 1 the targets are cycled that many times
and the best of each metric is kept (the machine is shared and noisy).

The host CPU each disk back-end spends is read around every test (all the
back-end process's threads, those that ended included; for `builtin`,
QEMU's threads other than the vCPUs): the table shows it per MiB read and
per 4 KiB request, which is where a Python back-end pays for being Python.

The `ring` column is the ring layout the guest's driver negotiated:
qemu-storage-daemon 7.2 offers no packed ring, so with `ring="packed"` it
still runs split.

`run(cfg)` returns one result per target; `format_table` prints them with
ratios to qemu-storage-daemon.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyvirtio._engine import PURE_ENV
from pyvirtio.bench.procs import BenchError, stop_process, wait_socket

log = logging.getLogger(__name__)

TARGETS = ("pyvirtio-lazy", "pyvirtio-eager", "pyvirtio-lazy-pure", "pyvirtio-eager-pure", "builtin", "qsd")
MiB = 1 << 20


@dataclasses.dataclass(slots=True)
class BlkBenchConfig:
    targets: tuple[str, ...] = TARGETS
    image_mib: int = 512
    write_mib: int = 512
    read_mib: int = 512
    #: the sequential read goes over the first `read_mib` MiB this many times
    read_passes: int = 4
    read4k_count: int = 10000
    rounds: int = 1
    queue_size: int = 128
    ring: str = "split"
    io_threads: int = 4
    smp: int = 1
    memory_mib: int = 512
    work_dir: Path | None = None
    #: extra arguments for our back-end (e.g. ["--direct"])
    pyvirtio_args: tuple[str, ...] = ()



def _backend_cpu(pid: int | None, qemu_pid: int | None) -> float:
    """The disk back-end's CPU seconds so far: its process, or (built-in
    disk, `pid` None) QEMU's threads other than the vCPUs."""
    from pyvirtio.bench.guest import is_vcpu_thread, process_cpu_seconds, thread_cpu_seconds

    if pid is not None:
        return process_cpu_seconds(pid)
    vcpus = sum(v for k, v in thread_cpu_seconds(qemu_pid).items() if is_vcpu_thread(k))
    return process_cpu_seconds(qemu_pid) - vcpus


@contextlib.contextmanager
def _disk(target: str, cfg: BlkBenchConfig, image: Path, work: Path) -> Iterator[tuple[list[str], int | None]]:
    """Start the target's back-end (if it has one); yield QEMU's device
    arguments and the back-end's pid (None: in QEMU)."""
    from pyvirtio.bench.harness import builtin_blk_args, vhost_user_blk_args

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r} (one of {', '.join(TARGETS)})")
    qs = cfg.queue_size
    packed = cfg.ring == "packed"
    if target == "builtin":
        yield builtin_blk_args(image, cache="writeback", aio="threads", queue_size=qs, packed=packed), None
        return
    qsd = shutil.which("qemu-storage-daemon") or ""
    if target == "qsd" and not qsd:
        raise BenchError("qemu-storage-daemon is not installed (Debian package qemu-system-x86 / qemu-utils)")
    # (a unix socket path is at most 107 bytes: sockets go under /tmp, whatever the work directory)
    sock = Path(tempfile.mkdtemp(prefix="pyvirtio-blkbench-")) / f"{target}.sock"
    log_path = work / f"{target}.log"
    env = None
    if target.startswith("pyvirtio-"):
        policy = target.removeprefix("pyvirtio-").removesuffix("-pure")
        env = dict(os.environ)
        if target.endswith("-pure"):
            env[PURE_ENV] = "1"
        else:
            env.pop(PURE_ENV, None)
        argv = [sys.executable, "-m", "pyvirtio", "blk", "--socket-path", str(sock), "--blk-file", str(image),
                "--policy", policy, "--queues", str(max(1, cfg.smp)), "--io-threads", str(cfg.io_threads),
                "--seg-max", str(qs - 2), *cfg.pyvirtio_args]
    else:
        argv = [qsd, "--blockdev", f"driver=file,node-name=f,filename={image},cache.direct=off",
                "--export", (f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
                             f"writable=on,num-queues={max(1, cfg.smp)}")]
    with open(log_path, "wb") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        wait_socket(proc, sock, target, log_path)
        yield (vhost_user_blk_args(sock, num_queues=max(1, cfg.smp), queue_size=qs, reconnect=None,
                                   extra={"packed": True} if packed else None), proc.pid)
    finally:
        stop_process(proc)
        shutil.rmtree(sock.parent, ignore_errors=True)


def _timed(guest: Any, cmd: str, timeout: float) -> float:
    """Seconds `cmd` took in the guest (its /proc/uptime around it)."""
    out = guest.check(f"a=$(cut -d' ' -f1 /proc/uptime); {cmd} || exit 1; b=$(cut -d' ' -f1 /proc/uptime); "
                      "echo $a $b", timeout=timeout)
    a, b = out.split()[-2:]
    return max(0.01, float(b) - float(a))


def _measure(target: str, cfg: BlkBenchConfig, image: Path, work: Path) -> dict[str, Any]:
    from pyvirtio.bench.harness import Guest

    with (_disk(target, cfg, image, work) as (device_args, pid),
          Guest(device_args=device_args, smp=cfg.smp, memory_mib=cfg.memory_mib, log_dir=work / target) as g):
        def cpu() -> float:
            return _backend_cpu(pid, g.pid)

        max_seg = int(g.check("cat /sys/block/vda/queue/max_segments"))
        max_kb = int(g.check("cat /sys/block/vda/queue/max_sectors_kb"))
        # what the guest's driver negotiated (a back-end without packed rings gets a split one)
        feats = g.check("cat /sys/block/vda/device/features")
        ring = "packed" if feats[34:35] == "1" else "split"
        c0 = cpu()
        tw = _timed(g, f"dd if=/dev/zero of=/dev/vda bs=1M count={cfg.write_mib} oflag=direct 2>/dev/null", 600)
        c1 = cpu()
        g.check("sync", timeout=600)  # the FLUSH (host fdatasync) is not part of the device's speed
        one = f"dd if=/dev/vda of=/dev/null bs=1M count={cfg.read_mib} iflag=direct 2>/dev/null"
        passes = max(1, cfg.read_passes)
        c2 = cpu()
        tr = _timed(g, " && ".join([one] * passes), 600)
        c3 = cpu()
        t4 = _timed(g, f"dd if=/dev/vda of=/dev/null bs=4k count={cfg.read4k_count} iflag=direct 2>/dev/null",
                    600)
        c4 = cpu()
    read_mib = cfg.read_mib * passes
    return {"target": target, "write_MBps": cfg.write_mib * MiB / tw / 1e6,
            "read_MBps": read_mib * MiB / tr / 1e6, "read4k_iops": cfg.read4k_count / t4,
            "write_s": tw, "read_s": tr, "read4k_s": t4, "max_segments": max_seg, "max_sectors_kb": max_kb,
            "ring": ring,
            # the back-end's host CPU per unit of work (clock-tick resolution: 10 ms per test)
            "cpu_us_per_mib_written": (c1 - c0) / cfg.write_mib * 1e6,
            "cpu_us_per_mib_read": (c3 - c2) / read_mib * 1e6,
            "cpu_us_per_4k_read": (c4 - c3) / cfg.read4k_count * 1e6}


def run(cfg: BlkBenchConfig, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every target `cfg.rounds` times; best of each metric per target."""
    work = Path(tempfile.mkdtemp(prefix="pyvirtio-blkbench-", dir=cfg.work_dir))
    image = work / "disk.img"
    try:
        with open(image, "wb") as f:
            f.truncate(cfg.image_mib * MiB)
        # data everywhere the reads go, so no target reads holes
        with open(image, "r+b") as f:
            chunk = os.urandom(MiB)
            f.writelines(chunk for _ in range(max(cfg.read_mib, cfg.write_mib)))
        samples: dict[str, list[dict[str, Any]]] = {t: [] for t in cfg.targets}
        for rnd in range(cfg.rounds):
            for t in cfg.targets:
                if progress:
                    progress(f"round {rnd + 1}/{cfg.rounds}: {t}")
                os.sync()  # every target starts with a clean host page cache
                samples[t].append(_measure(t, cfg, image, work))
        results = []
        for t in cfg.targets:
            s = samples[t]
            best = {"target": t, "rounds": len(s),
                    "write_MBps": max(x["write_MBps"] for x in s), "read_MBps": max(x["read_MBps"] for x in s),
                    "read4k_iops": max(x["read4k_iops"] for x in s), "max_segments": s[0]["max_segments"],
                    # CPU per unit: the median round (a best would pick the least busy one)
                    **{k: sorted(x[k] for x in s)[len(s) // 2]
                       for k in ("cpu_us_per_mib_written", "cpu_us_per_mib_read", "cpu_us_per_4k_read")},
                    "max_sectors_kb": s[0]["max_sectors_kb"], "ring": s[0]["ring"], "samples": s}
            results.append(best)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def format_table(results: list[dict[str, Any]], reference: str = "qsd") -> str:
    ref = next((r for r in results if r["target"] == reference), None)
    head = f"{'target':>18} {'ring':>6} {'write MB/s':>11} {'read MB/s':>10} {'4k read IOPS':>13} {'max_seg':>8}"
    if ref:
        head += f"  {'x' + reference + ' (w/r/4k)':>22}"
    head += f"  {'back-end CPU us: /MiB w':>23} {'/MiB r':>7} {'/4k r':>6}"
    lines = [head]
    for r in results:
        line = (f"{r['target']:>18} {r.get('ring', '?'):>6} {r['write_MBps']:>11.1f} {r['read_MBps']:>10.1f} {r['read4k_iops']:>13.0f} "
                f"{r['max_segments']:>8}")
        if ref:
            line += "  " + f"{r['write_MBps'] / ref['write_MBps']:.2f}/{r['read_MBps'] / ref['read_MBps']:.2f}/" \
                           f"{r['read4k_iops'] / ref['read4k_iops']:.2f}".rjust(22)
        if "cpu_us_per_mib_read" in r:
            line += (f"  {r['cpu_us_per_mib_written']:>23.0f} {r['cpu_us_per_mib_read']:>7.0f} "
                     f"{r['cpu_us_per_4k_read']:>6.0f}")
        lines.append(line)
    return "\n".join(lines)


def main_from_guest_args(args: Any) -> int:
    """`pyvirtio bench guest --device blk`: the guest bench's options mapped
    here (`--backends` lazy/eager/builtin, qemu-storage-daemon always added
    as the reference; `--repeat` rounds; `--ring`; `--queues` vCPUs and
    queues; `--json`)."""
    import json

    from pyvirtio import _engine

    names = {"lazy": "pyvirtio-lazy", "eager": "pyvirtio-eager", "builtin": "builtin",
             "lazy-pure": "pyvirtio-lazy-pure", "eager-pure": "pyvirtio-eager-pure"}
    chosen = getattr(args, "backends", None)
    targets = tuple(names[b] for b in chosen or ["lazy", "eager", "builtin"] if b in names)
    if not chosen and _engine.is_compiled() and "pyvirtio-lazy" in targets:  # what compiling bought, same run
        i = targets.index("pyvirtio-lazy")
        targets = (*targets[:i + 1], "pyvirtio-lazy-pure", *targets[i + 1:])
    cfg = BlkBenchConfig(targets=(*targets, "qsd"), rounds=max(1, getattr(args, "repeat", 1)),
                         ring=getattr(args, "ring", "split"), smp=max(1, getattr(args, "queues", 1)))
    as_json = bool(getattr(args, "json", False))
    try:
        results = run(cfg, progress=None if as_json else lambda m: print(f"# {m}", file=sys.stderr, flush=True))
    except BenchError as e:
        print(f"pyvirtio bench guest --device blk: {e}", file=sys.stderr)
        return 1
    from pyvirtio.cli.common import engine_header, with_engine

    print(json.dumps(with_engine(results), indent=1) if as_json else engine_header() + "\n" + format_table(results))
    return 0


__all__ = ["TARGETS", "BenchError", "BlkBenchConfig", "format_table", "main_from_guest_args", "run"]
