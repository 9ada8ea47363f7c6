#!/usr/bin/env python3
"""`pyvirtio bench queue` on the compiled engine and on pure Python
(PYVIRTIO_PURE=1), side by side: every configuration, both engines, each
repetition in a fresh process, interleaved (rep 1: every run, rep 2: ...)
so that a noisy machine hits both alike. Prints the median device req/s
of each side, their ratio and the access counts (which must not move).

    scripts/engine_bench.py [--reps 5] [--requests 100000] [--python .venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CONFIGS = [
    ("split lazy bulk", ["--ring", "split"]),
    ("split lazy --no-bulk", ["--ring", "split", "--no-bulk"]),
    ("packed lazy bulk", ["--ring", "packed"]),
    ("packed lazy --no-bulk", ["--ring", "packed", "--no-bulk"]),
    ("split --two-process", ["--ring", "split", "--two-process"]),
    ("packed --two-process", ["--ring", "packed", "--two-process"]),
]
ENGINES = [("compiled", {}), ("pure", {"PYVIRTIO_PURE": "1"})]


def one(py: str, args: list[str], env: dict[str, str], requests: int) -> dict[str, object]:
    argv = [py, "-m", "pyvirtio", "bench", "queue", "--policy", "lazy", "--requests", str(requests), "--json",
            *args]
    e = {k: v for k, v in os.environ.items() if k != "PYVIRTIO_PURE"} | env
    out = subprocess.run(argv, env=e, capture_output=True, text=True, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--only", help="substring of the configurations to run")
    a = p.parse_args()
    configs = [c for c in CONFIGS if not a.only or a.only in c[0]]
    res: dict[tuple[str, str], list[dict[str, object]]] = {}
    for rep in range(a.reps):
        for name, args in configs:
            for eng, env in ENGINES:
                r = one(a.python, args, env, a.requests)
                res.setdefault((name, eng), []).append(r)
                print(f"# rep {rep + 1}: {name} {r['engine']}: dev {r['device_requests_per_s']} req/s, "
                      f"acc/req {r['accesses_per_request']}", file=sys.stderr, flush=True)
    print(f"bench queue, lazy, batch 32, queue 256, {a.requests} requests, median of {a.reps} interleaved runs; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'configuration':24} {'pure dev req/s':>15} {'compiled':>10} {'ratio':>6}  "
          f"{'acc/req pure':>12} {'compiled':>8}")
    for name, _ in configs:
        med = {}
        acc = {}
        for eng, _env in ENGINES:
            rs = res[(name, eng)]
            med[eng] = statistics.median(float(r["device_requests_per_s"]) for r in rs)  # type: ignore[arg-type]
            acc[eng] = sorted({r["accesses_per_request"] for r in rs})
        print(f"{name:24} {med['pure']:>15.0f} {med['compiled']:>10.0f} {med['compiled'] / med['pure']:>5.2f}x  "
              f"{'/'.join(map(str, acc['pure'])):>12} {'/'.join(map(str, acc['compiled'])):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
