"""The mpi4py transport."""

from __future__ import annotations

import numpy as np

from .transport import Transport

__all__ = ["MPITransport"]


class MPITransport(Transport):
    """Collectives over a duplicate of an mpi4py communicator."""

    def __init__(self, comm):
        from mpi4py import MPI
        self._MPI = MPI
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def barrier(self) -> None:
        self.comm.Barrier()

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        mine = np.frombuffer(bytes(data), dtype=np.uint8)
        lengths = np.empty(self.size, dtype=np.int64)
        self.comm.Allgather(np.array([len(mine)], dtype=np.int64), lengths)
        displs = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        out = np.empty(int(lengths.sum()), dtype=np.uint8)
        self.comm.Allgatherv(mine, [out, (lengths, displs), self._MPI.BYTE])
        return [out[d:d + n].tobytes() for d, n in zip(displs, lengths)]

    def close(self) -> None:
        if self.comm is not None:
            self.comm.Free()
            self.comm = None
