"""`pyvirtio blk`: serve virtio-blk over vhost-user (QEMU back-end program conventions)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from pyvirtio.cli.common import (
    add_serving_args,
    csv_list,
    early_exit,
    engine_header,
    serve_device,
    with_engine,
)

log = logging.getLogger(__name__)

CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}


def register(sub: Any, bench_sub: Any) -> None:
    p = sub.add_parser(
        "blk", help="serve a virtio-blk device over vhost-user",
        description="Serve virtio-blk to a vhost-user front-end (QEMU -device vhost-user-blk-pci) from an "
                    "image file or block device, with inflight tracking (a restarted back-end resubmits "
                    "what was in flight). Counters are printed as JSON lines on SIGUSR1, at exit and every "
                    "--stats-interval.")
    add_serving_args(p, "print the back-end's capabilities as JSON and exit (QEMU back-end program conventions)")
    p.add_argument("--blk-file", metavar="IMAGE", help="raw image file or block device to serve")
    p.add_argument("--read-only", action="store_true", help="refuse writes (VIRTIO_BLK_F_RO)")
    p.add_argument("--queues", type=int, default=8, metavar="N",
                   help="request queues offered (default 8; QEMU asks one per vCPU)")
    p.add_argument("--direct", action="store_true", help="O_DIRECT data I/O (bypass the host page cache)")
    p.add_argument("--io-threads", type=int, default=4, metavar="N",
                   help="I/O threads shared by the queues (0: I/O on the queue threads; default 4)")
    p.add_argument("--seg-max", type=int, default=126, metavar="N",
                   help="data segments per request, <= ring size - 2 (default 126, for QEMU's 128-entry rings)")
    p.add_argument("--serial", metavar="ID", help="GET_ID answer (default: the image's file name)")
    p.add_argument("--batch", type=int, default=64, metavar="N", help="requests taken per ring step (default 64)")
    p.add_argument("--control-socket", metavar="PATH",
                   help="operator control socket, line-delimited JSON: {\"cmd\": \"resize\"} re-reads the image "
                        "size and tells the guest, {\"cmd\": \"resize\", \"size\": N} grows the file to N bytes, "
                        "{\"cmd\": \"stats\"}; see pyvirtio blk-ctl. SIGHUP also re-reads the image size")
    p.add_argument("--inject-latency-ms", type=float, default=0.0, metavar="MS",
                   help=argparse.SUPPRESS)  # testing aid: keep requests in flight (see BlkDevice)
    p.set_defaults(func=_run)

    c = sub.add_parser(
        "blk-ctl", help="talk to a running pyvirtio blk's control socket (resize, stats)",
        description="Send one command to the --control-socket of a running pyvirtio blk and print its JSON "
                    "answer. resize: after growing the image (truncate -s +64M disk.img), or with --size to let "
                    "the back-end grow the file; the guest sees the new capacity at once. Shrinking is refused.")
    c.add_argument("--control-socket", required=True, metavar="PATH")
    csub = c.add_subparsers(dest="ctl", required=True)
    r = csub.add_parser("resize", help="re-read the image size (or grow it to --size) and tell the guest")
    r.add_argument("--size", type=parse_size, metavar="BYTES",
                   help="grow the image file to this size (bytes, or with a K/M/G/T suffix: 1G = 2**30)")
    csub.add_parser("stats", help="the back-end's counters")
    c.set_defaults(func=_ctl)

    from pyvirtio.bench.guest_blk import TARGETS

    b = bench_sub.add_parser(
        "guest-blk", help="a Linux guest's dd throughput on pyvirtio blk vs QEMU's virtio-blk and qemu-storage-daemon",
        description="Boot the same guest (QEMU 7.2, TCG) once per disk back-end over the same image file and "
                    "time dd in it: sequential write and read (direct, 1 MiB) and 4 KiB direct reads. "
                    "Needs root and QEMU; prints a table with ratios to qemu-storage-daemon.")
    b.add_argument("--targets", type=csv_list(TARGETS), default=list(TARGETS),
                   help=f"comma list of {', '.join(TARGETS)} (default all)")
    b.add_argument("--rounds", type=int, default=1, help="cycle the targets N times, keep the best (default 1)")
    b.add_argument("--write-mib", type=int, default=512, help="MiB written with dd (default 512)")
    b.add_argument("--read-mib", type=int, default=512, help="MiB read per pass with dd (default 512)")
    b.add_argument("--read-passes", type=int, default=4, help="passes of the sequential read (default 4)")
    b.add_argument("--read4k-count", type=int, default=10000, help="4 KiB direct reads (default 10000)")
    b.add_argument("--queue-size", type=int, default=128, help="ring size of every disk (default 128)")
    b.add_argument("--ring", choices=["split", "packed"], default="split")
    b.add_argument("--io-threads", type=int, default=4, help="our back-end's I/O threads (default 4)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from pyvirtio.bench.guest_blk import BenchError, BlkBenchConfig, format_table, run

    targets = tuple(args.targets)
    cfg = BlkBenchConfig(targets=targets, write_mib=args.write_mib, read_mib=args.read_mib,
                         read_passes=max(1, args.read_passes), image_mib=max(args.write_mib, args.read_mib),
                         read4k_count=args.read4k_count,
                         rounds=args.rounds, queue_size=args.queue_size, ring=args.ring, io_threads=args.io_threads)
    try:
        results = run(cfg, progress=None if args.json else lambda m: print(f"# {m}", file=sys.stderr, flush=True))
    except BenchError as e:
        print(f"pyvirtio bench guest-blk: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(with_engine(results), indent=1))
    else:
        print(engine_header())
        print(format_table(results))
    return 0


_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "1G", "512M", "64k" (binary multiples)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SUFFIX and t[-1:] else ""
    number = t[:-1] if unit else t
    try:
        value = int(number) * _SUFFIX[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or a number with K/M/G/T)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return value


def _ctl(args: argparse.Namespace) -> int:
    from pyvirtio.control import request

    msg: dict[str, Any] = {"cmd": args.ctl}
    if args.ctl == "resize" and args.size is not None:
        msg["size"] = args.size
    try:
        answer = request(args.control_socket, msg)
    except (OSError, ValueError, TypeError) as e:
        print(f"pyvirtio blk-ctl: {args.control_socket}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=1))
    if not answer.get("ok"):
        print(f"pyvirtio blk-ctl: {answer.get('error', 'refused')}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    early = early_exit("blk", args, CAPABILITIES)
    if early is not None:
        return early
    if args.blk_file is None:
        print("pyvirtio blk: --blk-file is required", file=sys.stderr)
        return 2

    from pyvirtio.control import BlkControl
    from pyvirtio.devices.blk import BlkDevice

    try:
        device = BlkDevice(args.blk_file, read_only=args.read_only, num_queues=args.queues, direct=args.direct,
                           io_threads=args.io_threads, seg_max=args.seg_max, serial=args.serial,
                           batch=args.batch, inject_latency=args.inject_latency_ms / 1000)
    except (ValueError, OSError) as e:
        print(f"pyvirtio blk: {e}", file=sys.stderr)
        return 1
    where = args.socket_path or f"fd {args.fd}"
    ro = ", read-only" if args.read_only else ""
    ctl = BlkControl(device)
    return serve_device("blk", device, args, f"blk device {args.blk_file} ({device.capacity} sectors{ro}) on "
                                             f"{where}, {args.queues} queue(s), pid {os.getpid()}",
                        control=ctl.bind, on_hup=ctl.on_hup)
