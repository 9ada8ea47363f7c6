"""`pyvirtio net`: serve virtio-net over vhost-user (QEMU back-end program conventions)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from pyvirtio.cli.common import add_serving_args, early_exit, serve_device

log = logging.getLogger(__name__)

CAPABILITIES = {"type": "net"}


def register(sub: Any, bench_sub: Any) -> None:
    p = sub.add_parser(
        "net", help="serve a virtio-net device over vhost-user",
        description="Serve virtio-net to a vhost-user front-end (QEMU -netdev vhost-user, DPDK virtio-user). "
                    "Counters are printed as JSON lines on SIGUSR1, at exit and every --stats-interval.")
    add_serving_args(p, 'print {"type": "net"} and exit (QEMU back-end program conventions)')
    p.add_argument("--backend", default="sink", metavar="KIND",
                   help="tap:NAME, sink, loopback or gen[:SIZE] (default sink)")
    p.add_argument("--queues", type=int, default=1, metavar="N", help="queue pairs (default 1)")
    p.add_argument("--queue-size-max", type=int, default=1024, metavar="N",
                   help="largest ring accepted (default 1024)")
    p.add_argument("--batch", type=int, default=1024, metavar="N",
                   help="chains taken per ring step, at most (default 1024)")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--mac", help="device MAC address (default: random, locally administered)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    early = early_exit("net", args, CAPABILITIES)
    if early is not None:
        return early

    from pyvirtio.devices.net import NetDevice, parse_mac

    try:
        device = NetDevice(args.backend, queue_pairs=args.queues, mtu=args.mtu,
                           mac=parse_mac(args.mac) if args.mac else None,
                           queue_size_max=args.queue_size_max, batch=args.batch)
    except (ValueError, OSError) as e:
        print(f"pyvirtio net: {e}", file=sys.stderr)
        return 1
    where = args.socket_path or f"fd {args.fd}"
    return serve_device("net", device, args, f"net device on {where}, backend {args.backend}, "
                                             f"{args.queues} queue pair(s), pid {os.getpid()}")
