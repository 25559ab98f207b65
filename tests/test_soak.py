"""A 20-second soak: pooled reads and writes under terminate, restart, crash and concurrent migrate.

The soak itself lives in bench/soak.py (``python bench/soak.py --minutes 5`` for the long run); this
test runs it briefly on a server of its own and checks its invariants, never its timings.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pgtest import LocalServer

SOAK_PATH = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def load_soak() -> ModuleType:
    """Import bench/soak.py by path (bench/ is not a package)."""
    name = "pgops_bench_soak"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SOAK_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.mark.slow
def test_soak_under_faults_loses_nothing_and_leaks_nothing(own_server: LocalServer) -> None:
    """Callers see no error, no acknowledged write is lost, the pool settles, health passes."""
    soak = load_soak()
    result = soak.run_soak(own_server, seconds=20)
    summary = f"\n{result.table()}\nseed {result.seed}; samples: {result.error_samples}"
    assert not result.harness_errors, summary
    assert result.total_caller_errors == 0, summary
    assert result.writes > 0 and result.reads > 0, summary
    assert result.lost_writes == 0, summary
    assert result.read_misses == 0, summary
    assert result.leaked_connections == 0, summary
    assert result.pool_in_use == 0 and result.pool_size == result.pool_min, summary
    for kind in soak.FAULT_KINDS:
        assert result.faults[kind] >= 1, f"no {kind} fault injected{summary}"
    assert not result.unrecovered, summary
    assert not result.migrate_errors and not result.pending_migrations, summary
    assert result.pool_health == "healthy", summary
    assert result.detailed_status == "pass", summary
    assert result.failures() == [], summary
