"""Insertion policies: which offered samples the buffer keeps, and in which slot.

A policy only sees labels and decides on the host; the data itself is moved by
the buffer (NumPy or the CUDA kernels). Slots are filled in order ``0, 1, ...``
and an evicted slot is reused at once, so the occupied slots are always
``0 .. size - 1``: sampling only needs the fill level.

Two policies are provided, both selected by name in :class:`RehearsalBuffer`:

``"class_balanced"`` (default)
    The capacity is divided equally among the classes seen so far (the
    remainder going to the classes seen first) and re-divided when a new class
    appears. Within a class the kept samples are a uniform random sample of
    every sample of that class offered so far (reservoir sampling with the
    class's share as the reservoir size). While the buffer has free slots any
    class may use them; once it is full, a class below its share takes a
    random slot of the class furthest over its share. Evicting at random keeps
    each class's sample uniform.

``"reservoir"``
    A uniform random sample of the whole stream (Vitter's Algorithm R).
"""

from __future__ import annotations

import numpy as np

__all__ = ["InsertionPolicy", "ClassBalanced", "Reservoir", "make_policy", "POLICIES"]


class InsertionPolicy:
    """Base class: tracks which label each slot holds.

    Subclasses implement :meth:`_offer_one`, which returns the slot for one
    offered sample, or -1 to drop it.
    """

    name = ""

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.capacity = int(capacity)
        self.rng = rng
        self.slot_labels = np.full(self.capacity, -1, dtype=np.int64)
        self.size = 0          # occupied slots are 0 .. size-1
        self.num_seen = 0      # samples offered so far

    def offer(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offers a batch of samples (by label), in order.

        Returns ``(batch_index, slots)``: sample ``batch_index[k]`` of the batch
        is to be written into ``slots[k]``. When two samples of one batch land
        in the same slot, only the later one is returned, so the writes can run
        in parallel without a race.
        """
        chosen: dict[int, int] = {}
        for i, label in enumerate(labels.tolist()):
            self.num_seen += 1
            slot = self._offer_one(int(label))
            if slot >= 0:
                chosen.pop(slot, None)   # a later sample overwrites an earlier one
                chosen[slot] = i
        slots = np.fromiter(chosen.keys(), dtype=np.int64, count=len(chosen))
        batch_index = np.fromiter(chosen.values(), dtype=np.int64, count=len(chosen))
        order = np.argsort(batch_index, kind="stable")
        return batch_index[order], slots[order]

    def _offer_one(self, label: int) -> int:
        raise NotImplementedError

    def class_counts(self) -> dict[int, int]:
        """Number of stored samples per class."""
        labels, counts = np.unique(self.slot_labels[: self.size], return_counts=True)
        return {int(k): int(v) for k, v in zip(labels, counts)}

    def state_dict(self) -> dict:
        return {"slot_labels": self.slot_labels.copy(), "size": self.size,
                "num_seen": self.num_seen, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.slot_labels[:] = state["slot_labels"]
        self.size = int(state["size"])
        self.num_seen = int(state["num_seen"])
        self.rng.bit_generator.state = state["rng"]


class Reservoir(InsertionPolicy):
    """Algorithm R: after ``n`` offers every offered sample is kept with
    probability ``min(1, capacity / n)``."""

    name = "reservoir"

    def _offer_one(self, label: int) -> int:
        if self.size < self.capacity:
            slot = self.size
            self.size += 1
        else:
            j = int(self.rng.integers(self.num_seen))
            if j >= self.capacity:
                return -1
            slot = j
        self.slot_labels[slot] = label
        return slot


class ClassBalanced(InsertionPolicy):
    """Equal share of the capacity per class seen, reservoir sampling within a class."""

    name = "class_balanced"

    def __init__(self, capacity: int, rng: np.random.Generator):
        super().__init__(capacity, rng)
        self.class_order: list[int] = []            # classes in order of first appearance
        self.seen: dict[int, int] = {}              # offers per class
        self.slots_of: dict[int, list[int]] = {}    # slots per class
        self.quota: dict[int, int] = {}

    def _requota(self) -> None:
        k = len(self.class_order)
        base, extra = divmod(self.capacity, k)
        self.quota = {c: base + (1 if i < extra else 0) for i, c in enumerate(self.class_order)}

    def _evict_from_over_quota(self) -> int:
        """Frees a random slot of the class furthest over its share."""
        over = max(self.class_order, key=lambda c: len(self.slots_of[c]) - self.quota[c])
        slots = self.slots_of[over]
        k = int(self.rng.integers(len(slots)))
        slot = slots[k]
        slots[k] = slots[-1]
        slots.pop()
        return slot

    def _offer_one(self, label: int) -> int:
        if label not in self.seen:
            self.class_order.append(label)
            self.seen[label] = 0
            self.slots_of[label] = []
            self._requota()
        self.seen[label] += 1
        mine = self.slots_of[label]
        if self.size < self.capacity:
            # Free slots go to any class; classes over their share give them
            # back (at random) once other classes need room.
            slot = self.size
            self.size += 1
            mine.append(slot)
        elif len(mine) < self.quota[label]:
            # Room in the class's share: every sample seen so far is kept.
            slot = self._evict_from_over_quota()
            mine.append(slot)
        else:
            if self.quota[label] == 0:
                return -1
            # Reservoir within the class: keep with probability share / seen.
            j = int(self.rng.integers(self.seen[label]))
            if j >= len(mine):
                return -1
            slot = mine[j]
        self.slot_labels[slot] = label
        return slot

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(class_order=list(self.class_order), seen=dict(self.seen),
                     slots_of={c: list(s) for c, s in self.slots_of.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.class_order = list(state["class_order"])
        self.seen = dict(state["seen"])
        self.slots_of = {c: list(s) for c, s in state["slots_of"].items()}
        if self.class_order:
            self._requota()


POLICIES = {cls.name: cls for cls in (ClassBalanced, Reservoir)}


def make_policy(name: str, capacity: int, rng: np.random.Generator) -> InsertionPolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(capacity, rng)
