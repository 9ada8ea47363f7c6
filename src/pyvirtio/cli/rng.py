"""`pyvirtio rng`: serve virtio-rng over vhost-user (QEMU back-end program conventions)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pyvirtio.cli.common import add_serving_args, early_exit, serve_device

#: the back-end type vhost-user.rst (vhost-user.json) names for virtio-rng
CAPABILITIES = {"type": "rng"}


def register(sub: Any, bench_sub: Any) -> None:
    p = sub.add_parser(
        "rng", help="serve a virtio-rng device over vhost-user",
        description="Serve virtio-rng to a vhost-user front-end (QEMU -device vhost-user-rng-pci): every "
                    "request is filled from --source. A source that has no bytes ready gets --max-wait "
                    "seconds, then the request is answered with what it had. Counters are printed as JSON "
                    "lines on SIGUSR1, at exit and every --stats-interval.")
    add_serving_args(p, "print the back-end's capabilities as JSON and exit (QEMU back-end program conventions)")
    p.add_argument("--source", default="/dev/urandom", metavar="PATH",
                   help="where the bytes come from: a device, FIFO or file (default /dev/urandom)")
    p.add_argument("--max-bytes-per-second", type=int, default=0, metavar="N",
                   help="rate limit, to emulate a slow hardware RNG (default 0: none)")
    p.add_argument("--max-wait", type=float, default=1.0, metavar="S",
                   help="longest wait for a slow source's first byte per request, then the request is answered "
                        "with 0 bytes (default 1; Linux 6.1's driver stops asking after such an answer)")
    p.set_defaults(func=_run)

    b = bench_sub.add_parser(
        "guest-rng", help="a Linux guest reading /dev/hwrng: pyvirtio rng vs QEMU's virtio-rng",
        description="Boot the same guest (QEMU 7.2, TCG) once per back-end, both reading /dev/urandom on "
                    "the host, and time `dd if=/dev/hwrng` in it: pyvirtio rng over vhost-user-rng-pci and "
                    "QEMU's built-in virtio-rng-pci (rng-random, its default rate limit: none). Needs root "
                    "and QEMU; prints a table with KiB/s and the ratio to QEMU's.")
    b.add_argument("--kib", type=int, default=1024, help="KiB the guest reads per round (default 1024)")
    b.add_argument("--rounds", type=int, default=1, help="cycle the targets N times, keep the best (default 1)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from pyvirtio.bench.guest_rng import BenchError, RngBenchConfig, format_table, run

    cfg = RngBenchConfig(kib=args.kib, rounds=max(1, args.rounds))
    try:
        results = run(cfg, progress=None if args.json else lambda m: print(f"# {m}", file=sys.stderr, flush=True))
    except BenchError as e:
        print(f"pyvirtio bench guest-rng: {e}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=1) if args.json else format_table(results))
    return 0


def _run(args: argparse.Namespace) -> int:
    early = early_exit("rng", args, CAPABILITIES)
    if early is not None:
        return early

    from pyvirtio.devices.rng import RngDevice

    try:
        device = RngDevice(args.source, max_bytes_per_second=args.max_bytes_per_second, max_wait=args.max_wait)
    except OSError as e:
        print(f"pyvirtio rng: {e}", file=sys.stderr)
        return 1
    where = args.socket_path or f"fd {args.fd}"
    limit = f", at most {args.max_bytes_per_second} B/s" if args.max_bytes_per_second else ""
    # the back-end closes the device (and its source) when serving ends
    return serve_device("rng", device, args, f"rng device from {args.source}{limit} on {where}, pid {os.getpid()}")
