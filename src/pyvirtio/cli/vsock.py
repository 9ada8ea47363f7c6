"""`pyvirtio vsock`: serve virtio-vsock over vhost-user (QEMU back-end program conventions)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pyvirtio.cli.common import add_serving_args, early_exit, serve_device

#: the back-end type vhost-user.rst (vhost-user.json) names for virtio-vsock
CAPABILITIES = {"type": "vsock"}


def register(sub: Any, bench_sub: Any) -> None:
    p = sub.add_parser(
        "vsock", help="serve a virtio-vsock device over vhost-user",
        description="Serve virtio-vsock stream sockets to a vhost-user front-end (QEMU -device "
                    "vhost-user-vsock-pci) with the hybrid Unix-socket convention: a guest connecting to host "
                    "port N reaches the Unix socket HOST_SOCK_N; a host program connecting to HOST_SOCK and "
                    "writing 'CONNECT N\\n' reaches the guest's listener on port N and reads 'OK <port>\\n' "
                    "before the data. Counters are printed as JSON lines on SIGUSR1, at exit and every "
                    "--stats-interval.")
    add_serving_args(p, "print the back-end's capabilities as JSON and exit (QEMU back-end program conventions)")
    p.add_argument("--guest-cid", type=int, metavar="N", help="the guest's context id (3 and up)")
    p.add_argument("--uds-path", metavar="HOST_SOCK",
                   help="Unix socket for host programs (created); guest connections go to HOST_SOCK_<port>")
    p.add_argument("--buf-alloc", type=int, default=256 * 1024, metavar="BYTES",
                   help="receive buffer advertised per connection: the most guest bytes held for one host "
                        "socket that does not keep up (default 262144)")
    p.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="connections at once; more are refused (default 1024)")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a host program gets to send its CONNECT line, and then the guest to answer "
                        "it, before its socket is closed (default 10)")
    p.set_defaults(func=_run)

    b = bench_sub.add_parser(
        "guest-vsock", help="a Linux guest moving bytes over virtio-vsock (pyvirtio vsock)",
        description="Boot a guest (QEMU 7.2, TCG) with vhost-user-vsock-pci served by pyvirtio vsock and time "
                    "guest-to-host and host-to-guest transfers (socat in the guest, Python on the host), with "
                    "one and several connections at once. Needs root and QEMU; prints MiB/s.")
    b.add_argument("--mib", type=int, default=32, help="MiB per direction and connection count (default 32)")
    b.add_argument("--connections", type=int, default=4, help="the 'several' connection count (default 4)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from pyvirtio.bench.guest_vsock import BenchError, VsockBenchConfig, format_table, run

    cfg = VsockBenchConfig(mib=args.mib, connections=(1, max(2, args.connections)))
    try:
        results = run(cfg, progress=None if args.json else lambda m: print(f"# {m}", file=sys.stderr, flush=True))
    except BenchError as e:
        print(f"pyvirtio bench guest-vsock: {e}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=1) if args.json else format_table(results))
    return 0


def _run(args: argparse.Namespace) -> int:
    early = early_exit("vsock", args, CAPABILITIES)
    if early is not None:
        return early
    if args.guest_cid is None or args.uds_path is None:
        print("pyvirtio vsock: --guest-cid and --uds-path are required", file=sys.stderr)
        return 2

    from pyvirtio.devices.vsock import VsockDevice

    try:
        device = VsockDevice(args.guest_cid, args.uds_path, buf_alloc=args.buf_alloc,
                             max_connections=args.max_connections, connect_timeout=args.connect_timeout)
    except (OSError, ValueError) as e:
        print(f"pyvirtio vsock: {e}", file=sys.stderr)
        return 1
    where = args.socket_path or f"fd {args.fd}"
    # the back-end closes the device (its sockets, the HOST_SOCK file) when serving ends
    return serve_device("vsock", device, args,
                        f"vsock device for guest CID {args.guest_cid}, host sockets {args.uds_path}[_PORT], "
                        f"on {where}, pid {os.getpid()}")
