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
and the moment the buffer becomes full.

How the class-balanced policy stays vectorised: each class keeps the list of
its slots. When the buffer becomes full, and whenever a new class re-divides
the shares, the lists of the classes over their share are shuffled once; a
class over its share then gives up the slot at the end of its list. A shuffled
list stays in random order under in-place replacements at uniform positions
(the reservoir within the class) and the classes over their share only lose
slots until the next re-division, so the slot given up is a uniformly random
one of that class, as if drawn at the time, and which class gives up each slot
of a batch follows from the counts alone.

A policy's state (:meth:`InsertionPolicy.state_dict`) is made of NumPy arrays
and plain values only; :meth:`InsertionPolicy.validate_state` checks a state
completely without changing the policy, :meth:`InsertionPolicy.load_state_dict`
restores it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["InsertionPolicy", "ClassBalanced", "Reservoir", "make_policy", "POLICIES",
           "check_rng_state"]


def check_rng_state(rng: np.random.Generator, state, what: str) -> dict:
    """Checks that ``state`` is a valid state of ``rng``'s bit generator,
    without touching ``rng``; returns it. Raises ValueError naming ``what``."""
    bitgen = rng.bit_generator
    if not isinstance(state, dict) or state.get("bit_generator") != type(bitgen).__name__:
        name = state.get("bit_generator") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{what}: not a {type(bitgen).__name__} random state (got {name!r})")
    scratch = type(bitgen)()
    try:
        scratch.state = state
    except Exception as e:  # the bit generator's own checks: types, ranges, keys
        raise ValueError(f"{what}: malformed random state ({type(e).__name__}: {e})") from None
    if scratch.state != state:
        raise ValueError(f"{what}: malformed random state (values out of range)")
    return state


def _as_int(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


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
        size = _as_int(state["size"], "policy size")
        if size > self.capacity:
            raise ValueError(f"policy size {size} is more than the capacity {self.capacity}")
        num_seen = _as_int(state["num_seen"], "policy num_seen")
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
    """Equal share of the capacity per class seen, reservoir sampling within a class."""

    name = "class_balanced"

    #: labels below this are looked up in a table, larger ones by binary search
    _TABLE_LIMIT = 1 << 16
    #: the slot lists are compacted when they take more than this many times
    #: the capacity (lists that outgrow their room move to the end)
    _ARENA_SLACK = 8

    def __init__(self, capacity: int, rng: np.random.Generator):
        super().__init__(capacity, rng)
        self._clear()

    def _clear(self) -> None:
        empty = np.empty(0, dtype=np.int64)
        self.class_labels = empty.copy()    # classes in order of first appearance
        self._seen = empty.copy()           # offers per class
        self._count = empty.copy()          # slots per class
        self._quota = empty.copy()          # share per class
        self._short = False                 # some class holds less than its share
        # Each class's slots: arena[base[k] : base[k] + count[k]], room[k] reserved.
        self._base = empty.copy()
        self._room = empty.copy()
        self._arena = np.empty(max(16, self.capacity), dtype=np.int64)
        self._arena_used = 0
        self._sorted_labels = empty.copy()  # class_labels sorted, and their class indices
        self._sorted_index = empty.copy()
        # label -> class index for small labels, then one -1 that larger labels
        # clip to (``take(mode="clip")``: no bounds check on the common path)
        self._table = np.full(1, -1, dtype=np.int64)

    # ------------------------------------------------------------ lookup
    def _lookup(self, labels: np.ndarray) -> np.ndarray:
        """Class index of each label (-1: not seen before)."""
        cls = self._table.take(labels, mode="clip")
        if len(labels) == 0 or cls.min() >= 0:
            return cls
        if len(self._sorted_labels) == 0:
            return np.full(len(labels), -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted_labels, labels)
        np.minimum(pos, len(self._sorted_labels) - 1, out=pos)
        return np.where(self._sorted_labels[pos] == labels, self._sorted_index[pos], -1)

    def _index_classes(self) -> None:
        labels = self.class_labels
        order = np.argsort(labels, kind="stable")
        self._sorted_labels = labels[order]
        self._sorted_index = order.astype(np.int64)
        small = labels[labels < self._TABLE_LIMIT]
        size = max(len(self._table) - 1, int(small.max()) + 1 if len(small) else 0)
        if size > len(self._table) - 1:
            size = min(self._TABLE_LIMIT, max(size, 2 * (len(self._table) - 1), 64))
        self._table = np.full(size + 1, -1, dtype=np.int64)
        known = np.flatnonzero(labels < size)
        self._table[labels[known]] = known

    def class_counts(self) -> dict[int, int]:
        order = np.argsort(self.class_labels)
        return {int(self.class_labels[k]): int(self._count[k]) for k in order
                if self._count[k] > 0}

    def _members(self, k: int) -> np.ndarray:
        base = self._base[k]
        return self._arena[base: base + self._count[k]]

    # ------------------------------------------------------------ events
    def _register(self, label: int) -> None:
        """A new class: equal shares are re-divided among every class seen."""
        self.class_labels = np.append(self.class_labels, np.int64(label))
        zero = np.zeros(1, dtype=np.int64)
        self._seen = np.concatenate([self._seen, zero])
        self._count = np.concatenate([self._count, zero])
        self._base = np.concatenate([self._base, [self._arena_used]]).astype(np.int64)
        self._room = np.concatenate([self._room, zero])
        self._index_classes()
        self._requota()
        if self.size == self.capacity:
            self._shuffle_over_share()

    def _requota(self) -> None:
        k = len(self.class_labels)
        base, extra = divmod(self.capacity, k)
        self._quota = base + (np.arange(k) < extra).astype(np.int64)
        self._short = bool((self._count < self._quota).any())

    def _shuffle_over_share(self) -> None:
        """Puts the slot lists of classes over their share in random order:
        they give up slots from the end of their list."""
        for k in np.flatnonzero(self._count > self._quota).tolist():
            members = self._members(k)
            members[:] = self.rng.permutation(members)

    # ------------------------------------------------------------ arena
    def _ensure_room(self, need: np.ndarray) -> None:
        """Makes room for ``need[k]`` slots in class ``k``'s list."""
        short = np.flatnonzero(need > self._room)
        if len(short) == 0:
            return
        new_room = np.maximum(2 * need[short], 16)
        total = int(new_room.sum())
        if self._arena_used + total > self._ARENA_SLACK * (self.capacity + 8 * len(self._room)):
            room = np.maximum(2 * np.maximum(need, self._count), 16)
            self._layout(self._arena, self._base, self._count, room)
            return
        if self._arena_used + total > len(self._arena):
            grown = np.empty(max(2 * len(self._arena), self._arena_used + total), np.int64)
            grown[: self._arena_used] = self._arena[: self._arena_used]
            self._arena = grown
        new_base = self._arena_used + np.cumsum(new_room) - new_room
        counts = self._count[short]
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        self._arena[np.repeat(new_base, counts) + offsets] = \
            self._arena[np.repeat(self._base[short], counts) + offsets]
        self._base[short] = new_base
        self._room[short] = new_room
        self._arena_used += total

    def _layout(self, arena, base, count, room) -> None:
        """Copies each class's slot list into a fresh arena with ``room``."""
        new_base = np.cumsum(room) - room
        new = np.empty(max(16, int(room.sum())), dtype=np.int64)
        offsets = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
        new[np.repeat(new_base, count) + offsets] = arena[np.repeat(base, count) + offsets]
        self._arena, self._base, self._room = new, new_base, room.astype(np.int64)
        self._arena_used = int(room.sum())

    # ------------------------------------------------------------ offers
    def _decide(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = len(labels)
        cls = self._table.take(labels, mode="clip")    # -1: unknown, or a large label
        if self.size == self.capacity and cls.min() >= 0:
            return self._replace(cls)                      # the common step
        cls = self._lookup(labels)
        # Split the batch where a class appears and where the buffer fills up.
        starts = {0}
        new_at: dict[int, int] = {}
        unknown = np.flatnonzero(cls < 0)
        if len(unknown):
            values, first = np.unique(labels[unknown], return_index=True)
            first_pos = unknown[first]
            order = np.argsort(first_pos)
            index = np.empty(len(values), dtype=np.int64)
            index[order] = len(self.class_labels) + np.arange(len(values))
            cls[unknown] = index[np.searchsorted(values, labels[unknown])]
            for p, v in zip(first_pos[order].tolist(), values[order].tolist()):
                new_at[p] = v
                starts.add(p)
        free = self.capacity - self.size
        if 0 < free < b:
            starts.add(free)
        bounds = sorted(starts) + [b]
        batch_index, slots = [], []
        for s, e in zip(bounds[:-1], bounds[1:]):
            if s in new_at:
                self._register(new_at[s])
            c = cls[s:e]
            if self.size < self.capacity:
                i, sl = np.arange(len(c), dtype=np.int64), self._fill(c)
            else:
                i, sl = self._replace(c)
            batch_index.append(s + i)
            slots.append(sl)
        return np.concatenate(batch_index), np.concatenate(slots)

    def _fill(self, c: np.ndarray) -> np.ndarray:
        """Every sample takes the next free slot (the segment fits in them)."""
        n = len(c)
        slots = self.size + np.arange(n, dtype=np.int64)
        rank = _rank_within(c)
        per = np.bincount(c, minlength=len(self._count))
        self._ensure_room(self._count + per)
        self._arena[self._base[c] + self._count[c] + rank] = slots
        self._count += per
        self._seen += per
        self.size += n
        self._short = bool((self._count < self._quota).any())
        if self.size == self.capacity:
            self._shuffle_over_share()
        return slots

    def _replace(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The buffer is full and every class of the segment is known."""
        rank = _rank_within(c)
        if self._short or len(self._count) > self.capacity:
            return self._replace_rebalancing(c, rank)
        # Every class holds exactly its share (at least one slot): reservoir
        # sampling within the class, the k-th sample of a class replacing a
        # random slot of its class with probability share / k.
        j = _below(self.rng, self._seen[c] + rank + 1)
        batch_index = np.flatnonzero(j < self._quota[c])
        cb = c[batch_index]
        slots = self._arena[self._base[cb] + j[batch_index]]
        self._seen += np.bincount(c, minlength=len(self._seen))
        return batch_index, slots

    def _replace_rebalancing(self, c: np.ndarray, rank: np.ndarray):
        """The general full-buffer step: some classes are below their share
        (they take slots from the classes furthest over theirs), or some
        classes have no share at all (more classes than slots)."""
        n = len(c)
        K = len(self._count)
        out = np.full(n, -1, dtype=np.int64)
        per = np.bincount(c, minlength=K)
        count0 = self._count
        deficit = np.maximum(self._quota - count0, 0)
        # A class below its share takes a slot for each of its first `deficit`
        # samples; after that (and for the other classes) reservoir sampling
        # within the class. A class without a share drops its samples.
        transfer = rank < deficit[c]
        reservoir = ~transfer & (self._quota[c] > 0)
        num_transfers = int(np.count_nonzero(transfer))
        evicted = np.zeros(K, dtype=np.int64)
        if num_transfers:
            takers = c[transfer]
            received = np.bincount(takers, minlength=K)
            self._ensure_room(count0 + received)
            givers = self._eviction_sequence(num_transfers)
            given = self._arena[self._base[givers] + count0[givers] - 1 - _rank_within(givers)]
            self._arena[self._base[takers] + count0[takers] + rank[transfer]] = given
            out[transfer] = given
            evicted = np.bincount(givers, minlength=K)
        if reservoir.any():
            rc = c[reservoir]
            j = _below(self.rng, self._seen[rc] + rank[reservoir] + 1)
            # Slots the class holds at that sample: its count, plus the slots
            # it took earlier in the batch, minus those it gave up earlier.
            held = count0[rc] + deficit[rc]
            if num_transfers and evicted[rc].any():
                before = (np.cumsum(transfer) - transfer)[reservoir]
                key = np.sort(givers * (num_transfers + 1) + np.arange(num_transfers))
                held = held - (np.searchsorted(key, rc * (num_transfers + 1) + before)
                               - np.searchsorted(key, rc * (num_transfers + 1)))
            hit = j < held
            out[np.flatnonzero(reservoir)[hit]] = self._arena[self._base[rc[hit]] + j[hit]]
        if num_transfers:
            self._count = count0 - evicted + received
            self._short = bool((self._count < self._quota).any())
        self._seen += per
        batch_index = np.flatnonzero(out >= 0)
        return batch_index, out[batch_index]

    def _eviction_sequence(self, num: int) -> np.ndarray:
        """The classes that give up a slot for the next ``num`` transfers: each
        time the class furthest over its share, the first seen among equals."""
        excess = self._count - self._quota
        over = np.flatnonzero(excess > 0)
        top = excess[over]
        lowest = max(1, int(top.max()) - num + 1)
        # (class, level) pairs: the class gives up a slot when its excess is
        # at that level; highest level first, then order of first appearance.
        pairs = np.maximum(top - lowest + 1, 0)
        cls = np.repeat(over, pairs)
        offsets = np.arange(len(cls)) - np.repeat(np.cumsum(pairs) - pairs, pairs)
        level = np.repeat(top, pairs) - offsets
        order = np.lexsort((cls, -level))
        return cls[order[:num]]

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = super().state_dict()
        counts = self._count.copy()
        slots = [self._members(k) for k in range(len(counts))]
        state.update(class_labels=self.class_labels.copy(), class_seen=self._seen.copy(),
                     class_counts=counts,
                     class_slots=(np.concatenate(slots) if slots
                                  else np.empty(0, np.int64)).astype(np.int64))
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
        self.class_labels = labels.copy()
        self._seen = valid["class_seen"].copy()
        self._count = counts.copy()
        self._index_classes()
        self._requota()
        base = np.cumsum(counts) - counts
        self._layout(valid["class_slots"], base, counts, np.maximum(2 * counts, 16))

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
