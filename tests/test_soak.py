"""A 20-second soak: pooled reads and writes under terminate, restart, crash and concurrent migrate.

The driver is tests/chaos.py (``python bench/soak.py --minutes 5`` runs it for the long run); this
test runs it briefly on a server of its own and checks its invariants, never its timings.
"""

from __future__ import annotations

import pytest

import chaos
from pgtest import LocalServer


@pytest.mark.slow
def test_soak_under_faults_loses_nothing_and_leaks_nothing(own_server: LocalServer) -> None:
    """Callers see no error, no acknowledged write is lost, the pool settles, health passes."""
    result = chaos.run_soak(own_server, seconds=20)
    summary = f"\n{result.table()}\nseed {result.seed}; samples: {result.error_samples}"
    assert not result.harness_errors, summary
    assert result.total_caller_errors == 0, summary
    assert result.writes > 0 and result.reads > 0, summary
    assert result.lost_writes == 0, summary
    assert result.read_misses == 0, summary
    assert result.leaked_connections == 0, summary
    assert result.pool_in_use == 0 and result.pool_size == result.pool_min, summary
    for kind in chaos.FAULT_KINDS:
        assert result.faults[kind] >= 1, f"no {kind} fault injected{summary}"
    assert not result.unrecovered, summary
    assert not result.migrate_errors and not result.pending_migrations, summary
    assert result.pool_health == "healthy", summary
    assert result.detailed_status == "pass", summary
    assert result.failures() == [], summary
