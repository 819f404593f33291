"""What is particular to the mpi4py transport: launches that do not match,
``python -m mpi4py``, MPI without ``MPI_THREAD_MULTIPLE``, GPU buffers staged
or CUDA-aware. The sampling guarantees themselves are tested over both
transports in tests/test_global_sampling.py."""

import time
from pathlib import Path

import pytest

from dist_programs.launching import launch, output, read_results
from utils import require_mpiexec

pytestmark = pytest.mark.mpi

HERE = Path(__file__).parent / "dist_programs"
PROGRAM = HERE / "global_sampling.py"
CHECKS = HERE / "launch_checks.py"


@pytest.mark.torchrun
def test_torchrun_with_an_mpi_comm_raises_a_clear_error(tmp_path):
    """torchrun starts processes that are each an MPI world of one: a buffer
    given MPI.COMM_WORLD there must refuse instead of sampling each shard alone."""
    done = launch("torchrun", 2, [CHECKS, "mpi_comm_under_torchrun", tmp_path], timeout=300)
    results = read_results(tmp_path, "mpi_comm_under_torchrun", 2)
    assert set(results) == {0, 1}, output(done)
    for r in results.values():
        assert r["mpi_size"] == 1
        assert r["error"] == "RuntimeError", r
        assert "comm has a single process, but WORLD_SIZE=2 says this job was launched with 2 " \
               "processes" in r["message"], r
        assert "comm=torch.distributed.group.WORLD" in r["message"]


def test_python_m_mpi4py_aborts_the_job_when_a_rank_fails_before_its_buffer(tmp_path):
    """Rank 1 raises before building its buffer, so it never joins the exchange.
    Under ``python -m mpi4py`` its uncaught exception aborts every rank at once,
    long before rank 0's timeout (120 s) would end its wait."""
    require_mpiexec()
    t0 = time.monotonic()
    done = launch("mpiexec", 2, [CHECKS, "uncaught_before_buffer", tmp_path], timeout=300,
                  python_args=("-m", "mpi4py"))
    elapsed = time.monotonic() - t0
    assert done[0].returncode != 0
    assert "ZeroDivisionError: failed before building the buffer" in output(done)
    assert read_results(tmp_path, "uncaught_before_buffer", 2) == {}    # nobody got to the end
    assert elapsed < 90, elapsed


def test_without_thread_multiple_the_exchange_runs_in_the_callers_thread(tmp_path):
    """MPI initialised with MPI_THREAD_FUNNELED: no progress thread (a warning
    says so), the same guarantees."""
    require_mpiexec()
    done = launch("mpiexec", 2, [PROGRAM, "pairing", tmp_path], timeout=300,
                  extra_env={"DR_TEST_TRANSPORT": "mpi", "DR_TEST_MPI_THREAD": "funneled"})
    results = read_results(tmp_path, "pairing", 2)
    assert set(results) == {0, 1}, output(done)
    for r in results.values():
        assert r["threaded"] is False
        assert r["checked"] > 200 and r["mispaired"] == 0 and r["remote"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_aware", ["0", "1"], ids=["staged", "cuda-aware"])
def test_gpu_buffers_exchange_their_samples(cuda_aware, tmp_path):
    """CuPy shards (several ranks may share one GPU): staged through pinned host
    memory, or passed to MPI directly when the library is CUDA-aware."""
    require_mpiexec()
    from dali_rehearsal.exchange import cuda_aware_mpi
    if cuda_aware == "1" and not cuda_aware_mpi():
        pytest.skip("this MPI library is not CUDA-aware")
    done = launch("mpiexec", 2, [PROGRAM, "pairing", tmp_path], timeout=300,
                  extra_env={"DR_TEST_TRANSPORT": "mpi", "DR_TEST_DEVICE": "gpu",
                             "DALI_REHEARSAL_CUDA_AWARE": cuda_aware})
    results = read_results(tmp_path, "pairing", 2)
    assert set(results) == {0, 1}, output(done)
    for r in results.values():
        assert r["checked"] > 200 and r["remote"] > 0 and r["mispaired"] == 0
        assert r["staged"] is (cuda_aware == "0")
        assert r["device_buffers"] is (cuda_aware == "1")


@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), ("0", False),
                                             ("off", False)])
def test_cuda_awareness_can_be_forced_either_way(monkeypatch, value, expected):
    from dali_rehearsal.exchange import cuda_aware_mpi
    monkeypatch.setenv("DALI_REHEARSAL_CUDA_AWARE", value)
    assert cuda_aware_mpi() is expected
