"""The transport of a world of one process.

Every collective completes at once with this process's own data, so code
that runs collective calls (the checkpoint's ``save`` and ``load``) has one
path for one and for several processes. The blocking collectives
(:meth:`~.transport.Transport.barrier`,
:meth:`~.transport.Transport.allgather_bytes`) are the interface's own,
written over :meth:`_iallgather`.
"""

from __future__ import annotations

import numpy as np

from .transport import Transport

__all__ = ["AloneTransport"]


class AloneTransport(Transport):
    """A :class:`~.transport.Transport` of one process."""

    rank, size = 0, 1
    name = "alone"
    timeout = None

    def _iallgather(self, send: np.ndarray, recv: np.ndarray):
        recv[0] = send
        return None

    def _start_exchange(self, sends: dict, recvs: dict, tag: int) -> list:
        return []           # a process exchanges no message with itself (refused before)

    def test(self, handles) -> bool:
        return True
