"""The mpi4py transport: non-blocking collectives and point-to-point messages
on a duplicate communicator."""

from __future__ import annotations

import ctypes
import os

from .transport import DEFAULT_TIMEOUT, Transport

__all__ = ["MPITransport", "cuda_aware_mpi"]

_ENV_CUDA_AWARE = "DALI_REHEARSAL_CUDA_AWARE"


def cuda_aware_mpi() -> bool:
    """Whether the MPI library mpi4py uses accepts CUDA device buffers.

    ``DALI_REHEARSAL_CUDA_AWARE=1`` or ``0`` overrides the detection, which
    asks the library itself (Open MPI's ``MPIX_Query_cuda_support``, MPICH's
    ``MPIX_GPU_query_support``) and answers False when it cannot tell.
    """
    env = os.environ.get(_ENV_CUDA_AWARE)
    if env is not None:
        return env.strip().lower() in ("1", "true", "yes", "on")
    try:
        from mpi4py import MPI
        lib = ctypes.CDLL(MPI.__file__)
    except (ImportError, OSError):
        return False
    query = getattr(lib, "MPIX_Query_cuda_support", None)      # Open MPI
    if query is not None:
        query.restype = ctypes.c_int
        return bool(query())
    query = getattr(lib, "MPIX_GPU_query_support", None)       # MPICH >= 4
    if query is not None:
        supported = ctypes.c_int(0)
        if query(ctypes.c_int(0), ctypes.byref(supported)) == 0:   # MPIX_GPU_SUPPORT_CUDA
            return bool(supported.value)
    return False


class MPITransport(Transport):
    """Collectives over a duplicate (``Idup``) of an mpi4py communicator.

    Device buffers are handed to MPI only when the library is CUDA-aware
    (``device_buffers=None`` asks :func:`cuda_aware_mpi`). The progress thread
    needs ``MPI_THREAD_MULTIPLE`` (mpi4py's default); without it
    :attr:`threaded` is False and the exchange runs in the caller's thread.
    """

    name = "mpi"

    def __init__(self, comm, *, timeout: float | None = DEFAULT_TIMEOUT,
                 device_buffers: bool | None = False, purpose: str | None = None):
        from mpi4py import MPI
        self._MPI = MPI
        self.timeout = timeout
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())
        self.threaded = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self.device_buffers = (cuda_aware_mpi() if device_buffers is None
                               else bool(device_buffers))
        # Non-blocking duplicate: a process that never arrives (it failed before
        # building its buffer) ends in a RemoteError after the timeout, not a hang.
        self.comm = None
        dup, request = comm.Idup()
        self.wait([request], "the other processes to create their exchange communicator"
                  + (f" for {purpose}" if purpose else ""))
        self.comm = dup

    def _iallgather(self, send, recv):
        return [self.comm.Iallgather(send, recv)]

    def _isend(self, data, peer, tag):
        return [self.comm.Isend([data, self._MPI.BYTE], dest=peer, tag=tag)]

    def _irecv(self, data, peer, tag):
        return [self.comm.Irecv([data, self._MPI.BYTE], source=peer, tag=tag)]

    def test(self, handles) -> bool:
        return bool(self._MPI.Request.Testall(list(handles)))

    def close(self, *, broken: bool = False) -> None:
        comm, self.comm = self.comm, None
        if comm is None:
            return
        try:
            # Legal with pending operations too: MPI frees it once they end.
            comm.Free()
        except Exception:   # MPI already finalized at interpreter exit
            pass
