"""Global sampling across real MPI processes (mpiexec on loopback, CPU backend)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.mpi

PROGRAM = Path(__file__).parent / "mpi_programs" / "global_sampling.py"
TIMEOUT = 240


def run(n, scenario, out_dir, timeout=TIMEOUT, **env_vars):
    env = dict(os.environ, **env_vars)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    try:
        proc = subprocess.run(["mpiexec", "-n", str(n), sys.executable, str(PROGRAM), scenario,
                               str(out_dir)], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpiexec -n {n} {scenario} hung (> {timeout} s): {e.stdout}\n{e.stderr}")
    paths = sorted(Path(out_dir).glob(f"{scenario}-*.json"))
    assert proc.returncode == 0 and len(paths) == n, (proc.returncode, proc.stdout,
                                                      proc.stderr[-3000:])
    results = [json.loads(p.read_text()) for p in paths]
    for p in paths:
        p.unlink()
    return sorted(results, key=lambda r: r["rank"])


@pytest.mark.parametrize("n", [2, 4])
def test_representatives_are_earlier_samples_with_their_own_labels(n, tmp_path):
    results = run(n, "pairing", tmp_path)
    for r in results:
        assert r["checked"] > 200
        assert r["remote"] > 0.3 * r["checked"], "representatives should come from other ranks"


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_aware", ["0", "1"], ids=["staged", "cuda-aware"])
def test_gpu_buffers_exchange_their_samples(cuda_aware, tmp_path):
    """CuPy shards (several ranks may share one GPU): staged through pinned host
    memory, or passed to MPI directly when the library is CUDA-aware."""
    from dali_rehearsal.exchange import cuda_aware_mpi
    if cuda_aware == "1" and not cuda_aware_mpi():
        pytest.skip("this MPI library is not CUDA-aware")
    results = run(2, "pairing", tmp_path, DR_TEST_DEVICE="gpu",
                  DALI_REHEARSAL_CUDA_AWARE=cuda_aware)
    for r in results:
        assert r["checked"] > 200 and r["remote"] > 0
        assert r["staged"] is (cuda_aware == "0")


@pytest.mark.parametrize("n", [2, 4])
def test_global_sampling_is_uniform_over_rank_and_slot(n, tmp_path):
    from scipy.stats import chisquare
    results = run(n, "uniform", tmp_path)
    counts = np.concatenate([np.asarray(c) for c in results[0]["counts"]])
    capacities = [4 * (k + 1) ** 2 for k in range(n)]
    assert len(counts) == sum(capacities)
    assert counts.sum() == results[0]["steps"] * n * 5
    # one test over every (rank, slot): equal expected counts despite unequal shards
    assert chisquare(counts).pvalue > 1e-3, counts
    # and the share of each rank is proportional to its fill level
    per_rank = np.add.reduceat(counts, np.cumsum([0] + capacities[:-1]))
    expected = np.asarray(capacities) / sum(capacities) * counts.sum()
    assert np.allclose(per_rank, expected, rtol=0.1), (per_rank, expected)


@pytest.mark.parametrize("n", [2, 4])
def test_same_seeds_give_the_same_batches(n, tmp_path):
    first = [r["digest"] for r in run(n, "reproducible", tmp_path)]
    second = [r["digest"] for r in run(n, "reproducible", tmp_path)]
    assert first == second
    assert len(set(first)) == n      # ranks differ from each other


def test_checkpointed_shards_resume_with_the_same_batches(tmp_path):
    results = run(2, "checkpoint", tmp_path)
    for r in results:
        assert r["digests"][0] == r["digests"][1]
    assert results[0]["digests"][0] != results[1]["digests"][0]


@pytest.mark.parametrize("n", [2, 4])
def test_a_failing_rank_stops_every_rank(n, tmp_path):
    results = run(n, "failure", tmp_path, timeout=120)
    assert results[1]["error"] == "ValueError" and results[1]["step"] == 5
    for r in results:
        if r["rank"] != 1:
            assert r["error"] == "RemoteError", r
            assert r["step"] in (5, 6), r


@pytest.mark.parametrize("n", [2, 4])
def test_uneven_shards_end_epochs_together_without_loss(n, tmp_path, mnist):
    (tmp_path / "mnist").symlink_to(Path(mnist[0]).parent)
    results = run(n, "uneven", tmp_path)
    steps = [r["steps"] for r in results]
    assert all(s == steps[0] for s in steps), steps          # lockstep every epoch
    for r in results:
        assert r["wrong_labels"] == 0
    for r in results:
        assert r["in_order"], r                                # nothing lost, nothing repeated
        assert r["remote_representatives"] > 0                 # global sampling reached others
    # The shortest shard sets the epoch: it delivers each of its samples once per
    # epoch; longer shards carry what is left into their next epoch.
    shortest = results[0]
    assert shortest["fresh"] == 4 * shortest["shard"]
    assert steps[0] == [-(-shortest["shard"] // 4)] * 4
    for r in results[1:]:
        assert r["fresh"] == 4 * sum(steps[0])                 # full batches every step


@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), ("0", False),
                                             ("off", False)])
def test_cuda_awareness_can_be_forced_either_way(monkeypatch, value, expected):
    from dali_rehearsal.exchange import cuda_aware_mpi
    monkeypatch.setenv("DALI_REHEARSAL_CUDA_AWARE", value)
    assert cuda_aware_mpi() is expected
