"""Where representatives come from: the local shard, or every process's shard.

A sampler serves the buffer in rounds, one round per training step:
``start(active=...)`` opens the round for the next step, ``finish()`` returns
its representatives (or ``None`` when some process has ended its epoch, so
that every process ends the epoch at the same step). The buffer inserts the
step's fresh samples only after ``finish()``, so representatives always come
from what was stored before the batch that uses them.

:class:`LocalSampler` draws from this process's shard, synchronously.
:class:`~dali_rehearsal.exchange.GlobalSampler` draws from the union of all
shards over MPI, in a background thread.
"""

from __future__ import annotations

import numpy as np

from .kernels import copy_rows, gather_rows

__all__ = ["Representatives", "LocalSampler"]


class Representatives:
    """The representatives of one step, ready to be written into the output.

    Either ``slots`` into the local storage (gathered on write) or ``rows``,
    one array per field holding the received samples.
    """

    def __init__(self, count: int, *, slots=None, rows=None, origin=None):
        self.count = int(count)
        self.slots = slots
        self.rows = rows
        self.origin = origin      # (rank, slot) pairs, for tests and diagnostics

    def write_into(self, buffer, out, offset: int, stream=None) -> None:
        if self.count == 0:
            return
        if self.rows is None:
            index = buffer._backend.asarray(self.slots, stream)
            for src, dst in zip(buffer._storage, out):
                gather_rows(src, index, dst, dst_offset=offset, stream=stream)
        else:
            for src, dst in zip(self.rows, out):
                copy_rows(src[: self.count], dst, dst_offset=offset, stream=stream)


class LocalSampler:
    """Uniform sampling without replacement from this process's shard."""

    is_global = False

    def __init__(self, buffer, rng: np.random.Generator):
        self._buffer = buffer
        self._rng = rng
        self._active: bool | None = None

    @property
    def started(self) -> bool:
        return self._active is not None

    def start(self, *, active: bool = True) -> None:
        self._active = bool(active)

    def finish(self) -> Representatives | None:
        active, self._active = self._active, None
        if active is None:
            raise RuntimeError("finish() called before start()")
        if not active:
            return None
        size = self._buffer.size
        k = min(self._buffer.num_representatives, size)
        slots = np.sort(self._rng.choice(size, size=k, replace=False)).astype(np.int64)
        return Representatives(k, slots=slots,
                               origin=np.stack([np.full(k, self._buffer.rank, np.int64), slots],
                                               axis=1))

    def abort(self) -> None:
        """Called when a step fails; nothing to tell other processes here."""
        self._active = None

    def close(self) -> None:
        self._active = None
