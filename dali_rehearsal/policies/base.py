"""The base of the insertion policies (:class:`InsertionPolicy`) and the
vectorised helpers they share.

A policy only sees labels and decides on the host; the data itself is moved by
the buffer (NumPy or the CUDA kernels). Slots are filled in order ``0, 1, ...``
and an evicted slot is reused at once, so the occupied slots are always
``0 .. size - 1``: sampling only needs the fill level.

A policy decides a whole batch with a handful of array operations: the
decisions are those of offering the samples one at a time, in batch order,
with the same random stream (so a batch gives the same result as its samples
offered one by one, and a later sample of a batch wins a slot chosen twice).

A policy's state (:meth:`InsertionPolicy.state_dict`) is made of NumPy arrays
and plain values only; :meth:`InsertionPolicy.validate_state` checks a state
completely without changing the policy, :meth:`InsertionPolicy.load_state_dict`
restores it, and :meth:`InsertionPolicy.redistribute` builds this policy's
state from the samples that the shards of a checkpoint of another number of
processes hold (a checkpoint loaded elastically): each policy chooses which
samples a process keeps, so a new policy needs no change in the checkpoint
code.
"""

from __future__ import annotations

import numpy as np

from ..checks import check_int, check_rng_state

__all__ = ["InsertionPolicy", "COUNTER_MAX", "as_index_array", "below", "rank_within",
           "last_writes", "apportion", "stripes", "stored_labels"]

#: Counters (offers) of a restored state stay below this, so that they can go
#: on counting in int64.
COUNTER_MAX = 2**62


#: Optional keys of a policy state: the task bookkeeping (absent from states
#: saved before it was recorded).
_TASK_KEYS = ("task", "slot_task")

def as_index_array(value, what: str, length: int | None = None) -> np.ndarray:
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


def below(rng: np.random.Generator, bounds: np.ndarray) -> np.ndarray:
    """One uniform integer in ``[0, bounds[i])`` per element, in order.

    One double per draw (``floor(u * bound)``, each value's probability within
    2**-53 of ``1 / bound``): a batch consumes the random stream exactly like
    its samples drawn one at a time, at the cost of one vectorised call.
    """
    j = (rng.random(len(bounds)) * bounds).astype(np.int64)
    return np.minimum(j, bounds - 1, out=j)


def rank_within(keys: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements have the same key."""
    n = len(keys)
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64) - np.searchsorted(ordered, ordered)
    return rank


def last_writes(batch_index: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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



def apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers summing to ``total``, proportional to ``weights`` (largest
    remainders, the first index first among equals)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones(len(weights))
    exact = total * weights / weights.sum()
    out = np.floor(exact).astype(np.int64)
    short = int(total - out.sum())
    if short > 0:
        out[np.argsort(-(exact - out), kind="stable")[:short]] += 1
    return out


def stripes(counts: np.ndarray) -> np.ndarray:
    """A sequence holding ``j`` exactly ``counts[j]`` times, each ``j``
    spread evenly over it."""
    counts = np.asarray(counts, dtype=np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    position = (np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts) + 0.5) \
        / np.repeat(np.maximum(counts, 1), counts)
    return owner[np.lexsort((owner, position))]


def stored_labels(states: list[dict]) -> np.ndarray:
    """The labels of every sample the (validated) policy ``states`` hold,
    state by state, slot by slot."""
    return np.concatenate([np.empty(0, np.int64)]
                          + [s["slot_labels"][: s["size"]] for s in states])


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
        # Tasks (task-aware replay): the current task's index, and the task
        # in which each slot's sample was stored.
        self.task = 0
        self.slot_task = np.zeros(self.capacity, dtype=np.int64)

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
        batch_index, slots = last_writes(*self._decide(labels))
        self.num_seen += len(labels)
        self.slot_labels[slots] = labels[batch_index]
        self.slot_task[slots] = self.task
        return batch_index, slots

    def end_task(self) -> None:
        """The current task ended: its samples become earlier-task samples."""
        self.task += 1

    def earlier_task_slots(self) -> np.ndarray:
        """The occupied slots stored before the current task, increasing."""
        return np.flatnonzero(self.slot_task[: self.size] < self.task).astype(np.int64)

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
                "num_seen": int(self.num_seen), "rng": self.rng.bit_generator.state,
                "task": int(self.task), "slot_task": self.slot_task.copy()}

    def validate_state(self, state) -> dict:
        """Checks a :meth:`state_dict` completely, without changing this
        policy; returns a normalised copy for :meth:`load_state_dict`.
        Raises ValueError naming what is wrong."""
        if not isinstance(state, dict):
            raise ValueError(f"policy state must be a dict, got {type(state).__name__}")
        missing = sorted(set(self._state_keys()) - set(state))
        extra = sorted(set(state) - set(self._state_keys()) - set(_TASK_KEYS))
        if missing or extra:
            raise ValueError(f"policy state for {self.name!r}: missing keys {missing}, "
                             f"unexpected keys {extra}")
        size = check_int(state["size"], "policy size", 0, error=ValueError)
        if size > self.capacity:
            raise ValueError(f"policy size {size} is more than the capacity {self.capacity}")
        num_seen = check_int(state["num_seen"], "policy num_seen", 0, error=ValueError)
        if num_seen < size:
            raise ValueError(f"policy num_seen={num_seen} is less than its size {size}")
        if num_seen >= COUNTER_MAX:
            raise ValueError(f"policy num_seen={num_seen} is out of range [0, 2**62): no room "
                             "left to count offers")
        slot_labels = as_index_array(state["slot_labels"], "slot_labels", self.capacity)
        if (slot_labels[:size] < 0).any():
            bad = np.flatnonzero(slot_labels[:size] < 0)[:5]
            raise ValueError(f"slot_labels: occupied slots {bad.tolist()} hold negative labels "
                             f"{slot_labels[bad].tolist()}")
        if (slot_labels[size:] != -1).any():
            bad = size + np.flatnonzero(slot_labels[size:] != -1)[:5]
            raise ValueError(f"slot_labels: free slots {bad.tolist()} (size {size}) must hold -1")
        task, slot_task = self._validate_tasks(state, size)
        return {"slot_labels": slot_labels, "size": size, "num_seen": num_seen,
                "rng": check_rng_state(self.rng, state["rng"], "policy random state"),
                "task": task, "slot_task": slot_task}

    def _validate_tasks(self, state: dict, size: int) -> tuple[int, np.ndarray]:
        """The task bookkeeping of a state; a state without it (saved before
        tasks were recorded) is every sample from task 0, in task 0."""
        if "task" not in state and "slot_task" not in state:
            return 0, np.zeros(self.capacity, dtype=np.int64)
        if "task" not in state or "slot_task" not in state:
            raise ValueError("policy state: 'task' and 'slot_task' go together")
        task = check_int(state["task"], "policy task", 0, error=ValueError)
        if task >= COUNTER_MAX:
            raise ValueError(f"policy task={task} is out of range [0, 2**62)")
        slot_task = as_index_array(state["slot_task"], "slot_task", self.capacity)
        bad = np.flatnonzero((slot_task[:size] < 0) | (slot_task[:size] > task))[:5]
        if len(bad):
            raise ValueError(f"slot_task: occupied slots {bad.tolist()} hold tasks "
                             f"{slot_task[bad].tolist()} outside [0, {task}]")
        if (slot_task[size:] != 0).any():
            bad = size + np.flatnonzero(slot_task[size:] != 0)[:5]
            raise ValueError(f"slot_task: free slots {bad.tolist()} (size {size}) must hold 0")
        return task, slot_task

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
        self.task = valid["task"]
        self.slot_task = valid["slot_task"].copy()

    def state_from_samples(self, labels: np.ndarray, *, num_seen: int,
                           class_labels=None, class_seen=None) -> dict:
        """A state holding ``labels`` in slots ``0..len-1`` (a redistributed
        checkpoint), with this policy's random state."""
        labels = np.asarray(labels, dtype=np.int64)
        slot_labels = np.full(self.capacity, -1, dtype=np.int64)
        slot_labels[: len(labels)] = labels
        return {"slot_labels": slot_labels, "size": len(labels), "num_seen": int(num_seen),
                "rng": self.rng.bit_generator.state,
                "task": 0, "slot_task": np.zeros(self.capacity, dtype=np.int64)}

    # ------------------------------------------------------ redistribution
    def redistribute(self, states: list[dict], capacities, rank: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """This process's share of the samples of a checkpoint saved by
        another number of processes (or by buffers of other capacities), as
        this policy keeps them; changes nothing.

        ``states``: every saved process's policy state, validated by a policy
        of its kind and capacity; their stored samples are numbered state by
        state, slot by slot. ``capacities``: the capacity of every process
        loading the checkpoint; ``rank``: this one's; ``rng``: the same stream
        on every process (every process computes the same plan). Returns the
        numbers of the samples this process keeps, in the order of its slots,
        and the state that goes with them, with this policy's own random
        state (to validate, then :meth:`load_state_dict`).

        Here: all the samples when they fit, else a uniform random subsample,
        spread evenly over the processes in proportion to their capacities;
        the offers so far are shared out in proportion to the samples each
        process gets, so insertion continues as if one buffer had seen the
        whole stream. A policy with bookkeeping of its own overrides this.
        """
        labels = stored_labels(states)
        capacities = np.asarray(capacities, dtype=np.int64)
        total = int(min(capacities.sum(), len(labels)))
        kept = rng.choice(len(labels), size=total, replace=False)
        per_process = apportion(total, capacities)
        mine = kept[stripes(per_process) == rank]
        offered = sum(int(s["num_seen"]) for s in states)
        num_seen = apportion(offered, per_process if total else capacities)[rank]
        return mine, self.state_from_samples(labels[mine], num_seen=int(num_seen))
