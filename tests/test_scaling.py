"""The growth benchmark (pipelines/bench_scaling.py) and the model calibrated on
it (pipelines/scaling_model.py): the benchmark's counts are exact and
consistent between processes, over both launchers; the model's counts are
those the protocol must produce; the model's table is what docs/scaling.md
quotes."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from dist_programs import launching

ROOT = pathlib.Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
sys.path.insert(0, str(PIPELINES))
import scaling_model as model  # noqa: E402


# ------------------------------------------------------------------ the model
def test_peers_served_is_the_chance_a_peer_draws_from_me_times_the_peers():
    # two processes, shards of 2 rows, r = 1: the other draws one of 4 rows, 2 are mine
    assert model.p_peer_draws_from_me(2, 1, 2) == pytest.approx(0.5)
    # r larger than the others' rows: every peer must draw some of mine
    assert model.p_peer_draws_from_me(2, 3, 2) == 1.0
    assert model.peers_served(4, 7, None) == pytest.approx(3 * (1 - 0.75 ** 7))
    assert model.peers_served(1024, 7, 100) <= 7


def test_dense_counts_grow_with_the_peers_and_the_fields():
    for n in (2, 16, 1024):
        d = model.counts("dense", n, 7, 1000, 3)
        s = model.counts("sparse", n, 7, 1000, 3)
        assert d["collectives"] == 4 and s["collectives"] == 1
        assert d["messages_sent"] - (n - 1) == pytest.approx(3 * (s["messages_sent"] - (n - 1)))
        assert d["bytes_sent"] == s["bytes_sent"]           # the same rows move
    assert model.latency_terms("dense", 1024, 7, 2) == 10 + 2 * 1023
    sparse = model.latency_terms("sparse", 1024, 7, 2)
    assert 10 + 7 <= sparse <= 10 + 30


def test_busiest_owner_serves_more_than_r_rows_at_scale():
    assert model.busiest_owner_rows(2, 7) == 7
    assert 7 < model.busiest_owner_rows(1024, 7) < 30


def test_the_reference_setting_meets_the_issue_targets_with_the_sparse_protocol():
    """Model only: under 1 % of a 100 ms step at 1,024 processes on the
    InfiniBand-class network (network terms), per-process bytes within 1.1x
    of r samples plus the status rows; the dense protocol's latency terms
    are what misses it on 25 GbE."""
    sb = 224 * 224 * 3 + 8
    name, alpha, beta = model.NETWORKS[0]
    t = model.round_time("sparse", 1024, 7, sb, 2, alpha, beta)
    assert t["network"] < 1e-3
    c = model.counts("sparse", 1024, 7, sb, 2)
    assert c["bytes_sent"] <= 1.1 * (7 * sb + model.STATUS_BYTES * 1023)
    _, alpha, beta = model.NETWORKS[1]
    dense = model.round_time("dense", 1024, 7, sb, 2, alpha, beta)
    assert dense["latency"] > 20 * model.round_time("sparse", 1024, 7, sb, 2, alpha,
                                                    beta)["latency"]


def test_the_docs_quote_the_models_table():
    """docs/scaling.md's "at scale" table is the one the model prints (no
    measurement needed for it)."""
    out = subprocess.run([sys.executable, PIPELINES / "scaling_model.py", "--no-measurements",
                          "--software-ms", "0.7"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    table = [line for line in out.splitlines() if line.startswith("| HDR") or
             line.startswith("| 25 GbE")]
    assert len(table) == 8
    doc = (ROOT / "docs" / "scaling.md").read_text()
    for line in table:
        assert line in doc, line


# ------------------------------------------------------------------ the benchmark
@pytest.mark.mpi
@pytest.mark.torchrun
@pytest.mark.slow
def test_bench_scaling_counts_are_exact_and_the_model_reads_them(tmp_path):
    from utils import require_mpiexec
    require_mpiexec()
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, PIPELINES / "bench_scaling.py", "--processes", "2,3",
           "--launchers", "mpiexec,torchrun", "--steps", "6", "--warmup", "2", "--repeats", "2",
           "--compute-ms", "5", "--capacity", "16", "--sample-shape", "4,4,3", "--out", out,
           "--launch-timeout", "240"]
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=launching.env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "command: " in proc.stdout and "bench_scaling.py --processes 2,3" in proc.stdout
    data = json.loads(out.read_text())
    assert data["failures"] == []
    assert [(f["launcher"], f["processes"]) for f in data["summary"]] == [
        ("mpiexec", 2), ("mpiexec", 3), ("torchrun", 2), ("torchrun", 3)]
    sb = 4 * 4 * 3 + 8
    assert data["sample_bytes"] == sb
    for f in data["summary"]:
        n, ps, totals = f["processes"], f["per_step"], f["totals"]
        steps = f["counted_steps_per_process"]
        assert steps == 2 * 2 * 6                 # both kinds of segment, every repetition
        assert len(totals) == n
        for t in totals:                          # one round per step, exactly
            assert t["rounds"] == steps, t
            assert t["allgathers"] >= steps       # the status of every round
            assert t["messages_sent"] >= steps and t["bytes_sent"] > 0
        # what the processes sent is what they received, byte for byte
        assert sum(t["bytes_sent"] for t in totals) == sum(t["bytes_received"] for t in totals)
        # the rows sent per step: r (n-1)/n expected, within 5 standard errors
        rows = (ps["bytes_sent"]["mean"] - model.STATUS_BYTES * (n - 1)
                * ps["allgathers"]["mean"]) / sb
        se = model.rows_from_others_sd(n, 7, 16) / math.sqrt(n * steps)
        assert abs(rows - 7 * (n - 1) / n) <= 5 * se + 1e-9, (rows, se)
        for key in ("mix_ms_global_step", "mix_ms_local_step", "tight_round_ms"):
            assert f[key]["min"] <= f[key]["max"] and f[key]["median"] > 0
        assert f["step_ratio"]["median"] > 0 and len(f["step_ratio"]["per_repeat"]) == 2
    report = subprocess.run([sys.executable, PIPELINES / "scaling_model.py", out],
                            capture_output=True, text=True, timeout=120, check=True).stdout
    assert "## 1. Counts per step and process" in report
    assert "| mpiexec 3 |" in report and "| torchrun 2 |" in report
    assert "## 3. At scale" in report
