"""Local sampling: representatives drawn from this process's shard only."""

from __future__ import annotations

import numpy as np

from ..representatives import Representatives, StoreView, draw_distinct

__all__ = ["LocalSampler"]


class LocalSampler:
    """Uniform sampling without replacement from this process's shard,
    synchronously (the :class:`~dali_rehearsal.representatives.Sampler`
    interface). ``view``: the shard (:class:`~dali_rehearsal.representatives.StoreView`)."""

    is_global = False

    def __init__(self, view: StoreView, rng: np.random.Generator, *, rank: int = 0,
                 world_size: int = 1):
        self._view = view
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
        eligible = self._view.replayable_slots()
        size = self._view.size if eligible is None else len(eligible)
        k = min(self._view.num_representatives, size)
        picks = draw_distinct(self.rng, size, k)
        return Representatives(k, slots=picks if eligible is None else eligible[picks],
                               rank=self.rank)

    def settle(self) -> None:
        """Nothing runs in the background here: the store may be written."""

    def post_feedback(self, owner: int, rows, values) -> None:
        """Local sampling delivers only this process's samples: no ticket
        names another process (the step refuses such tickets first)."""
        raise RuntimeError("internal: feedback for another process with local sampling")

    def take_feedback(self) -> list:
        """Feedback other processes sent (never any with local sampling)."""
        return []

    def abort(self) -> None:
        """Called when a step fails; nothing to tell other processes here."""
        self._active = None

    def close(self) -> None:
        self._active = None

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
