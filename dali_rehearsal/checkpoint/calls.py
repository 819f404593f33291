"""The collective calls of checkpoints (``save``, ``load``) over one code path
for one and for several processes.

A call runs as steps of a :class:`~dali_rehearsal.exchange.collective.Channel`
(every process does its part, then learns how it went everywhere). On
several processes the channel is the buffer's exchange's
(:func:`~dali_rehearsal.exchange.collective.open_channel`); a single process
gets a channel over :class:`AloneTransport`, the transport of a world of one
process, so the checkpoint code does not tell the two apart.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..exchange.collective import Channel, open_channel
from ..exchange.rounds import LOAD, SAVE
from ..exchange.transport import Transport

__all__ = ["AloneTransport", "open_call"]


class AloneTransport(Transport):
    """A :class:`~dali_rehearsal.exchange.Transport` for a world of one
    process: every collective completes at once, with this process's data.
    The blocking collectives (:meth:`barrier`, :meth:`allgather_bytes`) are
    the interface's own, written over these."""

    rank, size = 0, 1
    name = "alone"
    timeout = None

    def _iallgather(self, send: np.ndarray, recv: np.ndarray):
        recv[0] = send
        return None

    def _ialltoallv(self, send, send_counts, recv, recv_counts):
        n = int(send_counts[0])
        if n != int(recv_counts[0]):
            raise ValueError(f"an all-to-all of one process sends {n} bytes but receives "
                             f"{int(recv_counts[0])}")
        recv[:n] = send[:n]
        return None

    def test(self, handles) -> bool:
        return True


@contextlib.contextmanager
def open_call(core, call: str):
    """The :class:`Channel` of the collective call ``call`` (``"save"`` or
    ``"load"``) of the buffer whose step object is ``core``."""
    what = f"{call}()"
    if core.comm is None or core.world_size == 1:
        yield Channel(AloneTransport(), what)
        return
    with open_channel(core, SAVE if call == "save" else LOAD, what) as channel:
        yield channel
