"""`fuzz/run.sh`: the atheris harnesses run against the ring engine in use
(compiled, or pure with PYVIRTIO_PURE=1) and find no crash in a short run;
the fallback when atheris is missing, the hypothesis long run, feeds the same
targets for the time asked, then says how many inputs it ran and exits 0,
with no traceback at time-up."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("target", ["ring", "codec"])
def test_hypothesis_long_run_stops_cleanly_when_time_is_up(target: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, "-m", "fuzz", target, "--seconds", "3", "--engine", "hypothesis"],
                       check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert "Traceback" not in out and "reproduce this failure" not in out
    line = [ln for ln in out.splitlines() if ln.startswith(f"hypothesis long run of {target}:")]
    assert line and "no crash" in line[0]
    assert int(line[0].split(": ")[1].split()[0]) > 10  # inputs run


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (scripts/setup.sh installs it: pip install -e '.[fuzz]')")
@pytest.mark.parametrize("target", ["ring", "codec"])
def test_atheris_run_against_the_engine_in_use_finds_no_crash(target: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, "-m", "fuzz", target, "--seconds", "5", "--engine", "atheris"],
                       check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert f"fuzz {target}: ring engine" in out
    runs = re.search(r"Done (\d+) runs", out)
    assert runs is not None and int(runs.group(1)) > 1000, out[-2000:]
