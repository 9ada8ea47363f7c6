"""CLI commands built on the Python vhost-user front-end:
`pyvirtio probe`, `pyvirtio bench net`, `pyvirtio bench dpdk`.

`register(sub, bench_sub)` adds them to the `pyvirtio` parser (see
`pyvirtio.cli._COMMAND_MODULES`). The handlers own the terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pyvirtio.cli.common import csv_list, engine_header, with_engine


def _cpus(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected two CPU numbers: BACKEND,FRONTEND") from None
    return a, b


def _probe(args: argparse.Namespace) -> int:
    from pyvirtio.driver.probe import format_report, probe

    report = probe(args.socket_path, rings=tuple(args.ring), frames=args.frames, size=args.size,
                   timeout=args.timeout)
    print(json.dumps(report.as_dict(), indent=1) if args.json else format_report(report))
    return 0 if report.ok else 1


def _bench_net(args: argparse.Namespace) -> int:
    from pyvirtio.bench.net import NetBenchConfig, format_result, run

    cfg = NetBenchConfig(socket_path=args.socket_path, ring=args.ring, seconds=args.seconds, size=args.size,
                         batch=args.batch, queue_size=args.queue_size, backend=args.backend,
                         policy=args.policy, event_idx=args.event_idx, tx_segments=args.tx_segments,
                         pin=not args.no_pin)
    if not args.json:
        print(f"# bench net: {cfg.ring}, {cfg.seconds:g} s ...", file=sys.stderr, flush=True)
    result = run(cfg)
    print(json.dumps(with_engine(result), indent=1) if args.json else engine_header() + "\n" + format_result(result))
    return 0


def _default_engines() -> list[str]:
    """Both engines side by side when this process runs the compiled one."""
    from pyvirtio import _engine

    return ["compiled", "pure"] if _engine.is_compiled() else ["pure"]


def _bench_dpdk(args: argparse.Namespace) -> int:
    from pyvirtio.bench.dpdk import DpdkBenchConfig, format_results, run

    cfg = DpdkBenchConfig(mode=args.mode, ring=args.ring, seconds=args.seconds, policies=tuple(args.policy),
                          size=args.size, cpus=args.cpus, targets=tuple(args.against),
                          in_order=args.in_order, mrg_rxbuf=args.mrg_rxbuf, keep_logs=args.keep_logs,
                          queue_size=args.queue_size, engines=tuple(args.engine or _default_engines()),
                          rounds=args.rounds)
    progress = None if args.json else (lambda msg: print(f"# {msg}", file=sys.stderr, flush=True))
    results = run(cfg, progress=progress)
    print(json.dumps(with_engine(results), indent=1) if args.json else engine_header() + "\n" + format_results(results))
    return 0 if results.get("ok") else 1


def register(sub: Any, bench_sub: Any) -> None:
    """Add `probe` to `sub` and `net`, `dpdk` to `bench_sub`."""
    p = sub.add_parser("probe", help="show what a vhost-user-net back-end offers and run conformance checks")
    p.add_argument("--socket-path", required=True, help="the back-end's listening socket")
    p.add_argument("--ring", type=csv_list(["split", "packed"]), default=["split", "packed"],
                   help="ring formats to check (comma list; default both, packed skipped if not offered)")
    p.add_argument("--frames", type=int, default=64, help="frames per traffic check (default 64)")
    p.add_argument("--size", type=int, default=64, help="frame size in bytes (default 64)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for replies and frames")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_probe)

    n = bench_sub.add_parser("net", help="packets per second through a vhost-user-net back-end (Python front-end)")
    n.add_argument("--socket-path", help="back-end socket; default: start an embedded pyvirtio back-end")
    n.add_argument("--ring", choices=["split", "packed"], default="split")
    n.add_argument("--seconds", type=float, default=5.0)
    n.add_argument("--size", type=int, default=64, help="frame size in bytes (default 64)")
    n.add_argument("--batch", type=int, default=64, help="frames per send (default 64)")
    n.add_argument("--queue-size", type=int, default=256)
    n.add_argument("--backend", default="sink", help="embedded back-end: sink or loopback (default sink)")
    n.add_argument("--policy", choices=["lazy", "eager"], help="embedded back-end's notification policy")
    n.add_argument("--event-idx", action="store_true", help="negotiate VIRTIO_F_EVENT_IDX if offered")
    n.add_argument("--tx-segments", type=int, choices=[1, 2], default=1,
                   help="descriptors per transmitted frame: header+frame in one, or two")
    n.add_argument("--no-pin", action="store_true", help="do not pin back-end and front-end to separate CPUs")
    n.add_argument("--json", action="store_true", help="one JSON object")
    n.set_defaults(func=_bench_net)

    d = bench_sub.add_parser("dpdk", help="testpmd virtio-user against pyvirtio and against DPDK net_vhost")
    d.add_argument("--mode", choices=["tx", "rx", "fwd"], default="tx",
                   help="tx: txonly into a sink; rx: rxonly from a generator; fwd: forwarding through loopback")
    d.add_argument("--ring", choices=["split", "packed"], default="split")
    d.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (after warm-up)")
    d.add_argument("--policy", type=csv_list(["lazy", "eager"]), default=["lazy"],
                   help="pyvirtio notification policies to run (comma list; default lazy)")
    d.add_argument("--size", type=int, default=64, help="frame size in bytes (default 64)")
    d.add_argument("--cpus", type=_cpus, default=(0, 1), help="BACKEND,FRONTEND CPUs (default 0,1)")
    d.add_argument("--against", type=csv_list(["pyvirtio", "dpdk"]), default=["pyvirtio", "dpdk"],
                   help="back-ends to run (default both)")
    d.add_argument("--in-order", type=int, choices=[0, 1], default=None, help="virtio-user in_order devarg")
    d.add_argument("--queue-size", type=int, default=None,
                   help="virtio-user queue_size devarg (default: the PMD's, 256), same for both back-ends")
    d.add_argument("--mrg-rxbuf", type=int, choices=[0, 1], default=None, help="virtio-user mrg_rxbuf devarg")
    d.add_argument("--engine", type=csv_list(["compiled", "pure"]), default=None,
                   help="pyvirtio ring engines to run (comma list; default: compiled and pure side by side "
                        "when the engine is compiled, else pure)")
    d.add_argument("--rounds", type=int, default=1,
                   help="run every target N times in turns and report medians and each round's ratio "
                        "(default 1)")
    d.add_argument("--keep-logs", action="store_true", help="keep the processes' output files")
    d.add_argument("--json", action="store_true", help="one JSON object")
    d.set_defaults(func=_bench_dpdk)
