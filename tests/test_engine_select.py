"""Which ring engine runs (pyvirtio._engine): PYVIRTIO_PURE=1 loads every
engine module from its .py source; `pyvirtio --version` and the bench
headers say which engine runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pyvirtio import __version__, _engine

PROBE = ("import json, importlib; from pyvirtio import _engine; "
         "print(json.dumps([_engine.name(), {m: importlib.import_module(m).__file__ for m in _engine.ENGINE}]))")


def _run(argv: list[str], pure: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYVIRTIO_PURE"}
    if pure:
        env["PYVIRTIO_PURE"] = "1"
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=60).stdout


def test_pure_env_loads_every_engine_module_from_source() -> None:
    name, files = json.loads(_run([sys.executable, "-c", PROBE], pure=True))
    assert name == "pure (PYVIRTIO_PURE=1)"
    assert all(f.endswith(".py") for f in files.values()), files


def test_without_the_env_the_engine_is_all_compiled_or_all_pure() -> None:
    name, files = json.loads(_run([sys.executable, "-c", PROBE], pure=False))
    compiled = [m for m, f in files.items() if not f.endswith(".py")]
    assert name.removesuffix(" + C ring scan") == ("mypyc" if compiled else "pure (not compiled)")
    assert len(compiled) in (0, len(_engine.ENGINE)), f"a mixed engine: {compiled}"


def test_version_names_the_engine() -> None:
    assert _run([sys.executable, "-m", "pyvirtio", "--version"], pure=True).strip() == \
        f"pyvirtio {__version__}, ring engine: pure (PYVIRTIO_PURE=1)"
    out = _run([sys.executable, "-m", "pyvirtio", "--version"], pure=False).strip()
    assert out.startswith(f"pyvirtio {__version__}, ring engine: ")
    assert out.removesuffix(" + C ring scan").endswith(("mypyc", "pure (not compiled)"))


def test_bench_queue_header_and_json_name_the_engine() -> None:
    argv = [sys.executable, "-m", "pyvirtio", "bench", "queue", "--ring", "split", "--policy", "lazy",
            "--requests", "200"]
    assert _run(argv, pure=True).splitlines()[0] == f"pyvirtio {__version__}, ring engine: pure (PYVIRTIO_PURE=1)"
    assert json.loads(_run([*argv, "--json"], pure=True))["engine"] == "pure (PYVIRTIO_PURE=1)"


def test_child_env_carries_the_engine_choice() -> None:
    env = _engine.child_env({"PYVIRTIO_PURE": "1", "X": "y"})
    assert env.get("PYVIRTIO_PURE") == ("1" if _engine.PURE_REQUESTED else None)
    assert env["X"] == "y"
