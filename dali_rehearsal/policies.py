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
    random slot of the class furthest over its share (the first seen among
    equals). Evicting at random keeps each class's sample uniform.

``"reservoir"``
    A uniform random sample of the whole stream (Vitter's Algorithm R).

Both decide a whole batch with a handful of array operations: the decisions
are those of offering the samples one at a time, in batch order, with the same
random stream (so a batch gives the same result as its samples offered one by
one, and a later sample of a batch wins a slot chosen twice). The only
sequential work is per event, not per sample: the first sample of a new class,
the moment the buffer becomes full, and (class-balanced) one heap operation per
slot that a class over its share gives up.

How the class-balanced policy stays vectorised: each class keeps the list of
its slots. When the buffer becomes full, and whenever a new class re-divides
the shares, the lists of the classes over their share are shuffled once; a
class over its share then gives up the slot at the end of its list. A shuffled
list stays in random order under in-place replacements at uniform positions
(the reservoir within the class) and the classes over their share only lose
slots until the next re-division, so the slot given up is a uniformly random
one of that class, as if drawn at the time, and which class gives up each slot
of a batch follows from the counts alone.

What a step of the class-balanced policy costs depends on its batch, not on
the number of classes seen (large label spaces: ImageNet-21k, iNaturalist):
it looks up and updates the batch's classes only; a class's share is computed
from its index; the classes over their share are kept in a set and a heap
(furthest over first, first seen among equals) updated as counts and shares
change; a new class costs a constant, plus, while the buffer is full and
holds fewer classes than slots, the re-division itself: the shares of at most
``capacity / classes + 1`` classes shrink, and the lists of the classes over
their share are shuffled (at most ``capacity`` slots, as defined above). Once
the classes outnumber the slots, a new class changes no share.

A policy's state (:meth:`InsertionPolicy.state_dict`) is made of NumPy arrays
and plain values only; :meth:`InsertionPolicy.validate_state` checks a state
completely without changing the policy, :meth:`InsertionPolicy.load_state_dict`
restores it.
"""

from __future__ import annotations

import heapq

import numpy as np

from .checks import check_int, check_rng_state

__all__ = ["InsertionPolicy", "ClassBalanced", "Reservoir", "make_policy", "POLICIES"]


def _as_index_array(value, what: str, length: int | None = None) -> np.ndarray:
    """A 1-D int64 copy of an integer array, or ValueError."""
    a = np.asarray(value)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(f"{what} must be a 1-D integer array, got shape {a.shape} and "
                         f"dtype {a.dtype}")
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{what} holds values >= 2**63")
    if length is not None and len(a) != length:
        raise ValueError(f"{what} must hold {length} values, got {len(a)}")
    return a.astype(np.int64, copy=True)


def _below(rng: np.random.Generator, bounds: np.ndarray) -> np.ndarray:
    """One uniform integer in ``[0, bounds[i])`` per element, in order.

    One double per draw (``floor(u * bound)``, each value's probability within
    2**-53 of ``1 / bound``): a batch consumes the random stream exactly like
    its samples drawn one at a time, at the cost of one vectorised call.
    """
    j = (rng.random(len(bounds)) * bounds).astype(np.int64)
    return np.minimum(j, bounds - 1, out=j)


def _rank_within(keys: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements have the same key."""
    n = len(keys)
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64) - np.searchsorted(ordered, ordered)
    return rank


def _last_writes(batch_index: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Writes ``(batch_index, slots)`` in batch order, keeping for a slot
    written more than once only the last write."""
    n = len(slots)
    if n <= 1 or (n <= 256 and len(set(slots.tolist())) == n):   # the common case: no repeat
        return batch_index, slots
    order = np.argsort(slots, kind="stable")
    ordered = slots[order]
    last = np.empty(n, dtype=bool)
    last[-1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=last[:-1])
    if not last.all():
        keep = np.sort(order[last])
        batch_index, slots = batch_index[keep], slots[keep]
    return batch_index, slots


class InsertionPolicy:
    """Base class: tracks which label each slot holds.

    Subclasses implement :meth:`_decide`, which returns the writes of a batch
    ``(batch_index, slots)`` in batch order (a slot may be written more than
    once), as if the samples were offered one at a time.
    """

    name = ""

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.capacity = int(capacity)
        self.rng = rng
        self.slot_labels = np.full(self.capacity, -1, dtype=np.int64)
        self.size = 0          # occupied slots are 0 .. size-1
        self.num_seen = 0      # samples offered so far

    def offer(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offers a batch of samples (by label, non-negative integers), in order.

        Returns ``(batch_index, slots)``: sample ``batch_index[k]`` of the batch
        is to be written into ``slots[k]``. When two samples of one batch land
        in the same slot, only the later one is returned, so the writes can run
        in parallel without a race.
        """
        labels = np.asarray(labels).reshape(-1).astype(np.int64, copy=False)
        if len(labels) == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        batch_index, slots = _last_writes(*self._decide(labels))
        self.num_seen += len(labels)
        self.slot_labels[slots] = labels[batch_index]
        return batch_index, slots

    def _decide(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def class_counts(self) -> dict[int, int]:
        """Number of stored samples per class."""
        labels, counts = np.unique(self.slot_labels[: self.size], return_counts=True)
        return {int(k): int(v) for k, v in zip(labels, counts)}

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The policy's state: NumPy arrays and plain values (copies)."""
        return {"slot_labels": self.slot_labels.copy(), "size": int(self.size),
                "num_seen": int(self.num_seen), "rng": self.rng.bit_generator.state}

    def validate_state(self, state) -> dict:
        """Checks a :meth:`state_dict` completely, without changing this
        policy; returns a normalised copy for :meth:`load_state_dict`.
        Raises ValueError naming what is wrong."""
        if not isinstance(state, dict):
            raise ValueError(f"policy state must be a dict, got {type(state).__name__}")
        missing = sorted(set(self._state_keys()) - set(state))
        extra = sorted(set(state) - set(self._state_keys()))
        if missing or extra:
            raise ValueError(f"policy state for {self.name!r}: missing keys {missing}, "
                             f"unexpected keys {extra}")
        size = check_int(state["size"], "policy size", 0, error=ValueError)
        if size > self.capacity:
            raise ValueError(f"policy size {size} is more than the capacity {self.capacity}")
        num_seen = check_int(state["num_seen"], "policy num_seen", 0, error=ValueError)
        if num_seen < size:
            raise ValueError(f"policy num_seen={num_seen} is less than its size {size}")
        slot_labels = _as_index_array(state["slot_labels"], "slot_labels", self.capacity)
        if (slot_labels[:size] < 0).any():
            bad = np.flatnonzero(slot_labels[:size] < 0)[:5]
            raise ValueError(f"slot_labels: occupied slots {bad.tolist()} hold negative labels "
                             f"{slot_labels[bad].tolist()}")
        if (slot_labels[size:] != -1).any():
            bad = size + np.flatnonzero(slot_labels[size:] != -1)[:5]
            raise ValueError(f"slot_labels: free slots {bad.tolist()} (size {size}) must hold -1")
        return {"slot_labels": slot_labels, "size": size, "num_seen": num_seen,
                "rng": check_rng_state(self.rng, state["rng"], "policy random state")}

    def load_state_dict(self, state) -> None:
        """Validates ``state`` and restores it; on error nothing changes."""
        self._set_state(self.validate_state(state))

    def _state_keys(self) -> tuple[str, ...]:
        return ("slot_labels", "size", "num_seen", "rng")

    def _set_state(self, valid: dict) -> None:
        self.slot_labels = valid["slot_labels"].copy()
        self.size = valid["size"]
        self.num_seen = valid["num_seen"]
        self.rng.bit_generator.state = valid["rng"]

    def state_from_samples(self, labels: np.ndarray, *, num_seen: int,
                           class_labels=None, class_seen=None) -> dict:
        """A state holding ``labels`` in slots ``0..len-1`` (a redistributed
        checkpoint), with this policy's random state."""
        labels = np.asarray(labels, dtype=np.int64)
        slot_labels = np.full(self.capacity, -1, dtype=np.int64)
        slot_labels[: len(labels)] = labels
        return {"slot_labels": slot_labels, "size": len(labels), "num_seen": int(num_seen),
                "rng": self.rng.bit_generator.state}


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
        j = _below(self.rng, self.num_seen + np.arange(fill + 1, b + 1, dtype=np.int64))
        kept = np.flatnonzero(j < self.capacity)
        if fill == 0:
            return kept, j[kept]
        batch_index = np.concatenate([np.arange(fill, dtype=np.int64), fill + kept])
        slots = np.concatenate([self.size + np.arange(fill, dtype=np.int64), j[kept]])
        self.size += fill
        return batch_index, slots


class ClassBalanced(InsertionPolicy):
    """Equal share of the capacity per class seen, reservoir sampling within a
    class; a step costs what its batch holds (see the module documentation)."""

    name = "class_balanced"

    #: labels below this are looked up in a table, larger ones in a dict
    _TABLE_LIMIT = 1 << 16
    #: the slot lists are compacted when they take more than this many times
    #: the capacity (lists that outgrow their room move to the end)
    _ARENA_SLACK = 8

    def __init__(self, capacity: int, rng: np.random.Generator):
        super().__init__(capacity, rng)
        self._clear()

    def _clear(self) -> None:
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
        # While the buffer is full: the classes over their share, and a heap of
        # (-excess, class) entries for them, the class to give up a slot first
        # on top (entries are checked against the counts when they come up)
        self._over: set[int] = set()
        self._heap: list[tuple[int, int]] = []

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

    def _quota(self, c: np.ndarray) -> np.ndarray:
        """The share of each class index: the capacity divided equally among
        the classes seen, the remainder going to the classes seen first."""
        base, extra = divmod(self.capacity, self._k)
        return base + (c < extra)

    def _shrunk(self, k: int):
        """Index ranges of the first ``k`` classes whose share changes when a
        ``k + 1``-th class arrives (shares only shrink)."""
        if k == 0:
            return []
        b0, e0 = divmod(self.capacity, k)
        b1, e1 = divmod(self.capacity, k + 1)
        cuts = sorted({0, e0, e1, k})
        return [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])
                if b0 + (lo < e0) != b1 + (lo < e1)]

    def class_counts(self) -> dict[int, int]:
        k = self._k
        order = np.argsort(self._labels[:k])
        held = order[self._count[order] > 0]
        return dict(zip(self._labels[held].tolist(), self._count[held].tolist()))

    def _members(self, k: int) -> np.ndarray:
        base = self._base[k]
        return self._arena[base: base + self._count[k]]

    # ------------------------------------------------------------ events
    def _quiet(self) -> bool:
        """Whether a class arriving now into the full buffer changes nothing
        for the others: no share shrinks (there are already as many classes
        as slots) and no class is over its share (nothing to shuffle)."""
        return self._k >= self.capacity and not self._over

    def _register(self, label: int) -> None:
        """A new class arrives while the buffer is full: the shares are
        re-divided and the classes over their share shuffle their lists."""
        k = self._k
        self._add_classes(np.array([label], dtype=np.int64))
        for lo, hi in self._shrunk(k):
            c = np.arange(lo, hi, dtype=np.int64)
            self._note_excess(c, self._count[c] - self._quota(c))
        self._shuffle_over_share()

    def _track_over_share(self) -> None:
        """The buffer became full (or was restored full): which classes are
        over their share, once over every class."""
        c = np.arange(self._k, dtype=np.int64)
        excess = self._count[: self._k] - self._quota(c)
        over = np.flatnonzero(excess > 0)
        self._over = set(over.tolist())
        self._heap = list(zip((-excess[over]).tolist(), over.tolist()))
        heapq.heapify(self._heap)

    def _note_excess(self, classes: np.ndarray, excess: np.ndarray) -> None:
        """The excess over their share of ``classes`` changed to ``excess``."""
        over, heap = self._over, self._heap
        for k, e in zip(classes.tolist(), excess.tolist()):
            if e > 0:
                over.add(k)
                heapq.heappush(heap, (-e, k))
            else:
                over.discard(k)
        self._trim_heap()

    def _trim_heap(self) -> None:
        """Drops the heap's outdated entries once they outnumber the live ones."""
        if len(self._heap) > 2 * len(self._over) + 64:
            over = np.fromiter(self._over, dtype=np.int64, count=len(self._over))
            excess = self._count[over] - self._quota(over)
            self._heap = list(zip((-excess).tolist(), over.tolist()))
            heapq.heapify(self._heap)

    def _shuffle_over_share(self) -> None:
        """Puts the slot lists of classes over their share in random order:
        they give up slots from the end of their list."""
        count = self._count
        for k in sorted(self._over):
            if count[k] > 1:        # a list of one draws nothing
                members = self._members(k)
                members[:] = self.rng.permutation(members)

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

    # ------------------------------------------------------------ offers
    def _decide(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = len(labels)
        cls = self._table.take(labels, mode="clip")    # -1: unknown, or a large label
        if self.size == self.capacity and cls.min() >= 0:
            return self._replace(cls)                      # the common step
        cls = self._lookup(labels)
        new_pos = new_labels = np.empty(0, dtype=np.int64)
        unknown = np.flatnonzero(cls < 0)
        if len(unknown):
            values, first = np.unique(labels[unknown], return_index=True)
            order = np.argsort(unknown[first])
            new_pos, new_labels = unknown[first][order], values[order]
            index = np.empty(len(values), dtype=np.int64)
            index[order] = self._k + np.arange(len(values))
            cls[unknown] = index[np.searchsorted(values, labels[unknown])]
        # Segments: the batch is split where the buffer becomes full, and where
        # a new class arrives into the full buffer unless that is quiet. Other
        # new classes are added when their segment starts: until their first
        # sample, they change nothing.
        batch_index, slots = [], []
        pos = i = 0
        while pos < b:
            full = self.size == self.capacity
            end = b if full else min(b, pos + self.capacity - self.size)
            if full and i < len(new_pos) and new_pos[i] == pos and not self._quiet():
                self._register(int(new_labels[i]))
                i += 1
            if not full or self._quiet():
                j = int(np.searchsorted(new_pos, end))
            else:
                j = i
                if i < len(new_pos) and new_pos[i] < end:
                    end = int(new_pos[i])
            if j > i:
                self._add_classes(new_labels[i:j])
                i = j
            c = cls[pos:end]
            if full:
                k, sl = self._replace(c)
            else:
                k, sl = np.arange(len(c), dtype=np.int64), self._fill(c)
            batch_index.append(pos + k)
            slots.append(sl)
            pos = end
        return np.concatenate(batch_index), np.concatenate(slots)

    def _fill(self, c: np.ndarray) -> np.ndarray:
        """Every sample takes the next free slot (the segment fits in them)."""
        n = len(c)
        slots = self.size + np.arange(n, dtype=np.int64)
        rank = _rank_within(c)
        classes, per = np.unique(c, return_counts=True)
        self._ensure_room(classes, self._count[classes] + per)
        self._arena[self._base[c] + self._count[c] + rank] = slots
        self._count[classes] += per
        self._seen[classes] += per
        self.size += n
        if self.size == self.capacity:
            self._track_over_share()
            self._shuffle_over_share()
        return slots

    def _replace(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The buffer is full and every class of the segment is known."""
        rank = _rank_within(c)
        if self._over or self._k > self.capacity:
            return self._replace_rebalancing(c, rank)
        # Every class holds exactly its share (at least one slot): reservoir
        # sampling within the class, the k-th sample of a class replacing a
        # random slot of its class with probability share / k.
        j = _below(self.rng, self._seen[c] + rank + 1)
        batch_index = np.flatnonzero(j < self._quota(c))
        cb = c[batch_index]
        slots = self._arena[self._base[cb] + j[batch_index]]
        np.add.at(self._seen, c, 1)
        return batch_index, slots

    def _replace_rebalancing(self, c: np.ndarray, rank: np.ndarray):
        """The general full-buffer step: some classes are below their share
        (they take slots from the classes furthest over theirs), or some
        classes have no share at all (more classes than slots)."""
        n = len(c)
        out = np.full(n, -1, dtype=np.int64)
        count0 = self._count[c]
        quota = self._quota(c)
        deficit = np.maximum(quota - count0, 0)
        # A class below its share takes a slot for each of its first `deficit`
        # samples; after that (and for the other classes) reservoir sampling
        # within the class. A class without a share drops its samples.
        transfer = rank < deficit
        reservoir = ~transfer & (quota > 0)
        num_transfers = int(np.count_nonzero(transfer))
        if num_transfers:
            takers = c[transfer]
            takers_k, received = np.unique(takers, return_counts=True)
            self._ensure_room(takers_k, self._count[takers_k] + received)
            givers = self._eviction_sequence(num_transfers)
            last = self._base[givers] + self._count[givers] - 1
            given = self._arena[last - _rank_within(givers)]
            self._arena[self._base[takers] + count0[transfer] + rank[transfer]] = given
            out[transfer] = given
        if reservoir.any():
            rc = c[reservoir]
            j = _below(self.rng, self._seen[rc] + rank[reservoir] + 1)
            # Slots the class holds at that sample: its count, plus the slots
            # it took earlier in the batch, minus those it gave up earlier.
            held = count0[reservoir] + deficit[reservoir]
            if num_transfers:
                before = (np.cumsum(transfer) - transfer)[reservoir]
                key = np.sort(givers * (num_transfers + 1) + np.arange(num_transfers))
                held = held - (np.searchsorted(key, rc * (num_transfers + 1) + before)
                               - np.searchsorted(key, rc * (num_transfers + 1)))
            hit = j < held
            out[np.flatnonzero(reservoir)[hit]] = self._arena[self._base[rc[hit]] + j[hit]]
        if num_transfers:
            np.add.at(self._count, givers, -1)
            self._count[takers_k] += received
            self._trim_heap()
        np.add.at(self._seen, c, 1)
        batch_index = np.flatnonzero(out >= 0)
        return batch_index, out[batch_index]

    def _eviction_sequence(self, num: int) -> np.ndarray:
        """The classes that give up a slot for the next ``num`` transfers: each
        time the class furthest over its share, the first seen among equals.
        The counts are left to the caller; the over-share set and the heap
        are left as they will be after these transfers."""
        heap, count = self._heap, self._count
        base, extra = divmod(self.capacity, self._k)
        given: dict[int, int] = {}
        givers = []
        while len(givers) < num:
            neg, k = heap[0]
            excess = int(count[k]) - base - (k < extra) - given.get(k, 0)
            if excess <= 0 or excess != -neg:        # an outdated entry
                heapq.heappop(heap)
                continue
            givers.append(k)
            given[k] = given.get(k, 0) + 1
            if excess > 1:
                heapq.heapreplace(heap, (neg + 1, k))
            else:
                heapq.heappop(heap)
                self._over.discard(k)
        return np.array(givers, dtype=np.int64)

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
        labels = _as_index_array(state["class_labels"], "class_labels")
        k = len(labels)
        seen = _as_index_array(state["class_seen"], "class_seen", k)
        counts = _as_index_array(state["class_counts"], "class_counts", k)
        slots = _as_index_array(state["class_slots"], "class_slots", size)
        if (labels < 0).any():
            raise ValueError(f"class_labels must be non-negative, got {labels[labels < 0][:5]}")
        if len(np.unique(labels)) != k:
            raise ValueError("class_labels must not repeat a class")
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
        if self.size == self.capacity:
            self._track_over_share()

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


POLICIES = {cls.name: cls for cls in (ClassBalanced, Reservoir)}


def make_policy(name: str, capacity: int, rng: np.random.Generator) -> InsertionPolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(capacity, rng)
