"""Guest file-sharing benchmark: the same Linux 6.1 guest (QEMU 7.2, TCG)
with a host directory shared several ways, one after the other in one run:

- `pyvirtio-fs`: our back-end as a user runs it, without options
  (`pyvirtio fs`, default `--cache auto`: file data through the guest's page
  cache, write-back), through `vhost-user-fs-pci`, mounted `-t virtiofs`
  (default options);
- `pyvirtio-fs-metadata`: `--cache metadata`: file data by direct I/O, like
  9p's cache=none, names and attributes cached for 1 s;
- `pyvirtio-fs-never` (on request): `--cache never`, nothing cached at all;
- `9p`: QEMU's built-in virtio-9p (`-fsdev local,security_model=none`,
  `virtio-9p-pci`), mounted `-t 9p -o trans=virtio,version=9p2000.L,msize=512000`
  (the kernel's default cache=none), what a user picks without a virtio-fs
  back-end;
- `9p-loose`: the same with `cache=loose`, file data through the guest's
  page cache as in our `auto`.

Each of ours is compared with the 9p mount that caches file data the same
way (`BASELINE`): `auto` with `9p-loose`, the direct-I/O modes with `9p`.
Under TCG every byte through a guest page cache is also copied by the
emulated CPU (and FUSE's write-back copies each page once more), which caps
both page-cached mounts far below the direct ones; comparing across that
line would measure the emulator, not the back-end.

Both devices use `vectors=0` (INTx). In the guest: a sequential write of one
large file (`dd` from /dev/zero, 1 MiB blocks, `conv=fsync`: the time
includes getting the data to the host), a sequential read of it after
dropping the guest's caches (`dd`, 1 MiB blocks), then `small_files` empty
files created (a shell loop of `: > f$i`), checked with `[ -e ]` after
dropping caches (one lookup each) and removed with one `rm`. Times come from
the guest's /proc/uptime around each step (10 ms ticks).

Our back-ends' time inside READ and WRITE requests per MiB comes from the
counters they print at exit. `run(cfg)` returns one result per target;
`format_table` prints them with the ratios to each one's baseline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyvirtio.bench.procs import BenchError, stop_process, wait_socket

log = logging.getLogger(__name__)

TARGETS = ("pyvirtio-fs", "pyvirtio-fs-metadata", "pyvirtio-fs-never", "9p", "9p-loose")
DEFAULT_TARGETS = ("pyvirtio-fs", "pyvirtio-fs-metadata", "9p", "9p-loose")
#: the 9p mount options per 9p target: the kernel's default cache=none, and
#: cache=loose (file data through the guest's page cache, as our `auto`)
NINEP_OPTS: dict[str, str] = {
    "9p": "trans=virtio,version=9p2000.L,msize=512000",
    "9p-loose": "trans=virtio,version=9p2000.L,msize=512000,cache=loose",
}
#: the 9p target each of ours is compared with: the one with the same data caching
BASELINE: dict[str, str] = {
    "pyvirtio-fs": "9p-loose",
    "pyvirtio-fs-metadata": "9p",
    "pyvirtio-fs-never": "9p",
}
#: our back-end's options per target (the first: the defaults)
TARGET_ARGS: dict[str, tuple[str, ...]] = {
    "pyvirtio-fs": (),
    "pyvirtio-fs-metadata": ("--cache", "metadata"),
    "pyvirtio-fs-never": ("--cache", "never"),
}
MiB = 1 << 20
TAG = "share"
GUEST_MODULES = ("fuse", "virtiofs", "9p", "9pnet_virtio")
METRICS = ("write_MBps", "read_MBps", "create_per_s", "stat_per_s", "delete_per_s")


@dataclasses.dataclass(slots=True)
class FsBenchConfig:
    targets: tuple[str, ...] = DEFAULT_TARGETS
    file_mib: int = 128
    small_files: int = 1000
    rounds: int = 1
    queue_size: int = 1024
    memory_mib: int = 512
    work_dir: Path | None = None
    #: extra arguments for our back-end
    pyvirtio_args: tuple[str, ...] = ()



@contextlib.contextmanager
def _share(target: str, cfg: FsBenchConfig, shared: Path, work: Path) -> Iterator[tuple[list[str], str]]:
    """Start the target's back-end (if it has one); yield QEMU's device
    arguments and the guest's mount command."""
    from pyvirtio.bench.harness import builtin_9p_args, vhost_user_fs_args

    if target in NINEP_OPTS:
        yield builtin_9p_args(shared, tag=TAG), f"mount -t 9p -o {NINEP_OPTS[target]} {TAG} /mnt"
        return
    if not target.startswith("pyvirtio-fs"):
        raise ValueError(f"unknown target {target!r} (one of {', '.join(TARGETS)})")
    # a unix socket path is at most 107 bytes: the socket goes under /tmp
    sock_dir = Path(tempfile.mkdtemp(prefix="pyvirtio-fsbench-"))
    sock = sock_dir / "fs.sock"
    log_path = work / f"{target}.log"
    argv = [sys.executable, "-m", "pyvirtio", "fs", "--socket-path", str(sock), "--shared-dir", str(shared),
            "--tag", TAG, *TARGET_ARGS[target], *cfg.pyvirtio_args]
    with open(log_path, "wb") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_socket(proc, sock, target, log_path)
        yield vhost_user_fs_args(sock, tag=TAG, queue_size=cfg.queue_size), f"mount -t virtiofs {TAG} /mnt"
    finally:
        stop_process(proc)
        shutil.rmtree(sock_dir, ignore_errors=True)


def _timed(guest: Any, cmd: str, timeout: float = 900.0) -> float:
    """Run `cmd` in the guest between two /proc/uptime readings; seconds elapsed."""
    out = guest.check("t0=$(cut -d' ' -f1 /proc/uptime); { " + cmd + " ; } >/dev/null 2>&1 || echo FAILED; "
                      "t1=$(cut -d' ' -f1 /proc/uptime); echo $t0 $t1", timeout=timeout)
    lines = out.splitlines()
    if "FAILED" in lines:
        raise BenchError(f"guest command failed: {cmd}")
    t0, t1 = map(float, lines[-1].split())
    return max(t1 - t0, 0.01)


def measure(target: str, cfg: FsBenchConfig, work: Path) -> dict[str, Any]:
    """Boot a guest with the target's share and run the workload; returns the numbers."""
    from pyvirtio.bench.harness import DEFAULT_MODULES, Guest, build_initramfs

    shared = work / f"shared-{target}"
    shared.mkdir()
    try:
        with _share(target, cfg, shared, work) as (device_args, mount):
            initrd = build_initramfs(modules=(*DEFAULT_MODULES, *GUEST_MODULES))
            with Guest(device_args=device_args, initrd=initrd, memory_mib=cfg.memory_mib) as g:
                g.check(f"mkdir -p /mnt && {mount} && mkdir /mnt/s")
                mib = cfg.file_mib
                n = cfg.small_files
                drop = "echo 3 > /proc/sys/vm/drop_caches"
                t_write = _timed(g, f"dd if=/dev/zero of=/mnt/big bs=1M count={mib} conv=fsync")
                g.check(drop)
                t_read = _timed(g, "dd if=/mnt/big of=/dev/null bs=1M")
                t_create = _timed(g, f"cd /mnt/s && for i in $(seq {n}); do : > f$i; done; cd /")
                g.check(drop)
                t_stat = _timed(g, f"cd /mnt/s && for i in $(seq {n}); do [ -e f$i ] || exit 1; done; cd /")
                g.check(drop)
                t_delete = _timed(g, "rm -f /mnt/s/f*")
                left = g.check("ls /mnt/s | wc -l")
                g.check("umount /mnt")
        if left != "0":
            raise BenchError(f"{target}: {left} small files left after rm")
        cost = _backend_cost(work / f"{target}.log") if target not in NINEP_OPTS else {}
        return {"target": target, **cost, "write_MBps": mib * MiB / 1e6 / t_write, "read_MBps": mib * MiB / 1e6 / t_read,
                "create_per_s": n / t_create, "stat_per_s": n / t_stat, "delete_per_s": n / t_delete,
                "file_mib": mib, "small_files": n}
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _backend_cost(log_path: Path) -> dict[str, float]:
    """Our back-end's own time per MiB read and written, from the counters it
    prints at exit (time inside READ and WRITE requests, from the request
    leaving the ring to its reply being written)."""
    fs: dict[str, Any] | None = None
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"fs"' in line:
                with contextlib.suppress(ValueError):
                    fs = json.loads(line).get("fs")
    if not fs:
        return {}
    op_us = fs.get("op_us", {})
    out = {}
    for op, key in (("read", "read_bytes"), ("write", "write_bytes")):
        if fs.get(key):
            out[f"backend_{op}_us_per_MiB"] = op_us.get(op, 0) / (fs[key] / MiB)
    return out


def run(cfg: FsBenchConfig, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every target (`rounds` times, best of each metric kept)."""
    own = cfg.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="pyvirtio-fsbench-")) if own else cfg.work_dir
    assert work is not None
    work.mkdir(parents=True, exist_ok=True)
    best: dict[str, dict[str, Any]] = {}
    try:
        for r in range(cfg.rounds):
            for target in cfg.targets:
                if progress:
                    progress(f"round {r + 1}/{cfg.rounds}: {target}")
                res = measure(target, cfg, work)
                if progress:
                    progress("  " + ", ".join(f"{k} {res[k]:.1f}" for k in METRICS))
                prev = best.get(target)
                if prev is None:
                    best[target] = res
                else:
                    for k in METRICS:
                        prev[k] = max(prev[k], res[k])
    finally:
        for p in work.glob("*.log"):
            p.unlink()
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return [best[t] for t in cfg.targets]


def format_table(results: list[dict[str, Any]]) -> str:
    """One row per target; each of ours beside the 9p mount that caches file
    data the same way (BASELINE), with the ratio of every metric to it."""
    by = {r["target"]: r for r in results}
    head = (f"{'target':<20} {'write MB/s':>10} {'read MB/s':>10} {'create/s':>9} {'stat/s':>9} {'delete/s':>9}"
            f" {'us/MiB w/r':>13}   vs        ratio (write/read/create/stat/delete)")
    lines = [head, "-" * len(head)]
    for r in results:
        cost = "-"
        if "backend_write_us_per_MiB" in r or "backend_read_us_per_MiB" in r:
            cost = (f"{r.get('backend_write_us_per_MiB', 0):.0f}/"
                    f"{r.get('backend_read_us_per_MiB', 0):.0f}")
        line = (f"{r['target']:<20} {r['write_MBps']:>10.1f} {r['read_MBps']:>10.1f} {r['create_per_s']:>9.0f} "
                f"{r['stat_per_s']:>9.0f} {r['delete_per_s']:>9.0f} {cost:>13}")
        base = by.get(BASELINE.get(r["target"], ""))
        if base:
            line += f"   {base['target']:<9} " + "/".join(f"{r[k] / base[k]:.2f}" for k in METRICS)
        lines.append(line)
    if results:
        r = results[0]
        lines.append(f"({r['file_mib']} MiB file, {r['small_files']} small files; guest QEMU 7.2 TCG, vectors=0; "
                     "pyvirtio-fs: `pyvirtio fs` without options (cache auto: guest page cache) vs 9p-loose "
                     "(cache=loose: guest page cache); pyvirtio-fs-metadata/-never (direct I/O) vs 9p "
                     "(cache=none, direct); us/MiB: our back-end's time inside WRITE/READ requests)")
    return "\n".join(lines)
