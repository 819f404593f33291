"""The class-balanced policy (the default): an equal share of the capacity
per class seen, a uniform random sample within each class.

The capacity is divided equally among the classes seen so far (the remainder
going to the classes seen first) and re-divided when a new class appears.
Within a class the kept samples are a uniform random sample of every sample
of that class offered so far (reservoir sampling with the class's share as the
reservoir size). While the buffer has free slots any class may use them; once
it is full, a class below its share takes a random slot of the class furthest
over its share (the first seen among equals). Evicting at random keeps each
class's sample uniform.

The only sequential work is per event, not per sample: the first sample of a
new class, the moment the buffer becomes full, and one heap operation per
slot that a class over its share gives up.

How it stays vectorised: each class keeps the list of its slots
(:mod:`.classes`). When the buffer becomes full, and whenever a new class
re-divides the shares, the lists of the classes over their share are shuffled
once; a class over its share then gives up the slot at the end of its list. A
shuffled list stays in random order under in-place replacements at uniform
positions (the reservoir within the class) and the classes over their share
only lose slots until the next re-division, so the slot given up is a
uniformly random one of that class, as if drawn at the time, and which class
gives up each slot of a batch follows from the counts alone.

What a step costs depends on its batch, not on the number of classes seen
(large label spaces: ImageNet-21k, iNaturalist): it looks up and updates the
batch's classes only; a class's share is computed from its index; the classes
over their share are kept in a set and a heap (furthest over first, first seen
among equals) updated as counts and shares change; a new class costs a
constant, plus, while the buffer is full and holds fewer classes than slots,
the re-division itself: the shares of at most ``capacity / classes + 1``
classes shrink, and the lists of the classes over their share are shuffled
(at most ``capacity`` slots, as defined above). Once the classes outnumber the
slots, a new class changes no share.

A checkpoint loaded on another number of processes is redistributed class by
class (:meth:`ClassBalanced.redistribute`): equal shares of the new total per
class, a uniform random subset within each class.
"""

from __future__ import annotations

import heapq

import numpy as np

from .base import apportion, below, rank_within, stored_labels, stripes
from .classes import ClassTable

__all__ = ["ClassBalanced", "equal_shares"]


def equal_shares(total: int, available: np.ndarray) -> np.ndarray:
    """Class-balanced targets: ``total`` slots in equal shares (the remainder
    to the first classes), a class with fewer samples keeping all of them."""
    target = np.zeros(len(available), dtype=np.int64)
    open_ = np.ones(len(available), dtype=bool)
    left = int(total)
    while left > 0 and open_.any():
        k = int(open_.sum())
        base, extra = divmod(left, k)
        share = np.zeros(len(available), dtype=np.int64)
        share[open_] = base + (np.arange(k) < extra)
        room = available - target
        capped = open_ & (room <= share)
        if not capped.any():
            target += share
            break
        target[capped] = available[capped]
        left -= int(room[capped].sum())
        open_ &= ~capped
    return target


class ClassBalanced(ClassTable):
    """Equal share of the capacity per class seen, reservoir sampling within a
    class; a step costs what its batch holds (see the module documentation)."""

    name = "class_balanced"

    def _clear(self) -> None:
        super()._clear()
        # While the buffer is full: the classes over their share, and a heap of
        # (-excess, class) entries for them, the class to give up a slot first
        # on top (entries are checked against the counts when they come up)
        self._over: set[int] = set()
        self._heap: list[tuple[int, int]] = []

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
        rank = rank_within(c)
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
        rank = rank_within(c)
        if self._over or self._k > self.capacity:
            return self._replace_rebalancing(c, rank)
        # Every class holds exactly its share (at least one slot): reservoir
        # sampling within the class, the k-th sample of a class replacing a
        # random slot of its class with probability share / k.
        j = below(self.rng, self._seen[c] + rank + 1)
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
            given = self._arena[last - rank_within(givers)]
            self._arena[self._base[takers] + count0[transfer] + rank[transfer]] = given
            out[transfer] = given
        if reservoir.any():
            rc = c[reservoir]
            j = below(self.rng, self._seen[rc] + rank[reservoir] + 1)
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
    def _set_state(self, valid: dict) -> None:
        super()._set_state(valid)
        if self.size == self.capacity:
            self._track_over_share()

    def redistribute(self, states: list[dict], capacities, rank: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """:meth:`InsertionPolicy.redistribute`, class by class: the new total
        (all the samples when they fit) in equal shares per class (a class
        with fewer samples keeps all of them), a uniform random subset within
        each class, the classes one after another, spread evenly over the
        processes; each class's offers are shared out in proportion to the
        samples of that class each process gets. The classes keep the order
        in which the saved processes first saw them."""
        labels = stored_labels(states)
        capacities = np.asarray(capacities, dtype=np.int64)
        total = int(min(capacities.sum(), len(labels)))
        order, seen = [], {}
        for s in states:
            for c, n in zip(s["class_labels"].tolist(), s["class_seen"].tolist()):
                if c not in seen:
                    order.append(c)
                    seen[c] = 0
                seen[c] += n
        classes = np.asarray(order, dtype=np.int64)
        seen_per_class = np.asarray([seen[c] for c in order], dtype=np.int64)
        lookup = np.argsort(classes, kind="stable")
        cls = lookup[np.searchsorted(classes[lookup], labels)] if len(labels) else labels
        available = np.bincount(cls, minlength=len(classes)).astype(np.int64)
        target = equal_shares(total, available)
        kept = np.concatenate([np.empty(0, np.int64)] + [
            rng.choice(np.flatnonzero(cls == k), size=int(target[k]), replace=False)
            for k in range(len(classes))])
        owner = stripes(apportion(total, capacities))
        mine = kept[owner == rank]
        per_class = np.zeros((len(capacities), len(classes)), dtype=np.int64)
        np.add.at(per_class, (owner, cls[kept]), 1)
        class_seen = np.stack([
            apportion(int(seen_per_class[k]), per_class[:, k] if per_class[:, k].any()
                      else capacities) for k in range(len(classes))], axis=1)[rank] \
            if len(classes) else np.empty(0, np.int64)
        return mine, self.state_from_samples(labels[mine], num_seen=int(class_seen.sum()),
                                             class_labels=classes, class_seen=class_seen)
