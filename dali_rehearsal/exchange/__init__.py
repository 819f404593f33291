"""Global sampling across processes: the round protocol over a transport.

- :mod:`.rounds`: :class:`GlobalSampler`, the sampling logic (shared-seed
  draws, rounds, lockstep epoch ends, error rounds), written once;
- :mod:`.transport`: the :class:`Transport` interface the protocol and the
  checkpoints use, and :func:`make_transport`, which picks an implementation
  for the communicator the user passes;
- :mod:`.mpi`: the mpi4py transport.
"""

from .rounds import GlobalSampler, RemoteError, cuda_aware_mpi
from .transport import Transport, make_transport

__all__ = ["GlobalSampler", "RemoteError", "cuda_aware_mpi", "Transport", "make_transport"]
