"""The reservoir policy: a uniform random sample of the whole stream."""

from __future__ import annotations

import numpy as np

from .base import InsertionPolicy, below

__all__ = ["Reservoir"]


class Reservoir(InsertionPolicy):
    """Algorithm R: after ``n`` offers every offered sample is kept with
    probability ``min(1, capacity / n)``."""

    name = "reservoir"

    def _decide(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = len(labels)
        fill = min(b, self.capacity - self.size)
        if fill == b:
            slots = self.size + np.arange(b, dtype=np.int64)
            self.size += b
            return np.arange(b, dtype=np.int64), slots
        # The k-th sample of the stream replaces a random slot with
        # probability capacity / k (one draw per sample, in order).
        j = below(self.rng, self.num_seen + np.arange(fill + 1, b + 1, dtype=np.int64))
        kept = np.flatnonzero(j < self.capacity)
        if fill == 0:
            return kept, j[kept]
        batch_index = np.concatenate([np.arange(fill, dtype=np.int64), fill + kept])
        slots = np.concatenate([self.size + np.arange(fill, dtype=np.int64), j[kept]])
        self.size += fill
        return batch_index, slots

