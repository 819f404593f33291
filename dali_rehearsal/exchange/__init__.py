"""Global sampling across processes: one round protocol, two transports.

- :mod:`.rounds`: :class:`GlobalSampler`, the sampling logic (agreement
  checks, shared-seed draws, rounds, lockstep epoch ends, failure rounds,
  timeouts), written once against the transport interface;
- :mod:`.transport`: the :class:`Transport` interface and
  :func:`make_transport`, which picks the implementation for the
  communicator the user passes;
- :mod:`.mpi`: the mpi4py transport (``comm=MPI.COMM_WORLD``);
- :mod:`.torch`: the torch.distributed transport
  (``comm=torch.distributed.group.WORLD``): gloo, or NCCL for GPU storage;
- :mod:`.collective`: the buffer's other collective calls (``save``,
  ``load``): tagged exchanges that fail together;
- :mod:`.launch`: what the launcher's environment says about the job;
- :mod:`.errors`: :class:`RemoteError`, :class:`MismatchError` and
  :class:`CollectiveMismatchError`.
"""

from .errors import CollectiveMismatchError, MismatchError, RemoteError
from .mpi import cuda_aware_mpi
from .rounds import GlobalSampler, handshake
from .transport import DEFAULT_TIMEOUT, Transport, make_transport

__all__ = ["GlobalSampler", "RemoteError", "MismatchError", "CollectiveMismatchError",
           "cuda_aware_mpi", "Transport",
           "make_transport", "handshake", "DEFAULT_TIMEOUT"]
