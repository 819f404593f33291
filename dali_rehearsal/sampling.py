"""Where representatives come from: the local shard, or every process's shard.

A sampler serves the buffer in rounds, one round per training step:
``start(active=..., event=...)`` opens the round for the next step,
``finish()`` returns its representatives (or ``None`` when some process has
ended its epoch, so that every process ends the epoch at the same step). The
buffer inserts the step's fresh samples only after ``finish()``, so
representatives always come from what was stored before the batch that uses
them.

The interface a sampler offers the buffer (:class:`Sampler`) is small:
``rank``, ``world_size``, ``is_global``, ``rng``, ``started``, ``start``,
``finish``, ``settle`` (wait until nothing reads the store in the
background), ``abort``, ``close``, ``state_dict`` and ``load_state_dict``. A
sampler reads from the buffer only its public state: ``size``,
``num_representatives``, ``spec``, ``store`` and ``backend``.

:class:`LocalSampler` draws from this process's shard, synchronously.
:class:`~dali_rehearsal.exchange.GlobalSampler` draws from the union of all
shards, in a background thread.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["Representatives", "Sampler", "LocalSampler", "make_sampler", "world_of",
           "draw_distinct"]


class Representatives:
    """The representatives of one step, ready to be written into the output.

    Either ``slots`` into the local storage (gathered on write) or ``rows``,
    one array per field holding the received samples. ``ready`` (GPU) is an
    event after which ``rows`` hold the samples (None: they already do).
    """

    def __init__(self, count: int, *, slots=None, rows=None, origin=None, ready=None,
                 rank: int = 0):
        self.count = int(count)
        self.slots = slots
        self.rows = rows
        self._origin = origin
        self._rank = rank
        self.ready = ready

    @property
    def origin(self) -> np.ndarray:
        """``(rank, slot)`` of each representative, in output order (built on
        first use: for tests and diagnostics)."""
        if self._origin is None:
            slots = np.empty(0, np.int64) if self.slots is None else self.slots
            self._origin = np.stack([np.full(len(slots), self._rank, np.int64), slots], axis=1)
        return self._origin

    def write_into(self, store, out, offset: int, stream=None) -> None:
        """Writes the representatives into ``out`` from row ``offset``,
        queued on ``stream``."""
        if self.count == 0:
            return
        if self.rows is None:
            store.gather(self.slots, out, offset, stream)
        else:
            store.backend.wait_event(stream, self.ready)
            store.copy([r[: self.count] for r in self.rows], out, offset, stream)


class Sampler(Protocol):
    """What the buffer needs from a sampler (see the module docstring)."""

    is_global: bool
    rank: int
    world_size: int
    rng: np.random.Generator

    @property
    def started(self) -> bool: ...

    def start(self, *, active: bool = True, event=None) -> None: ...

    def finish(self) -> Representatives | None: ...

    def settle(self) -> None: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LocalSampler:
    """Uniform sampling without replacement from this process's shard."""

    is_global = False

    def __init__(self, buffer, rng: np.random.Generator, *, rank: int = 0, world_size: int = 1):
        self._buffer = buffer
        self.rng = rng
        self.rank = rank
        self.world_size = world_size
        self._active: bool | None = None

    @property
    def started(self) -> bool:
        return self._active is not None

    def start(self, *, active: bool = True, event=None) -> None:
        self._active = bool(active)

    def finish(self) -> Representatives | None:
        active, self._active = self._active, None
        if active is None:
            raise RuntimeError("finish() called before start()")
        if not active:
            return None
        eligible = self._buffer.replayable_slots()
        size = self._buffer.size if eligible is None else len(eligible)
        k = min(self._buffer.num_representatives, size)
        picks = draw_distinct(self.rng, size, k)
        return Representatives(k, slots=picks if eligible is None else eligible[picks],
                               rank=self.rank)

    def settle(self) -> None:
        """Nothing runs in the background here: the store may be written."""

    def abort(self) -> None:
        """Called when a step fails; nothing to tell other processes here."""
        self._active = None

    def close(self) -> None:
        self._active = None

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def draw_distinct(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` distinct integers drawn uniformly from ``[0, n)``, sorted (int64).

    Every ``k``-subset is equally likely. The common case (``k`` much smaller
    than ``n``) draws ``k`` independent uniform values and keeps them when they
    are distinct, which costs a fraction of ``Generator.choice(replace=False)``;
    otherwise (a repeat, or ``k`` close to ``n``) it falls back to ``choice``.
    Accepting an independent draw only when distinct gives every subset the
    same probability, and so does the fallback, so the mixture is uniform.
    """
    if k <= 0:
        return np.empty(0, np.int64)
    if 4 * k <= n:
        picks = (rng.random(k) * n).astype(np.int64)
        if k <= 64:       # a few values: a set finds a repeat faster than NumPy
            distinct = len(set(picks.tolist())) == k
            picks.sort()
        else:
            picks.sort()
            distinct = not (picks[1:] == picks[:-1]).any()
        if distinct:
            return picks
    picks = rng.choice(n, size=k, replace=False).astype(np.int64)
    picks.sort()
    return picks


def world_of(comm) -> tuple[int, int]:
    """``(rank, size)`` of a communicator: an mpi4py communicator, a
    torch.distributed process group, or ``None`` (``(0, 1)``).

    Raises when ``comm`` has one process although the launcher started
    several that its library does not know about (``torchrun`` with
    ``MPI.COMM_WORLD``): global sampling would silently stay local.
    """
    if comm is None:
        return 0, 1
    from .exchange.launch import check_world
    from .exchange.transport import world_of as transport_world
    rank, size = transport_world(comm)
    check_world(comm, size)
    return rank, size


def make_sampler(buffer, *, comm, sampling: str, seed, rng: np.random.Generator,
                 cuda_aware=None, timeout: float | None = 600.0):
    """The sampler for a buffer's settings: global over ``comm`` when it has
    several processes and ``sampling == "global"``, else local.

    With several processes, construction is a collective call: the processes
    check that they agree (:mod:`dali_rehearsal.exchange`), whether they
    sample globally or locally. ``comm=None`` in a job the launcher started
    with several processes warns (once) that each samples its own shard.
    ``timeout`` bounds every wait for the other processes (seconds; None: no
    limit; the default is :data:`dali_rehearsal.exchange.DEFAULT_TIMEOUT`).
    """
    from .exchange.launch import warn_unshared
    from .exchange.transport import check_timeout
    timeout = check_timeout(timeout)
    if comm is None:
        warn_unshared()
        return LocalSampler(buffer, rng)
    rank, size = world_of(comm)
    if size > 1 and sampling == "global":
        from .exchange import GlobalSampler
        return GlobalSampler(buffer, comm, rng, seed=seed, cuda_aware=cuda_aware,
                             timeout=timeout)
    if size > 1:
        from .exchange import handshake
        handshake(comm, {"sampling": sampling}, timeout=timeout)
    sampler = LocalSampler(buffer, rng, rank=rank, world_size=size)
    sampler.timeout = timeout       # bounds the waits of collective checkpoints
    return sampler
