"""Shared test configuration: the `pure_engine` marker.

Tests marked `pure_engine` patch engine internals (an instance attribute
shadowing a method, a class method replaced by a mutant): native classes of
the mypyc-compiled engine allow neither, so those tests run only on the pure
engine (scripts/test.sh runs the unit suite a second time with
PYVIRTIO_PURE=1) and are skipped, saying so, when the engine is compiled.
"""

from __future__ import annotations

import pytest

from pyvirtio import _engine


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("pure_engine") for item in items):
        return
    if not _engine.is_compiled():
        return
    skip = pytest.mark.skip(reason=f"patches engine internals; the engine is compiled ({_engine.name()}): "
                                   "runs with PYVIRTIO_PURE=1")
    for item in items:
        if item.get_closest_marker("pure_engine"):
            item.add_marker(skip)
