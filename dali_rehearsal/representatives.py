"""What a sampler hands the step, and the read-only view it draws from.

A leaf module (NumPy and the standard library only): the step, the local
sampler and the global exchange all use these types, none of them owns them.

- :class:`StoreView`: what a sampler may see of the buffer: the shard's
  size, the sample layout, the rows (gathered, never written) and the
  backend. A sampler receives this view, never the buffer.
- :class:`Representatives`: one step's representatives, ready to be written
  into the output batch.
- :class:`Sampler`: the interface every sampler offers the step.
- :func:`draw_distinct`: ``k`` distinct indices drawn uniformly.

A sampler serves the step in rounds, one per training step:
``start(active=..., event=...)`` opens the round for the next step,
``finish()`` returns its representatives (or ``None`` when some process has
ended its epoch, so that every process ends the epoch at the same step). The
step inserts its fresh samples only after ``finish()``, so representatives
always come from what was stored before the batch that uses them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["StoreView", "Representatives", "Sampler", "draw_distinct"]


class StoreView:
    """The read-only view of a buffer's shard that a sampler receives.

    ``store`` is the sample storage (``spec``, ``row_nbytes``, ``gather``,
    ``copy``, ``empty_rows``, ``backend``) and ``policy`` the replacement
    policy (``size``); both are held by reference, so :attr:`size` and
    :attr:`spec` are always current. The view reads rows, never writes the
    store.
    """

    __slots__ = ("_store", "_policy", "num_representatives", "task_aware", "feedback_specs")

    def __init__(self, store, policy, num_representatives: int, *, task_aware: bool = False,
                 feedback_specs: tuple = ()):
        self._store = store
        self._policy = policy
        #: Representatives per step (``r``).
        self.num_representatives = int(num_representatives)
        #: Whether representatives come only from earlier tasks' samples.
        self.task_aware = bool(task_aware)
        #: Layouts of the feedback fields (:mod:`dali_rehearsal.feedback`), or ().
        self.feedback_specs = tuple(feedback_specs)

    @property
    def backend(self):
        """The array backend (NumPy or CuPy) the rows live on."""
        return self._store.backend

    @property
    def size(self) -> int:
        """Samples stored in this process's shard now."""
        return self._policy.size

    def replayable_slots(self):
        """The slots representatives may be drawn from now, increasing (int64):
        with task-aware replay those stored before the current task
        (``policy.earlier_task_slots()``); ``None`` otherwise (every stored
        slot, ``0 .. size-1``)."""
        return self._policy.earlier_task_slots() if self.task_aware else None

    @property
    def spec(self):
        """Per-field shape and dtype (None before the first batch)."""
        return self._store.spec

    @property
    def row_nbytes(self) -> int:
        """Bytes of one sample, every field together."""
        return self._store.row_nbytes

    def gather(self, slots, out, offset: int = 0, stream=None) -> None:
        """``out[f][offset + k]`` = field ``f`` of slot ``slots[k]``, queued on ``stream``."""
        self._store.gather(slots, out, offset, stream)

    def copy(self, arrays, out, offset: int = 0, stream=None) -> None:
        """``out[f][offset:offset + len]`` = ``arrays[f]``, queued on ``stream``."""
        self._store.copy(arrays, out, offset, stream)

    def empty_rows(self, n: int) -> list:
        """Uninitialised rows for ``n`` samples, one array per field, on the store's device."""
        return self._store.empty_rows(n)

    def wait_event(self, stream, event) -> None:
        """Orders ``stream`` after ``event`` (GPU; nothing on the host or for None)."""
        self._store.backend.wait_event(stream, event)


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

    def write_into(self, view: StoreView, out, offset: int, stream=None) -> None:
        """Writes the representatives into ``out`` from row ``offset``,
        queued on ``stream``; ``view``: the shard they were drawn for."""
        if self.count == 0:
            return
        if self.rows is None:
            view.gather(self.slots, out, offset, stream)
        else:
            view.wait_event(stream, self.ready)
            view.copy([r[: self.count] for r in self.rows], out, offset, stream)


class Sampler(Protocol):
    """What the step needs from a sampler.

    ``settle()`` waits until nothing reads the store in the background;
    ``post_feedback(owner, rows, values)`` queues feedback for another
    process's samples (rows of (rank, slot, generation, field mask), one
    host array per feedback field) and ``take_feedback()`` returns what
    other processes sent for this shard's, as ``(rows, values)`` pairs;
    ``abort()`` is called when this process's step fails.
    """

    is_global: bool
    rank: int
    world_size: int
    rng: np.random.Generator

    @property
    def started(self) -> bool: ...

    def start(self, *, active: bool = True, event=None) -> None: ...

    def finish(self) -> Representatives | None: ...

    def settle(self) -> None: ...

    def post_feedback(self, owner: int, rows: np.ndarray, values: list) -> None: ...

    def take_feedback(self) -> list: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


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
