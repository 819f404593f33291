"""Global sampling on emulated GPUs under ``mpiexec`` (tests/test_exchange_emulated.py).

    DALI_REHEARSAL_CUDA_AWARE=0|1 \
        mpiexec -n 2 python tests/emulation/mpi_exchange.py OUT_DIR [TEETH]

Each rank runs two buffers in lockstep over the same communicator and seeds:
one on ``device="gpu"`` (the emulation: ``mix(stream=s)`` on a non-blocking
stream, the exchange's own stream, staged through pinned memory or passed to
MPI as device buffers when ``DALI_REHEARSAL_CUDA_AWARE=1``), one on the CPU.
Every output row must be equal. Outputs are read only after the last step,
so nothing but the library's own orderings makes step ``t``'s writes
visible to round ``t + 1``'s gathers. ``TEETH=no_event`` removes one of them: the buffer's
write event is not passed to the exchange (defect 3 of issue 8).

Each rank writes ``OUT_DIR/exchange-<rank>.json``.
"""

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # tests/
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))   # the checkout

from emulation import install  # noqa: E402

cp = install()["cupy"]

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import dali_rehearsal as dr  # noqa: E402
from dali_rehearsal.exchange import GlobalSampler  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def ident_batch(step, b):
    ids = rank * 1_000_000 + step * 1000 + np.arange(b, dtype=np.int64)
    images = np.repeat(ids[:, None], 5, axis=1)
    labels = (ids % 7).astype(np.int32)
    logits = (ids / 2.0).astype(np.float64)[:, None].repeat(2, axis=1)
    return images, labels, logits


def main(out_dir, teeth):
    if teeth == "no_event":
        start = GlobalSampler.start

        def start_without_event(self, *, active=True, event=None):
            return start(self, active=active, event=None)
        GlobalSampler.start = start_without_event
    kwargs = dict(capacity=30, num_representatives=6, seed=3, comm=comm, policy="reservoir")
    gpu = dr.RehearsalBuffer(device="gpu", **kwargs)
    cpu = dr.RehearsalBuffer(device="cpu", **kwargs)
    stream = cp.cuda.Stream(non_blocking=True)
    mismatched_steps, checked, remote, outputs = [], 0, 0, []
    for step in range(40):
        batch = ident_batch(step, rank + 2)
        got = gpu.mix(*batch, stream=stream)
        expected = [np.array(a) for a in cpu.mix(*batch)]
        outputs.append((step, got, expected))
        checked += len(expected[0]) - len(batch[0])
        remote += int((cpu.last_origin[:, 0] != rank).sum())
    for step, got, expected in outputs:      # read at the end (see the module doc)
        check(step, got, expected, stream, mismatched_steps)
    result = {"rank": rank, "mismatched_steps": mismatched_steps, "checked": checked,
              "remote": remote, "staged": gpu.sampler.staged}
    gpu.close()
    cpu.close()
    with open(os.path.join(out_dir, f"exchange-{rank}.json"), "w") as f:
        json.dump(result, f)


def check(step, got, expected, stream, mismatched_steps):
    """Reads a step's output on the stream it was mixed on (the user's side)."""
    host = [a.get(stream=stream) for a in got]
    if any(h.shape != e.shape or not np.array_equal(h, e) for h, e in zip(host, expected)):
        mismatched_steps.append(step)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "none")
