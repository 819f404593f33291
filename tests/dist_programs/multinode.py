"""Global sampling in a job launched as if on several nodes, run by
tests/test_launch.py. Each process writes ``OUT_DIR/multinode-<rank>.json``.

    mpiexec -n 2 -f HOSTFILE python tests/dist_programs/multinode.py mpi OUT_DIR
    torchrun --nnodes=2 --node_rank=K --nproc_per_node=1 --rdzv-backend=c10d \\
        --rdzv-endpoint=127.0.0.1:PORT tests/dist_programs/multinode.py torch OUT_DIR

Only the public API: ``RehearsalBuffer(comm=...)``, ``mix``, ``last_origin``,
``exchange_stats``. Every rank feeds batches whose content names them (image
rows repeat an id = rank * 1e6 + step * 1000 + i, label = id % 7) and checks
every representative: an earlier sample of some rank with its own label, at
the (rank, slot) ``last_origin`` names, no (rank, slot) twice in a step.
"""

import json
import os
import sys

import numpy as np

TRANSPORT, OUT_DIR = sys.argv[1], sys.argv[2]
STEPS, B, R = 40, 3, 5

if TRANSPORT == "mpi":
    from mpi4py import MPI
    COMM = MPI.COMM_WORLD
    RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
    LOCAL = int(os.environ.get("MPI_LOCALNRANKS", "0"))          # Hydra: ranks on this host
else:
    import datetime

    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))
    COMM = dist.group.WORLD
    RANK, SIZE = dist.get_rank(), dist.get_world_size()
    LOCAL = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))

import dali_rehearsal as dr  # noqa: E402
from dali_rehearsal.exchange.launch import launched_processes, launched_rank  # noqa: E402

buf = dr.RehearsalBuffer(capacity=25, num_representatives=R, device="cpu", seed=4, comm=COMM,
                         policy="reservoir", timeout=120)
checked = mispaired = remote = repeated = 0
stored_by = {}                  # id -> step it was fed in (on the rank that fed it)
for step in range(STEPS):
    ids = RANK * 1_000_000 + step * 1000 + np.arange(B, dtype=np.int64)
    images = np.repeat(ids[:, None], 4, axis=1)
    labels = (ids % 7).astype(np.int64)
    out_images, out_labels = buf.mix(images, labels)
    assert (out_images[:B] == images).all() and (out_labels[:B] == labels).all()
    reps, rep_labels = out_images[B:, 0], out_labels[B:]
    origin = buf.last_origin
    ok = ((out_images[B:] == reps[:, None]).all(axis=1) & (rep_labels == reps % 7)
          & ((reps % 1_000_000) // 1000 < step) & (reps // 1_000_000 < SIZE)
          & (origin[:, 0] == reps // 1_000_000))
    checked += len(reps)
    mispaired += int((~ok).sum())
    remote += int((reps // 1_000_000 != RANK).sum())
    if len({tuple(o) for o in origin.tolist()}) != len(origin):
        repeated += 1
stats = buf.exchange_stats()
buf.close()
result = {"rank": RANK, "size": SIZE, "local_size": LOCAL, "checked": checked,
          "mispaired": mispaired, "remote": remote, "repeated": repeated,
          "rounds": stats["rounds"], "launched": launched_processes(),
          "launched_rank": launched_rank()}
tmp = os.path.join(OUT_DIR, f"multinode-{RANK}.json.tmp")
with open(tmp, "w") as f:
    json.dump(result, f)
os.replace(tmp, os.path.join(OUT_DIR, f"multinode-{RANK}.json"))
if TRANSPORT != "mpi":
    dist.destroy_process_group()
