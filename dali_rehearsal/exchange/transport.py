"""The transport interface: what global sampling and collective checkpoints
need from a communication library.

A transport wraps the communicator the user passes (``comm=``) and works on
its own duplicate of it, so that its messages never interleave with the
training's own collectives.
"""

from __future__ import annotations

__all__ = ["Transport", "make_transport"]


class Transport:
    """Blocking collectives over a private duplicate of the user's communicator.

    Every process of the communicator must call each collective, in the same
    order.
    """

    #: This process's rank and the number of processes.
    rank: int
    size: int

    def barrier(self) -> None:
        raise NotImplementedError

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every process's ``data``, in rank order (small metadata only)."""
        raise NotImplementedError

    def close(self) -> None:
        """Frees the duplicate communicator; idempotent."""


def make_transport(comm) -> Transport:
    """The transport for ``comm`` (an mpi4py communicator)."""
    from .mpi import MPITransport
    if hasattr(comm, "Get_rank") and hasattr(comm, "Dup"):
        return MPITransport(comm)
    raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
