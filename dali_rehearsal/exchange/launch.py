"""What the launcher says about the job: how many processes it started.

Launchers tell each process the size of the job through environment
variables. Comparing that with the communicator the user passes catches a
launch that does not match the communication library: ``torchrun`` starts N
processes, each of which is an MPI world of one, so ``MPI.COMM_WORLD`` has
size 1 in every one of them and global sampling would silently sample each
shard alone.

What is read, in this order (the first that is set and names more than one
process wins):

============================  ==========================================
``WORLD_SIZE`` / ``RANK``     torchrun, torch.distributed's launchers
``OMPI_COMM_WORLD_SIZE``      Open MPI's ``mpirun`` / ``mpiexec``
``PMI_SIZE`` / ``PMI_RANK``   MPICH and Intel MPI (Hydra ``mpiexec``),
                              ``srun --mpi=pmi2``
``MV2_COMM_WORLD_SIZE``       MVAPICH2
``SLURM_STEP_NUM_TASKS``      Slurm ``srun`` (the job step's tasks)
``SLURM_NTASKS``              Slurm ``srun``, only inside a job step
                              (``SLURM_STEP_ID`` set): a batch script
                              has it too, for the tasks it may start
============================  ==========================================

The rank comes from ``RANK``, ``OMPI_COMM_WORLD_RANK``, ``PMI_RANK``,
``MV2_COMM_WORLD_RANK`` or ``SLURM_PROCID`` (the first that is set). The
library reads nothing else from the environment to find the job: the
communicator the user passes decides which processes share samples.
"""

from __future__ import annotations

import os
import warnings

__all__ = ["launched_processes", "launched_rank", "check_world", "warn_unshared",
           "SIZE_VARIABLES", "RANK_VARIABLES"]

#: (variable, launcher) pairs that give the number of processes of the job.
SIZE_VARIABLES = (
    ("WORLD_SIZE", "torchrun / torch.distributed"),
    ("OMPI_COMM_WORLD_SIZE", "Open MPI mpirun"),
    ("PMI_SIZE", "MPICH / Intel MPI mpiexec, srun --mpi=pmi2"),
    ("MV2_COMM_WORLD_SIZE", "MVAPICH2"),
    ("SLURM_STEP_NUM_TASKS", "Slurm srun"),
    ("SLURM_NTASKS", "Slurm srun (inside a job step)"),
)
#: Variables that give this process's rank, in the order they are read.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK",
                  "SLURM_PROCID")
#: Variables that count only inside a job step of Slurm: ``sbatch`` sets
#: ``SLURM_NTASKS`` (and ``SLURM_PROCID=0``) in the batch script itself, a
#: single process that may start the job's tasks with ``srun``.
_STEP_ONLY = ("SLURM_NTASKS", "SLURM_PROCID")


def _in_slurm_step() -> bool:
    return bool(os.environ.get("SLURM_STEP_ID") or os.environ.get("SLURM_STEPID")
                or os.environ.get("SLURM_STEP_NUM_TASKS"))

_warned = False


def launched_processes() -> tuple[int, str] | None:
    """``(processes, variable)`` when the environment says this job has more
    than one process, else None."""
    for name, _ in SIZE_VARIABLES:
        value = os.environ.get(name)
        if not value or (name in _STEP_ONLY and not _in_slurm_step()):
            continue
        try:
            n = int(value)
        except ValueError:
            continue
        if n > 1:
            return n, name
    return None


def launched_rank() -> int | None:
    """This process's rank according to the launcher (None when unknown)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if name in _STEP_ONLY and not _in_slurm_step():
            continue
        if value is not None:
            try:
                return int(value)
            except ValueError:
                continue
    return None


def library_world_size(comm) -> int | None:
    """The size of the whole job as the communication library behind
    ``comm`` sees it (``MPI.COMM_WORLD``, or torch's default group)."""
    if hasattr(comm, "Get_size"):
        try:
            from mpi4py import MPI
            return MPI.COMM_WORLD.Get_size()
        except ImportError:      # an object that looks like a communicator
            return None
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except ImportError:
        pass
    return None


def check_world(comm, size: int) -> None:
    """Raises when ``comm`` has one process but the launcher started several
    and the library behind ``comm`` knows only this one."""
    if size != 1:
        return
    launched = launched_processes()
    if launched is None or library_world_size(comm) != 1:
        return
    n, name = launched
    library = "MPI" if hasattr(comm, "Get_size") else "torch.distributed"
    raise RuntimeError(
        f"comm has a single process, but {name}={n} says this job was launched with {n} "
        f"processes: {library} does not know about the others, so global sampling would "
        "sample each process's shard alone. Launch MPI jobs with mpiexec (or mpirun, srun) "
        "and pass comm=MPI.COMM_WORLD; under torchrun, call "
        "torch.distributed.init_process_group() and pass comm=torch.distributed.group.WORLD; "
        "pass comm=None for independent single-process buffers")


def warn_unshared() -> None:
    """Warns once per process (on rank 0) that a multi-process job builds its
    buffer without a communicator."""
    global _warned
    launched = launched_processes()
    if _warned or launched is None or launched_rank() not in (None, 0):
        return
    _warned = True
    n, name = launched
    warnings.warn(
        f"this job has {n} processes ({name}={n}) but the RehearsalBuffer has comm=None: "
        "each process samples representatives only from its own shard. Pass "
        "comm=MPI.COMM_WORLD (mpiexec) or comm=torch.distributed.group.WORLD (torchrun) for "
        "global sampling, or a comm with sampling='local' to keep shards separate "
        "explicitly", RuntimeWarning, stacklevel=4)
