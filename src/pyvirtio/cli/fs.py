"""`pyvirtio fs`: serve virtio-fs over vhost-user (QEMU back-end program conventions)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from pyvirtio.cli.common import add_serving_args, early_exit, engine_header, serve_device, with_engine

log = logging.getLogger(__name__)

CAPABILITIES = {"type": "fs"}


def register(sub: Any, bench_sub: Any) -> None:
    p = sub.add_parser(
        "fs", help="serve a virtio-fs device (a shared directory) over vhost-user",
        description="Share a host directory with a guest through virtio-fs (QEMU -device vhost-user-fs-pci; the "
                    "guest mounts it with mount -t virtiofs TAG /mnt). The guest cannot reach outside the "
                    "directory. Counters are printed as JSON lines on SIGUSR1, at exit and every --stats-interval.")
    add_serving_args(p, "print the back-end's capabilities as JSON and exit (QEMU back-end program conventions)")
    p.add_argument("--shared-dir", metavar="DIR", help="the directory to share")
    p.add_argument("--tag", default="pyvirtio",
                   help="mount tag in the device config (QEMU's vhost-user-fs-pci supplies its own tag=)")
    p.add_argument("--read-only", action="store_true", help="refuse every change (EROFS)")
    p.add_argument("--queues", type=int, default=1, metavar="N",
                   help="request queues offered besides the high-priority queue (default 1)")
    p.add_argument("--cache", choices=["never", "metadata", "auto", "always"], default="auto",
                   help="guest caching: auto (default: guest page cache while open, write-back, 1 s timeouts; "
                        "shared mmap works), metadata (file data by direct I/O, like 9p's cache=none, no "
                        "MAP_SHARED mmap; names and attributes cached 1 s; faster for bulk data under TCG), "
                        "never (nothing cached), always (as auto, a day)")
    p.add_argument("--cache-timeout", type=float, metavar="S",
                   help="how long the guest may cache names and attributes (default: from --cache)")
    p.add_argument("--max-write", type=int, default=1 << 20, metavar="BYTES",
                   help="largest WRITE the guest may send (default 1 MiB)")
    p.add_argument("--lock-wait", type=float, default=0.5, metavar="S",
                   help="how long a blocking lock request (F_SETLKW) retries before EAGAIN (default 0.5 s)")
    p.add_argument("--no-xattr", action="store_true", help="answer ENOSYS to extended attribute requests")
    p.add_argument("--no-writeback", action="store_true",
                   help="no write-back cache in the guest (every write() is a WRITE request)")
    p.set_defaults(func=_run)

    b = bench_sub.add_parser(
        "guest-fs", help="file I/O in a Linux guest on pyvirtio fs vs QEMU's built-in virtio-9p",
        description="Boot the same guest (QEMU 7.2, TCG) once per file-sharing back-end over the same host "
                    "directory and time, in the guest: a sequential write and read of one large file (dd, "
                    "1 MiB blocks, caches dropped before the read) and the create/stat/delete rate of many "
                    "small files. Needs root and QEMU; prints a table with ratios to the 9p mount with the same "
                    "data caching.")
    b.add_argument("--targets", default="pyvirtio-fs,pyvirtio-fs-metadata,9p,9p-loose",
                   help="comma list of pyvirtio-fs (no options: --cache auto), pyvirtio-fs-metadata (--cache "
                        "metadata), pyvirtio-fs-never (--cache never), 9p (cache=none), 9p-loose (cache=loose; "
                        "default: pyvirtio-fs,pyvirtio-fs-metadata,9p,9p-loose); each of ours is compared with "
                        "the 9p mount that caches file data as it does")
    b.add_argument("--file-mib", type=int, default=128, help="size of the large file in MiB (default 128)")
    b.add_argument("--small-files", type=int, default=1000, help="small files created, stat'ed, deleted "
                                                                 "(default 1000)")
    b.add_argument("--rounds", type=int, default=1, help="cycle the targets N times, keep the best (default 1)")
    b.add_argument("--queue-size", type=int, default=1024,
                   help="ring size of the virtio-fs device (default 1024, as libvirt sets; 9p's is fixed)")
    b.add_argument("--work-dir", help="where the shared directory goes (default a temporary directory)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pyvirtio.bench.guest_fs import TARGETS, BenchError, FsBenchConfig, format_table, run

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        print(f"pyvirtio bench guest-fs: unknown target(s) {', '.join(bad)}", file=sys.stderr)
        return 2
    cfg = FsBenchConfig(targets=targets, file_mib=args.file_mib, small_files=args.small_files,
                        rounds=max(1, args.rounds), queue_size=args.queue_size,
                        work_dir=Path(args.work_dir) if args.work_dir else None)
    if not args.json:
        print(f"# {engine_header()}", file=sys.stderr, flush=True)
    try:
        results = run(cfg, progress=None if args.json else lambda m: print(f"# {m}", file=sys.stderr, flush=True))
    except BenchError as e:
        print(f"pyvirtio bench guest-fs: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(with_engine(results), indent=1))
    else:
        print(engine_header())
        print(format_table(results))
    return 0


def _run(args: argparse.Namespace) -> int:
    early = early_exit("fs", args, CAPABILITIES)
    if early is not None:
        return early
    if args.shared_dir is None:
        print("pyvirtio fs: --shared-dir is required", file=sys.stderr)
        return 2

    from pyvirtio.device import as_virtio_device
    from pyvirtio.devices.fs import FsDevice

    try:
        device = FsDevice(args.shared_dir, tag=args.tag, read_only=args.read_only, request_queues=args.queues,
                          cache=args.cache, timeout=args.cache_timeout, max_write=args.max_write,
                          lock_wait=args.lock_wait,
                          xattr=not args.no_xattr, writeback=not args.no_writeback)
    except (ValueError, OSError) as e:
        print(f"pyvirtio fs: {e}", file=sys.stderr)
        return 1
    where = args.socket_path or f"fd {args.fd}"
    ro = ", read-only" if args.read_only else ""
    return serve_device("fs", as_virtio_device(device), args,
                        f"fs device {device.shared_dir} (tag {args.tag}{ro}) on {where}, "
                        f"{args.queues} request queue(s), pid {os.getpid()}")
