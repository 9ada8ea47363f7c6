"""What the benches print from the rates they measured (no peer needed)."""

from __future__ import annotations

from dataclasses import asdict

from pyvirtio.bench.dpdk import DpdkBenchConfig, format_results, summarize


def _run(label: str, rnd: int, pps: int | None, policy: str | None = "lazy", engine: str = "compiled") -> dict:
    r = {"label": label, "round": rnd, "pps": pps, "policy": policy}
    if policy is not None:
        r["engine"] = engine
    return r


def test_bench_dpdk_rounds_report_medians_and_each_rounds_own_ratio():
    """Rounds run in turns on a machine whose speed drifts: the table gives
    each target's median, the ratio of the medians, and the ratio within
    each round (pyvirtio against the net_vhost run of the same round); a
    failed run counts in no median."""
    runs = [
        _run("pyvirtio-lazy", 1, 1_000), _run("pyvirtio-lazy-pure", 1, 100, engine="pure"),
        _run("dpdk-net_vhost", 1, 4_000, policy=None),
        _run("pyvirtio-lazy", 2, 3_000), _run("pyvirtio-lazy-pure", 2, None, engine="pure"),
        _run("dpdk-net_vhost", 2, 6_000, policy=None),
        _run("pyvirtio-lazy", 3, 2_000), _run("pyvirtio-lazy-pure", 3, 300, engine="pure"),
        _run("dpdk-net_vhost", 3, 10_000, policy=None),
    ]
    s = summarize(runs, ("lazy",))
    assert s["dpdk_pps"] == 6_000
    assert s["median_pps"] == {"pyvirtio-lazy": 2_000, "pyvirtio-lazy-pure": 200}
    assert s["ratio_to_dpdk"] == {"lazy": round(2_000 / 6_000, 4), "lazy-pure": round(200 / 6_000, 4)}
    assert s["round_ratios"]["lazy"] == [0.25, 0.5, 0.2]
    assert s["round_ratios"]["lazy-pure"] == [0.025, 0.03]
    assert s["compiled_over_pure"] == {"lazy": 10.0}

    cfg = DpdkBenchConfig(mode="fwd", rounds=3, engines=("compiled", "pure"))
    text = format_results({"config": asdict(cfg), "runs": runs, **s, "ok": False})
    assert "x 3 rounds" in text
    lines = {ln.split("pps")[0].split()[0] + " " + ln.split()[1]: ln for ln in text.splitlines() if "#" in ln}
    assert "(0.250x net_vhost)" in lines["pyvirtio-lazy #1"]  # against round 1's own net_vhost, not the median
    assert "(0.500x net_vhost)" in lines["pyvirtio-lazy #2"]
    assert "FAILED" in lines["pyvirtio-lazy-pure #2"]
    assert "each round: 0.200x to 0.500x, median 0.250x" in text
    assert "(0.333x net_vhost's median)" in text


def test_bench_dpdk_one_round_reads_as_before():
    runs = [_run("pyvirtio-lazy", 1, 1_500), _run("dpdk-net_vhost", 1, 5_000, policy=None)]
    s = summarize(runs, ("lazy",))
    assert s["ratio_to_dpdk"] == {"lazy": 0.3} and s["round_ratios"] == {"lazy": [0.3]}
    text = format_results({"config": asdict(DpdkBenchConfig()), "runs": runs, **s, "ok": True})
    assert "medians" not in text and "#" not in text and "(0.300x net_vhost)" in text
