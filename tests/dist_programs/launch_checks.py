"""Launch mistakes, run by tests/test_mpi.py and tests/test_torch_dist.py.
Each process writes ``OUT_DIR/<check>-<rank>.json`` (rank from the launcher's
environment).

    torchrun --nproc_per_node=2 tests/dist_programs/launch_checks.py CHECK OUT_DIR
    mpiexec -n 2 python -m mpi4py tests/dist_programs/launch_checks.py CHECK OUT_DIR

Checks:

``mpi_comm_under_torchrun``
    ``comm=MPI.COMM_WORLD`` in a torchrun job: every process is an MPI world
    of one; the buffer must refuse, naming the launch.
``no_comm``
    ``comm=None`` in a multi-process job: a warning, once, on rank 0 only.
``uncaught_before_buffer``
    rank 1 raises before building its buffer; rank 0 builds one (timeout
    120 s) and waits for it. Under ``python -m mpi4py`` the uncaught exception
    aborts the whole job at once.
"""

import json
import os
import sys
import time
import warnings

import numpy as np

CHECK, OUT_DIR = sys.argv[1], sys.argv[2]
RANK = int(os.environ.get("RANK", os.environ.get("PMI_RANK", "0")))


def write(result):
    with open(os.path.join(OUT_DIR, f"{CHECK}-{RANK}.json"), "w") as f:
        json.dump(dict(result, rank=RANK), f)


def mpi_comm_under_torchrun():
    from mpi4py import MPI
    import dali_rehearsal as dr
    try:
        dr.RehearsalBuffer(capacity=4, num_representatives=2, device="cpu", comm=MPI.COMM_WORLD)
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e),
                "mpi_size": MPI.COMM_WORLD.Get_size()}
    return {"error": None}


def no_comm():
    import dali_rehearsal as dr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            buf = dr.RehearsalBuffer(capacity=4, num_representatives=2, device="cpu")
            buf.mix(np.zeros((2, 3)), np.arange(2))
            buf.close()
    return {"warnings": [str(w.message) for w in caught],
            "categories": [w.category.__name__ for w in caught]}


def uncaught_before_buffer():
    from mpi4py import MPI
    import dali_rehearsal as dr
    if MPI.COMM_WORLD.Get_rank() == 1:
        time.sleep(1)
        raise ZeroDivisionError("failed before building the buffer")
    t0 = time.time()
    try:
        dr.RehearsalBuffer(capacity=4, num_representatives=2, device="cpu",
                           comm=MPI.COMM_WORLD, timeout=120)
    except Exception as e:
        return {"error": type(e).__name__, "waited": time.time() - t0}
    return {"error": None}


if __name__ == "__main__":
    write({"mpi_comm_under_torchrun": mpi_comm_under_torchrun, "no_comm": no_comm,
           "uncaught_before_buffer": uncaught_before_buffer}[CHECK]())
