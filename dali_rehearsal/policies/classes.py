"""The per-class bookkeeping of the class-balanced policy: which classes it
has seen, how many samples of each it was offered and holds, and the list of
the slots each class holds.

:class:`ClassTable` is the base of :class:`~.class_balanced.ClassBalanced`:
the tables below and their state (:meth:`~ClassTable.state_dict`, checked
by :meth:`~ClassTable.validate_state`); the decisions are the subclass's.

- Classes are numbered in order of first appearance. A label is looked up in
  a table (labels below ``2**16``: one ``take`` for a batch, no bounds check,
  unknown labels clip to a ``-1``) or a dict (larger labels); per class, its
  label, offers, slot count and where its slot list lives are arrays grown by
  doubling.
- The slot lists live in one arena: class ``k`` holds
  ``arena[base[k] : base[k] + count[k]]`` with ``room[k]`` entries reserved.
  A list that outgrows its room moves to the end of the arena; when the
  arena holds more than a few times the capacity, every list is copied into
  a fresh, compact one.

A step touches only the classes of its batch: nothing here costs in
proportion to the number of classes seen.
"""

from __future__ import annotations

import numpy as np

from .base import COUNTER_MAX, InsertionPolicy, as_index_array

__all__ = ["ClassTable"]


class ClassTable(InsertionPolicy):
    """An insertion policy that keeps, per class, its offers and the list of
    its slots (see the module documentation)."""

    #: labels below this are looked up in a table, larger ones in a dict
    _TABLE_LIMIT = 1 << 16
    #: the slot lists are compacted when they take more than this many times
    #: the capacity (lists that outgrow their room move to the end)
    _ARENA_SLACK = 8

    def __init__(self, capacity: int, rng: np.random.Generator):
        super().__init__(capacity, rng)
        self._clear()

    def _clear(self) -> None:
        """Forgets every class (a new policy, or before a state is restored)."""
        self._k = 0                                   # classes seen
        # Per class, in order of first appearance (the first _k entries; the
        # arrays grow by doubling): its label, offers, slots, and where its
        # slot list lives: arena[base : base + count], room reserved.
        self._labels = np.zeros(16, dtype=np.int64)
        self._seen = np.zeros(16, dtype=np.int64)
        self._count = np.zeros(16, dtype=np.int64)
        self._base = np.zeros(16, dtype=np.int64)
        self._room = np.zeros(16, dtype=np.int64)
        self._arena = np.empty(max(16, self.capacity), dtype=np.int64)
        self._arena_used = 0
        # label -> class index for small labels, then one -1 that larger labels
        # clip to (``take(mode="clip")``: no bounds check on the common path)
        self._table = np.full(1, -1, dtype=np.int64)
        self._large: dict[int, int] = {}             # label -> class index, larger labels

    @property
    def class_labels(self) -> np.ndarray:
        """The classes seen, in order of first appearance."""
        return self._labels[: self._k]

    # ------------------------------------------------------------ classes
    def _lookup(self, labels: np.ndarray) -> np.ndarray:
        """Class index of each label (-1: not seen before)."""
        cls = self._table.take(labels, mode="clip")
        if len(labels) == 0 or not self._large or cls.min() >= 0:
            return cls
        far = np.flatnonzero(labels >= self._TABLE_LIMIT)
        if len(far):
            get = self._large.get
            cls[far] = [get(v, -1) for v in labels[far].tolist()]
        return cls

    def _add_classes(self, labels: np.ndarray) -> None:
        """Appends new classes (distinct labels, in order of first appearance)."""
        k, n = self._k, len(labels)
        if k + n > len(self._labels):
            size = max(2 * len(self._labels), k + n)
            for name in ("_labels", "_seen", "_count", "_base", "_room"):
                grown = np.zeros(size, dtype=np.int64)
                grown[:k] = getattr(self, name)[:k]
                setattr(self, name, grown)
        index = np.arange(k, k + n, dtype=np.int64)
        self._labels[k:k + n] = labels
        for a in (self._seen, self._count, self._room):
            a[k:k + n] = 0
        self._base[k:k + n] = self._arena_used
        small = labels < self._TABLE_LIMIT
        if small.any():
            top = int(labels[small].max())
            if top >= len(self._table) - 1:
                size = min(self._TABLE_LIMIT, max(top + 1, 2 * (len(self._table) - 1), 64))
                table = np.full(size + 1, -1, dtype=np.int64)
                table[: len(self._table) - 1] = self._table[:-1]
                self._table = table
            self._table[labels[small]] = index[small]
        if not small.all():
            self._large.update(zip(labels[~small].tolist(), index[~small].tolist()))
        self._k = k + n


    def class_counts(self) -> dict[int, int]:
        k = self._k
        order = np.argsort(self._labels[:k])
        held = order[self._count[order] > 0]
        return dict(zip(self._labels[held].tolist(), self._count[held].tolist()))

    def _members(self, k: int) -> np.ndarray:
        base = self._base[k]
        return self._arena[base: base + self._count[k]]

    # ------------------------------------------------------------ arena
    def _ensure_room(self, classes: np.ndarray, need: np.ndarray) -> None:
        """Makes room for ``need[i]`` slots in the list of class ``classes[i]``."""
        short = need > self._room[classes]
        if not short.any():
            return
        classes, need = classes[short], need[short]
        new_room = np.maximum(2 * need, 16)
        total = int(new_room.sum())
        if self._arena_used + total > self._ARENA_SLACK * (self.capacity + 8 * self._k):
            count = self._count[: self._k]
            room = np.where(count > 0, np.maximum(2 * count, 16), 0)
            room[classes] = new_room
            self._layout(self._arena, self._base[: self._k], count, room)
            return
        if self._arena_used + total > len(self._arena):
            grown = np.empty(max(2 * len(self._arena), self._arena_used + total), np.int64)
            grown[: self._arena_used] = self._arena[: self._arena_used]
            self._arena = grown
        new_base = self._arena_used + np.cumsum(new_room) - new_room
        counts = self._count[classes]
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        self._arena[np.repeat(new_base, counts) + offsets] = \
            self._arena[np.repeat(self._base[classes], counts) + offsets]
        self._base[classes] = new_base
        self._room[classes] = new_room
        self._arena_used += total

    def _layout(self, arena, base, count, room) -> None:
        """Copies each class's slot list into a fresh arena with ``room``."""
        k = len(count)
        new_base = np.cumsum(room) - room
        new = np.empty(max(16, int(room.sum())), dtype=np.int64)
        offsets = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
        new[np.repeat(new_base, count) + offsets] = arena[np.repeat(base, count) + offsets]
        self._arena = new
        self._base[:k] = new_base
        self._room[:k] = room
        self._arena_used = int(room.sum())

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = super().state_dict()
        k = self._k
        counts = self._count[:k].copy()
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        slots = self._arena[np.repeat(self._base[:k], counts) + offsets]
        state.update(class_labels=self._labels[:k].copy(), class_seen=self._seen[:k].copy(),
                     class_counts=counts, class_slots=slots.astype(np.int64))
        return state

    def _state_keys(self) -> tuple[str, ...]:
        return super()._state_keys() + ("class_labels", "class_seen", "class_counts",
                                        "class_slots")

    def validate_state(self, state) -> dict:
        valid = super().validate_state(state)
        size = valid["size"]
        labels = as_index_array(state["class_labels"], "class_labels")
        k = len(labels)
        seen = as_index_array(state["class_seen"], "class_seen", k)
        counts = as_index_array(state["class_counts"], "class_counts", k)
        slots = as_index_array(state["class_slots"], "class_slots", size)
        if (labels < 0).any():
            raise ValueError(f"class_labels must be non-negative, got {labels[labels < 0][:5]}")
        if len(np.unique(labels)) != k:
            raise ValueError("class_labels must not repeat a class")
        offered = sum(seen.tolist())             # Python integers: no wrap-around
        if not 0 <= offered < COUNTER_MAX:
            raise ValueError(f"class_seen sums to {offered}, out of range [0, 2**62)")
        if (counts < 0).any() or (seen < counts).any():
            raise ValueError("class bookkeeping: every class needs 0 <= stored <= seen, got "
                             f"stored {counts.tolist()[:10]} and seen {seen.tolist()[:10]}")
        if int(counts.sum()) != size:
            raise ValueError(f"class bookkeeping: the classes hold {int(counts.sum())} slots "
                             f"but the size is {size}")
        if int(seen.sum()) != valid["num_seen"]:
            raise ValueError(f"class bookkeeping: the classes were offered {int(seen.sum())} "
                             f"samples but num_seen is {valid['num_seen']}")
        if size and k == 0:
            raise ValueError("class bookkeeping: slots are occupied but no class is known")
        if len(slots) and (slots.min() < 0 or slots.max() >= size
                           or len(np.unique(slots)) != size):
            raise ValueError(f"class_slots must list every occupied slot 0..{size - 1} once")
        owner = np.repeat(labels, counts)
        if (valid["slot_labels"][slots] != owner).any():
            bad = slots[valid["slot_labels"][slots] != owner][:5]
            raise ValueError(f"slot_labels disagree with the classes' slot lists at slots "
                             f"{bad.tolist()}")
        valid.update(class_labels=labels, class_seen=seen, class_counts=counts,
                     class_slots=slots)
        return valid

    def _set_state(self, valid: dict) -> None:
        super()._set_state(valid)
        self._clear()
        labels = valid["class_labels"]
        if len(labels) == 0:
            return
        counts = valid["class_counts"]
        self._add_classes(labels)
        self._seen[: len(labels)] = valid["class_seen"]
        self._count[: len(labels)] = counts
        base = np.cumsum(counts) - counts
        self._layout(valid["class_slots"], base, counts,
                     np.where(counts > 0, np.maximum(2 * counts, 16), 0))

    def state_from_samples(self, labels: np.ndarray, *, num_seen: int,
                           class_labels=None, class_seen=None) -> dict:
        """Slots ``0..len-1`` hold ``labels``; every class of ``class_labels``
        (in that order) is known, with ``class_seen`` offers each."""
        state = super().state_from_samples(labels, num_seen=num_seen)
        labels = np.asarray(labels, dtype=np.int64)
        class_labels = np.asarray(class_labels, dtype=np.int64)
        order = np.argsort(class_labels, kind="stable")
        k = order[np.searchsorted(class_labels[order], labels)]
        slots = np.argsort(k, kind="stable").astype(np.int64)
        state.update(class_labels=class_labels, class_seen=np.asarray(class_seen, np.int64),
                     class_counts=np.bincount(k, minlength=len(class_labels)).astype(np.int64),
                     class_slots=slots)
        return state


