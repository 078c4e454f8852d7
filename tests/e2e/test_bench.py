"""`cdp bench --smoke`: the one benchmark still runs end to end and reports every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

CDP = str(Path(sys.executable).parent / "cdp")
SERVICES = ("ingest", "identity", "profile", "segmentation", "activation", "dmp_bridge")
RATES = ("ceiling_publish", "ceiling_consume", "ingest_grpc_batch", "ingest_http_batch", "suite_sustained",
         "lean_pipeline", "lean_pipeline_cpu", "profile_live", "profile_rebuild")
LATENCIES = (
    *(f"freshness_{stage}_{p}" for stage in ("resolved", "profile_changed", "segment_entered", "email_in_sink")
      for p in ("p50", "p99")),
    "get_profile_p50", "get_profile_p99", "health_p99", "rebuild_get_profile_max",
)
MEMORY = (*(f"memory_{name}" for name in SERVICES), "memory_nats_server", "memory_postgres")


def test_smoke_run_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    # The bench starts its own servers and suite, as on a fresh machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    result = subprocess.run([CDP, "bench", "--smoke", "--json", str(out)], env=env, capture_output=True, text=True,
                            timeout=170)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "whole suite (cdp up) sustained" in result.stdout
    document = json.loads(out.read_text())
    rows = document["rows"]
    assert set(rows) == {*RATES, *LATENCIES, *MEMORY}
    for key in (*RATES, *LATENCIES, *MEMORY):
        assert rows[key]["value"] is not None and rows[key]["value"] > 0, (key, rows[key])
    # Every probe went the whole way: collected, resolved, profile, segment, email.
    freshness = document["suite"][0]["freshness"]
    assert freshness["probes"] > 0 and freshness["probes_failed"] == 0, freshness
    assert not any(freshness["missing"].values()), freshness["missing"]
    assert document["machine"]["cores"] == os.cpu_count()


def test_the_scoring_stall_bench_runs_a_whole_round(tmp_path: Path) -> None:
    out = tmp_path / "scoring.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    result = subprocess.run([sys.executable, "bench/scoring.py", "--profiles", "400", "--runs", "1", "--json", str(out)],
                            cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                            timeout=170)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(out.read_text())
    (run,) = document["runs"]
    assert run["profiles"] == 400 and run["round_s"] > 0 and run["gap_max_ms"] >= run["gap_p50_ms"] > 0
