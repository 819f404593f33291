"""How the library finds the job it runs in, and jobs launched as on several
nodes: ``mpiexec`` with a host file (two hosts of one slot each, so that MPI
treats the ranks as on different nodes), and ``torchrun --nnodes=2`` with a
c10d rendezvous, two launchers on loopback. Slurm's ``srun`` cannot run here:
its environment is checked against what the library reads. Every launch is
bounded; a hang fails the test."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_programs.launching import ROOT, _kill, env, free_port, output, read_results

PROGRAM = Path(__file__).parent / "dist_programs" / "multinode.py"
BOUND = 300

ALL_VARIABLES = ("WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                 "PMI_SIZE", "PMI_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK",
                 "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID",
                 "SLURM_STEPID", "SLURM_NPROCS")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ------------------------------------------------------------------ environment
def test_every_launcher_variable_is_documented(clean_env):
    from dali_rehearsal.exchange import launch
    names = [n for n, _ in launch.SIZE_VARIABLES] + list(launch.RANK_VARIABLES)
    for name in names:
        assert f"``{name}``" in launch.__doc__, name
    text = (ROOT / "docs" / "scaling.md").read_text()
    for name in names:
        assert f"`{name}`" in text, name


def test_srun_tasks_are_a_job_of_several_processes(clean_env):
    """What ``srun -N 2 --ntasks-per-node=2 python train.py`` gives each task
    (Slurm sets SLURM_STEP_NUM_TASKS and SLURM_PROCID per task)."""
    from dali_rehearsal.exchange import launch
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "4")
    clean_env.setenv("SLURM_STEP_ID", "0")
    clean_env.setenv("SLURM_PROCID", "3")
    assert launch.launched_processes() == (4, "SLURM_STEP_NUM_TASKS")
    assert launch.launched_rank() == 3


def test_a_job_step_without_step_num_tasks_counts_slurm_ntasks(clean_env):
    from dali_rehearsal.exchange import launch
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_STEP_ID", "2")
    clean_env.setenv("SLURM_PROCID", "5")
    assert launch.launched_processes() == (8, "SLURM_NTASKS")
    assert launch.launched_rank() == 5


def test_a_batch_script_is_one_process(clean_env):
    """``sbatch --ntasks=8`` sets SLURM_NTASKS=8 and SLURM_PROCID=0 in the
    batch script, one process that has not started the tasks: no job of 8."""
    from dali_rehearsal.exchange import launch
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_NPROCS", "8")
    clean_env.setenv("SLURM_PROCID", "0")
    assert launch.launched_processes() is None
    assert launch.launched_rank() is None


def test_the_launchers_own_variables_come_before_slurms(clean_env):
    """``srun`` starting ``torchrun`` (one agent per node): the agent's
    workers see torchrun's WORLD_SIZE and RANK, and Slurm's per-node task."""
    from dali_rehearsal.exchange import launch
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "2")
    clean_env.setenv("SLURM_STEP_ID", "0")
    clean_env.setenv("SLURM_PROCID", "1")
    clean_env.setenv("WORLD_SIZE", "16")
    clean_env.setenv("RANK", "9")
    assert launch.launched_processes() == (16, "WORLD_SIZE")
    assert launch.launched_rank() == 9
    clean_env.setenv("PMI_SIZE", "1")             # an MPI singleton inside the worker
    assert launch.launched_processes() == (16, "WORLD_SIZE")


def test_srun_with_an_mpi_world_of_one_is_refused(clean_env):
    """Tasks started by ``srun`` without an MPI plugin that matches the MPI
    library are each an MPI world of one: the buffer refuses, naming srun's
    variable, instead of sampling each shard alone."""
    from mpi4py import MPI
    import dali_rehearsal as dr
    if MPI.COMM_WORLD.Get_size() != 1:
        pytest.skip("runs in a single process")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "4")
    clean_env.setenv("SLURM_STEP_ID", "0")
    clean_env.setenv("SLURM_PROCID", "0")
    with pytest.raises(RuntimeError, match="SLURM_STEP_NUM_TASKS=4 says this job was launched "
                                           "with 4 processes"):
        dr.RehearsalBuffer(capacity=4, num_representatives=1, device="cpu",
                           comm=MPI.COMM_WORLD)


# ------------------------------------------------------------------ launches
def _check(results, n):
    assert set(results) == set(range(n))
    for r in results.values():
        assert r["size"] == n
        assert r["checked"] > 100 and r["mispaired"] == 0 and r["repeated"] == 0, r
        assert r["remote"] > 0, r              # rows of the other "node" reached this one
        assert r["rounds"] >= 40


@pytest.mark.mpi
@pytest.mark.parametrize("form", ["host-file", "host-list"])
def test_mpiexec_with_two_hosts(form, tmp_path):
    """``mpiexec -n 2 -f hosts`` with two host lines (``localhost:1`` and
    ``127.0.0.1:1``), or ``mpiexec -n 2 -hosts localhost:1,127.0.0.1:1``:
    Hydra starts one rank per host, each the only rank of its host
    (``MPI_LOCALNRANKS=1``), as on two nodes."""
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    if "HYDRA" not in version:
        pytest.skip("a host file in Hydra's format needs MPICH's mpiexec")
    if form == "host-file":
        hosts = tmp_path / "hosts"
        hosts.write_text("localhost:1\n127.0.0.1:1\n")
        where = ["-f", str(hosts)]
    else:
        where = ["-hosts", "localhost:1,127.0.0.1:1"]
    cmd = [mpiexec, "-n", "2", *where, sys.executable, str(PROGRAM), "mpi", str(tmp_path)]
    done = _run([cmd], [env()])
    results = read_results(tmp_path, "multinode", 2)
    assert done[0].returncode == 0, output(done)
    _check(results, 2)
    for r in results.values():
        assert r["local_size"] == 1, r         # one rank per host
        assert r["launched"] == [2, "PMI_SIZE"] and r["launched_rank"] == r["rank"]


@pytest.mark.torchrun
def test_torchrun_two_nodes_with_a_c10d_rendezvous(tmp_path):
    """Two ``torchrun --nnodes=2 --node_rank=K --nproc_per_node=1
    --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT`` launchers, as on two
    nodes: global sampling over torch.distributed (gloo) across them."""
    port = free_port()
    cmds, envs = [], []
    for node in range(2):
        cmds.append([sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                     f"--node_rank={node}", "--nproc_per_node=1", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=dali-rehearsal-test",
                     "--monitor-interval=0.2", str(PROGRAM), "torch", str(tmp_path)])
        envs.append(env())
    done = _run(cmds, envs)
    results = read_results(tmp_path, "multinode", 2)
    assert all(p.returncode == 0 for p in done), output(done)
    _check(results, 2)
    for r in results.values():
        assert r["local_size"] == 1, r         # one worker per "node"
        assert r["launched"] == [2, "WORLD_SIZE"] and r["launched_rank"] == r["rank"]


def _run(cmds, envs) -> list[subprocess.CompletedProcess]:
    """Starts every command at once (each in its own session); all must end
    within BOUND seconds, or every one is killed and the test fails."""
    procs = [subprocess.Popen(c, env=e, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for c, e in zip(cmds, envs)]
    done, deadline = [], time.monotonic() + BOUND
    try:
        for p, c in zip(procs, cmds):
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(c, p.returncode, out, ""))
    except subprocess.TimeoutExpired:
        _kill(procs)
        pytest.fail(f"{' '.join(cmds[0][:4])} ... hung (> {BOUND} s)")
    finally:
        _kill(procs)
    return done
