"""Global sampling between emulated GPUs on two processes, row for row against
CPU buffers run in lockstep (tests/emulation/exchange_program.py):

- over mpi4py (``mpiexec -n 2``), staged through pinned host memory, and
  CUDA-aware (the emulated device arrays handed to MPI);
- over torch.distributed with a gloo group (two processes with torchrun's
  environment), staged through pinned host memory. The NCCL path cannot run
  here: it needs one real GPU per process (NCCL moves the memory itself);
- the DALI stage with global sampling (GPU and CPU stages in lockstep);
- the exchange program of the ``gpu`` tests (what the GPU validation runs).

Each MPI run also saves both buffers half way (a collective ``save``), and new
buffers ``load`` the saves and go on. Teeth: the write event the buffer passes
to the exchange removed (defect 3 of issue 8), and the staged rows' ``ready``
event not waited for; each makes rows differ.
"""

from pathlib import Path

import pytest

from dist_programs.launching import launch, output, read_results

pytestmark = pytest.mark.gpu_emulated

PROGRAM = Path(__file__).parent / "emulation" / "exchange_program.py"
TIMEOUT = 240

def MPI_PATHS(test):
    return pytest.mark.mpi(pytest.mark.parametrize(
        "cuda_aware", ["0", "1"], ids=["staged", "cuda-aware"])(test))


def run(tmp_path, *, transport="mpi", cuda_aware="0", teeth="none", read="end"):
    if transport == "mpi":
        done = launch("mpiexec", 2, [PROGRAM, tmp_path, teeth, read], timeout=TIMEOUT,
                      extra_env={"DALI_REHEARSAL_CUDA_AWARE": cuda_aware})
    else:
        done = launch("spawn", 2, [PROGRAM, tmp_path, teeth, read], timeout=TIMEOUT,
                      extra_env={"DR_EMU_TRANSPORT": "torch"})
    results = read_results(tmp_path, "exchange", 2)
    assert set(results) == {0, 1} and all(p.returncode == 0 for p in done), output(done)
    return list(results.values())


def check_path(r, *, staged, name):
    assert r["transport_name"] == name
    assert r["staged"] is staged and r["device_buffers"] is (not staged)
    # what the transport was given: pinned host rows, or the device arrays themselves
    assert r["kinds"] == (["pinned"] if staged else ["device"]), r["kinds"]
    assert r["write_events"] >= 30                  # every step orders the next round
    # received rows are unpacked (staged: uploaded) on the exchange's stream,
    # and arrive behind an event
    assert r["ready_events"] > 20


@MPI_PATHS
def test_mpi_exchange_between_emulated_gpus_matches_the_cpu(tmp_path, cuda_aware):
    for r in run(tmp_path, cuda_aware=cuda_aware):
        check_path(r, staged=cuda_aware == "0", name="mpi")
        assert r["checked"] > 150 and r["remote"] > 0 and r["checkpointed"]
        assert r["mismatched_steps"] == [], r


@pytest.mark.torchrun
@pytest.mark.parametrize("read", ["end", "each"])
def test_torch_gloo_exchange_between_emulated_gpus_matches_the_cpu(tmp_path, read):
    """The torch.distributed transport's GPU path without NCCL: CuPy shards,
    a gloo group, rows staged through pinned host memory."""
    for r in run(tmp_path, transport="torch", read=read):
        check_path(r, staged=True, name="torch-gloo")
        assert r["checked"] > 150 and r["remote"] > 0
        assert r["mismatched_steps"] == [], r


@pytest.mark.mpi
def test_staged_rows_read_at_once_match_the_cpu(tmp_path):
    """Each step's output read right after the step (the counterpart of the
    ``ready`` teeth below)."""
    for r in run(tmp_path, read="each"):
        check_path(r, staged=True, name="mpi")
        assert r["mismatched_steps"] == [], r


@MPI_PATHS
def test_teeth_exchange_without_the_write_event_serves_stale_rows(tmp_path, cuda_aware):
    """Defect 3 put back: the exchange's gathers (and, CUDA-aware, its
    receives) not ordered after the buffer's writes on the mixing stream."""
    results = run(tmp_path, cuda_aware=cuda_aware, teeth="no_event")
    for r in results:
        assert r["write_events"] >= 30        # the event existed and was dropped
    assert any(r["mismatched_steps"] for r in results), results


@MPI_PATHS
def test_teeth_rows_copied_without_waiting_for_their_unpacking(tmp_path, cuda_aware):
    """The ``ready`` event not waited for: the step copies the received rows
    before the exchange stream has unpacked (staged: uploaded) them, and gets
    the previous round's. (Each step's output is read at once; the exchange's
    next round would otherwise run the uploads first. Whether the progress
    thread gets there first is timing: some steps, not all, show it.)"""
    results = run(tmp_path, cuda_aware=cuda_aware, teeth="no_ready", read="each")
    for r in results:
        assert r["ready_events"] > 20
    assert any(r["mismatched_steps"] for r in results), results


@pytest.mark.torchrun
def test_torch_save_after_another_buffer_over_the_same_group_was_closed(tmp_path):
    """Two buffers over one torch.distributed group (CPU: this is not about the
    GPU path): the first is closed, then the second is saved three times.
    Each transport gets process groups of its own; torch names a group over a
    subset of the ranks after the number of live groups, so a name would repeat
    once a group is destroyed (and meet the old group's keys in the store):
    over the whole world the exchange uses torch's ever-growing counter."""
    done = launch("spawn", 2, [PROGRAM, tmp_path], timeout=TIMEOUT,
                  extra_env={"DR_EMU_TRANSPORT": "torch",
                             "DR_EMU_SCENARIO": "save_after_closing_another_buffer"})
    results = read_results(tmp_path, "exchange", 2)
    assert set(results) == {0, 1}, output(done)
    errors = [r["error"] for r in results.values()]
    assert errors == [None, None], errors


# ------------------------------------------------------------------ the stage with global sampling

def write_images(folder):
    """27 tiny grayscale PNGs whose pixels name them, and their labels."""
    import json

    import numpy as np
    from PIL import Image
    folder.mkdir()
    names = []
    for i in range(27):
        Image.fromarray(np.full((4, 4), i * 9 % 256, np.uint8)).save(folder / f"{i:03d}.png")
        names.append([f"{i:03d}.png", i % 5])
    (folder / "labels.json").write_text(json.dumps(names))


def run_stages(tmp_path, source_kind, *, cuda_aware="0", prepare_ahead=0):
    if source_kind == "reader":
        write_images(tmp_path / "images")
    done = launch("mpiexec", 2, [PROGRAM, tmp_path, prepare_ahead, "none", source_kind],
                  timeout=TIMEOUT, extra_env={"DALI_REHEARSAL_CUDA_AWARE": cuda_aware,
                                              "DR_EMU_SCENARIO": "stage"})
    results = read_results(tmp_path, "exchange", 2)
    assert set(results) == {0, 1} and all(p.returncode == 0 for p in done), output(done)
    return [results[0], results[1]]


@pytest.mark.mpi
@pytest.mark.parametrize("cuda_aware, prepare_ahead", [("0", 0), ("1", 2)],
                         ids=["staged-without-worker", "cuda-aware-with-worker"])
def test_stage_with_global_sampling_on_emulated_gpus_matches_the_cpu(tmp_path, cuda_aware,
                                                                     prepare_ahead):
    """``dr.fn.rehearsal`` on the GPU with global sampling, on two processes
    whose reader shards differ in length (10 and 17 PNGs): every batch equals
    the CPU stage's, and every process ends its epochs at the same step."""
    results = run_stages(tmp_path, "reader", cuda_aware=cuda_aware,
                         prepare_ahead=prepare_ahead)
    for r in results:
        assert r["staged"] is (cuda_aware == "0")
        assert r["mismatched_steps"] == [] and r["close_errors"] == [], r
        assert r["events"] >= 20 and r["steps_with_representatives"] > 10
        assert r["write_events"] >= 20
    assert results[0]["epoch_steps"] == results[1]["epoch_steps"]
    assert len(results[0]["epoch_steps"]) >= 3


@pytest.mark.mpi
def test_stage_with_readerless_sources_of_equal_length(tmp_path):
    """Sources without a reader (their epochs end with StopIteration), as
    long on every process."""
    results = run_stages(tmp_path, "readerless-equal", cuda_aware="1", prepare_ahead=2)
    for r in results:
        assert r["mismatched_steps"] == [] and r["close_errors"] == [], r
    assert results[0]["epoch_steps"] == results[1]["epoch_steps"] == [5, 5, 5, 5]


@pytest.mark.mpi
def test_readerless_sources_of_different_lengths_end_their_epochs_together(tmp_path):
    """Sources without a reader (their epoch ends when they raise StopIteration)
    of different lengths on the two processes: the process whose source ends
    first learns it only when it builds its next step, so the stage opens that
    step's round only then, and every process ends its epoch at the same step."""
    results = run_stages(tmp_path, "readerless-unequal")
    for r in results:
        assert r["mismatched_steps"] == [], r        # the GPU stage still equals the CPU's
    assert results[0]["epoch_steps"] == results[1]["epoch_steps"], \
        [r["epoch_steps"] for r in results]


# ------------------------------------------------------------------ the gpu tests' programs

RUNNER = Path(__file__).parent / "emulation" / "run_emulated.py"
SCENARIOS = Path(__file__).parent / "dist_programs" / "global_sampling.py"


@pytest.mark.parametrize("path", [
    pytest.param(("mpiexec", "0"), marks=pytest.mark.mpi, id="mpi-staged"),
    pytest.param(("mpiexec", "1"), marks=pytest.mark.mpi, id="mpi-cuda-aware"),
    pytest.param(("spawn", None), marks=pytest.mark.torchrun, id="torch-gloo-staged")])
def test_the_gpu_tests_exchange_program_runs_on_the_emulation(tmp_path, path):
    """The scenario that ``tests/test_mpi.py`` and ``tests/test_torch_dist.py``
    run with CuPy buffers on a GPU machine (and the GPU validation with them),
    run here on the emulation with the same checks: every representative an
    earlier sample with its own label and extras."""
    launcher, cuda_aware = path
    env = {"DR_TEST_DEVICE": "gpu"}
    if launcher == "mpiexec":
        env.update(DR_TEST_TRANSPORT="mpi", DALI_REHEARSAL_CUDA_AWARE=cuda_aware)
    else:
        env.update(DR_TEST_TRANSPORT="torch", DR_TEST_TORCH_BACKEND="gloo",
                   DR_EMU_TORCH_CUDA="1")
    done = launch(launcher, 2, [RUNNER, SCENARIOS, "pairing", tmp_path], timeout=TIMEOUT,
                  extra_env=env)
    results = read_results(tmp_path, "pairing", 2)
    assert set(results) == {0, 1}, output(done)
    staged = cuda_aware != "1"
    for r in results.values():
        assert r["checked"] > 200 and r["remote"] > 0 and r["mispaired"] == 0, r
        assert r["staged"] is staged and r["device_buffers"] is (not staged)
        assert r["transport_name"] == ("mpi" if launcher == "mpiexec" else "torch-gloo")
