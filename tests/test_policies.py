"""Insertion policies on the host: which offered samples are kept, and where.

The statistical tests run a policy alone on label arrays many times with fixed
seeds and compare inclusion counts with their expectation (chi-square); a
biased policy fails them, an unbiased one passes them for these seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from dali_rehearsal.policies import POLICIES, ClassBalanced, Reservoir, make_policy

RUNS = 2000
ALPHA = 1e-3


def _replay(policy, labels, batch_size):
    """Offers ``labels`` in batches; returns the arrival index stored in each
    occupied slot, applying the returned writes like the buffer does."""
    owner = np.full(policy.capacity, -1, dtype=np.int64)
    for start in range(0, len(labels), batch_size):
        batch = np.asarray(labels[start:start + batch_size], dtype=np.int64)
        batch_index, slots = policy.offer(batch)
        assert len(np.unique(slots)) == len(slots), "two writes into one slot in a batch"
        owner[slots] = start + batch_index
    return owner[: policy.size]


def _check_slot_labels(policy, labels, owner):
    """The policy's own record of slot labels agrees with what was written."""
    np.testing.assert_array_equal(policy.slot_labels[: policy.size], np.asarray(labels)[owner])


# --------------------------------------------------------------------------- reservoir
def test_reservoir_keeps_every_arrival_position_equally_often():
    capacity, n, batch = 10, 50, 7
    labels = np.arange(n) % 3
    counts = np.zeros(n, dtype=np.int64)
    for run in range(RUNS):
        policy = Reservoir(capacity, np.random.default_rng(run))
        owner = _replay(policy, labels, batch)
        assert policy.size == capacity and policy.num_seen == n
        assert len(set(owner.tolist())) == capacity     # each slot holds a distinct sample
        counts[owner] += 1
        if run < 20:
            _check_slot_labels(policy, labels, owner)
    expected = RUNS * capacity / n
    assert counts.sum() == RUNS * capacity
    assert chisquare(counts, np.full(n, expected)).pvalue > ALPHA
    # early samples are not favoured over late ones (and vice versa)
    assert abs(counts[: n // 2].mean() - counts[n // 2:].mean()) < 0.1 * expected


def test_reservoir_fills_before_replacing():
    policy = Reservoir(5, np.random.default_rng(0))
    batch_index, slots = policy.offer(np.array([4, 3, 2]))
    np.testing.assert_array_equal(batch_index, [0, 1, 2])
    np.testing.assert_array_equal(slots, [0, 1, 2])
    assert policy.size == 3
    batch_index, slots = policy.offer(np.array([1, 0]))
    np.testing.assert_array_equal(slots, [3, 4])
    assert policy.size == 5 and policy.num_seen == 5
    np.testing.assert_array_equal(policy.slot_labels, [4, 3, 2, 1, 0])


# ---------------------------------------------------------------------- class_balanced
def _class_stream(task_classes, per_class, rng):
    """Tasks in order; within a task, that task's classes interleaved at random."""
    labels = []
    for classes in task_classes:
        task = np.repeat(np.asarray(classes), per_class)
        labels.extend(rng.permutation(task).tolist())
    return np.asarray(labels, dtype=np.int64)


def _shares(capacity, classes):
    base, extra = divmod(capacity, len(classes))
    return {c: base + (1 if i < extra else 0) for i, c in enumerate(classes)}


def test_class_balanced_equal_shares_as_classes_arrive():
    capacity, per_class = 20, 30
    tasks = [(3, 1), (0, 4), (2,)]
    labels = _class_stream(tasks, per_class, np.random.default_rng(1))
    policy = ClassBalanced(capacity, np.random.default_rng(2))
    seen_classes: list[int] = []
    start = 0
    for classes in tasks:
        n = per_class * len(classes)
        task_labels = labels[start:start + n]
        for k in range(0, n, 8):
            policy.offer(task_labels[k:k + 8])
        start += n
        for c in task_labels:
            if int(c) not in seen_classes:
                seen_classes.append(int(c))
        assert policy.size == capacity
        # every class seen so far holds exactly its share (remainder to the first seen)
        assert policy.class_counts() == _shares(capacity, seen_classes)
    assert policy.class_counts() == {3: 4, 1: 4, 0: 4, 4: 4, 2: 4}


def test_class_balanced_within_class_sample_is_uniform_after_redivision():
    """Class 0 arrives in task 1 (share 6 of 12), then loses half its share to
    class 1 (task 2) and a third to class 2 (task 3). Its kept samples must
    still be a uniform sample of all class-0 samples offered, in both halves
    of task 1 and in task 3 (where class 0 comes back)."""
    capacity = 12
    n0_task1, n_task2, n0_task3 = 24, 20, 12
    counts = np.zeros(n0_task1 + n0_task3, dtype=np.int64)
    share_counts = []
    for run in range(RUNS):
        rng = np.random.default_rng(10_000 + run)
        labels = np.concatenate([
            np.zeros(n0_task1, np.int64),
            np.ones(n_task2, np.int64),
            rng.permutation(np.repeat([0, 2], n0_task3)),
        ])
        policy = ClassBalanced(capacity, np.random.default_rng(run))
        owner = _replay(policy, labels, 5)
        if run < 20:
            _check_slot_labels(policy, labels, owner)
        share_counts.append(tuple(sorted(policy.class_counts().items())))
        # arrival positions of class-0 samples -> their index among class-0 samples
        class0 = np.flatnonzero(labels == 0)
        rank_of = {int(p): k for k, p in enumerate(class0)}
        for p in owner[labels[owner] == 0]:
            counts[rank_of[int(p)]] += 1
    assert set(share_counts) == {((0, 4), (1, 4), (2, 4))}
    expected = RUNS * 4 / len(counts)
    assert chisquare(counts, np.full(len(counts), expected)).pvalue > ALPHA


def test_class_balanced_new_class_evicts_from_over_share_class():
    policy = ClassBalanced(12, np.random.default_rng(0))
    policy.offer(np.zeros(12, np.int64))
    assert policy.class_counts() == {0: 12}
    slots_before = set(range(12))
    for k in range(1, 7):
        batch_index, slots = policy.offer(np.array([1]))
        assert len(slots) == 1 and int(slots[0]) in slots_before   # an evicted slot, reused
        assert policy.size == 12
        assert policy.class_counts() == {0: 12 - k, 1: k}
    # class 1 is at its share now: further class-1 samples replace class-1 samples only
    for _ in range(20):
        policy.offer(np.array([1]))
        assert policy.class_counts() == {0: 6, 1: 6}
    # a third class takes 4 from each: the class furthest over its share is evicted first
    policy.offer(np.array([2]))
    counts = policy.class_counts()
    assert counts[2] == 1 and sorted([counts[0], counts[1]]) == [5, 6]
    policy.offer(np.full(30, 2, np.int64))
    assert policy.class_counts() == {0: 4, 1: 4, 2: 4}


def test_class_balanced_remainder_goes_to_first_classes():
    policy = ClassBalanced(10, np.random.default_rng(0))
    policy.offer(np.repeat([7, 5, 9], 10))
    assert policy.class_counts() == {7: 4, 5: 3, 9: 3}


def test_class_balanced_more_classes_than_capacity():
    policy = ClassBalanced(3, np.random.default_rng(0))
    policy.offer(np.arange(6))
    assert policy.size == 3
    assert sum(policy.class_counts().values()) == 3
    assert set(policy.class_counts()) <= set(range(6))


# ------------------------------------------------------------------------ both policies
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_batch_offer_equals_one_by_one_offer_later_samples_win(name):
    """Offering a batch whose samples collide in slots returns each slot once,
    with the batch's LAST sample for that slot, and leaves the policy in the
    same state as offering the samples one at a time."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, size=400)
    batched = make_policy(name, 6, np.random.default_rng(7))
    single = make_policy(name, 6, np.random.default_rng(7))
    collisions = 0
    for start in range(0, len(labels), 100):
        batch = labels[start:start + 100]
        batch_index, slots = batched.offer(batch)
        assert len(np.unique(slots)) == len(slots)
        assert np.all(np.diff(batch_index) > 0)          # unique, in batch order
        last_writer = {}
        for i, label in enumerate(batch):
            bi, sl = single.offer(np.array([label]))
            if len(sl):
                if int(sl[0]) in last_writer:
                    collisions += 1
                last_writer[int(sl[0])] = i
        assert dict(zip(slots.tolist(), batch_index.tolist())) == last_writer
        np.testing.assert_array_equal(batched.slot_labels, single.slot_labels)
        np.testing.assert_array_equal(batch[batch_index], batched.slot_labels[slots])
    assert collisions > 0, "the stream must make samples of one batch collide in a slot"
    assert batched.size == single.size == 6 and batched.num_seen == single.num_seen == 400


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_same_seed_same_decisions(name):
    labels = np.random.default_rng(3).integers(0, 5, size=300)
    runs = []
    for seed in (11, 11, 12):
        policy = make_policy(name, 10, np.random.default_rng(seed))
        runs.append(_replay(policy, labels, 9))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fifo", 10, np.random.default_rng(0))


def test_class_balanced_uses_free_slots_before_dropping_anything():
    """No sample is dropped while the buffer has room, even when one class is
    over its share; the share is enforced once other classes need slots."""
    policy = ClassBalanced(12, np.random.default_rng(0))
    labels = np.array([0] * 3 + [1] * 9 + [1] * 5, dtype=np.int64)   # class 1 floods in
    for k, label in enumerate(labels[:12], start=1):
        policy.offer(np.array([label]))
        assert policy.size == k                       # everything kept while there is room
    assert policy.class_counts() == {0: 3, 1: 9}
    policy.offer(labels[12:])                         # full: class 1 is now a reservoir of 9
    assert policy.size == 12 and policy.class_counts() == {0: 3, 1: 9}
    policy.offer(np.array([0, 0, 0, 2, 2, 2, 2], dtype=np.int64))
    # three classes share 12 slots: class 0 and 2 took their 4 from class 1
    assert policy.class_counts() == {0: 4, 1: 4, 2: 4}


# ------------------------------------------------------- vectorised = one at a time
class _SequentialReference:
    """The policies' documented decisions, one sample at a time, in plain
    Python: the vectorised policies must take exactly these decisions with the
    same random stream, for any batching."""

    def __init__(self, name, capacity, rng):
        self.name, self.capacity, self.rng = name, capacity, rng
        self.size = self.num_seen = 0
        self.order, self.seen, self.lists, self.quota = [], {}, {}, {}

    def _below(self, bound):
        return min(int(self.rng.random() * bound), bound - 1)

    def _shuffle_over_share(self):
        for c in self.order:
            if len(self.lists[c]) > self.quota[c]:
                self.lists[c] = self.rng.permutation(np.array(self.lists[c], np.int64)).tolist()

    def offer_one(self, label):
        self.num_seen += 1
        if self.name == "reservoir":
            if self.size < self.capacity:
                self.size += 1
                return self.size - 1
            j = self._below(self.num_seen)
            return j if j < self.capacity else -1
        if label not in self.seen:
            self.order.append(label)
            self.seen[label], self.lists[label] = 0, []
            base, extra = divmod(self.capacity, len(self.order))
            self.quota = {c: base + (i < extra) for i, c in enumerate(self.order)}
            if self.size == self.capacity:
                self._shuffle_over_share()
        self.seen[label] += 1
        mine = self.lists[label]
        if self.size < self.capacity:
            mine.append(self.size)
            self.size += 1
            if self.size == self.capacity:
                self._shuffle_over_share()
            return mine[-1] if mine else self.size - 1
        if len(mine) < self.quota[label]:
            giver = max(self.order, key=lambda c: len(self.lists[c]) - self.quota[c])
            mine.append(self.lists[giver].pop())       # the end of a shuffled list
            return mine[-1]
        if self.quota[label] == 0:
            return -1
        j = self._below(self.seen[label])
        return mine[j] if j < len(mine) else -1


def _label_streams():
    rng = np.random.default_rng(42)
    tasks = np.concatenate([rng.permutation(np.repeat([2 * t, 2 * t + 1], 60)) for t in range(5)])
    return {
        "class-incremental": tasks,
        "random-4-classes": rng.integers(0, 4, 500),
        "more-classes-than-slots": rng.integers(0, 15, 400),
        "large-and-small-labels": rng.choice([3, 70_000, 2**40, 9, 2**62], 400),
        # labels at and just past the edges of the label -> class lookup table
        "labels-at-the-table-edge": np.concatenate([rng.choice([0, 63, 64], 100),
                                                    rng.choice([0, 63, 64, 65, 127, 128,
                                                                65_535, 65_536], 300)]),
        "one-class-floods-then-new-ones": np.concatenate([np.zeros(80, np.int64),
                                                          rng.integers(0, 6, 300)]),
    }


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("stream", sorted(_label_streams()))
@pytest.mark.parametrize("capacity", [1, 7, 24])
def test_vectorised_offer_takes_the_sequential_decisions(name, stream, capacity):
    """Random batch sizes (1 to 70): every batch's writes are the last write
    per slot of the one-at-a-time reference, and the state agrees after it."""
    labels = _label_streams()[stream]
    policy = make_policy(name, capacity, np.random.default_rng(3))
    reference = _SequentialReference(name, capacity, np.random.default_rng(3))
    sizes = np.random.default_rng(capacity).integers(1, 71, size=len(labels))
    start = 0
    while start < len(labels):
        batch = labels[start:start + int(sizes[start])]
        batch_index, slots = policy.offer(batch)
        last = {}
        for i, label in enumerate(batch.tolist()):
            slot = reference.offer_one(label)
            if slot >= 0:
                last.pop(slot, None)
                last[slot] = i
        expected = sorted((i, s) for s, i in last.items())
        assert list(zip(batch_index.tolist(), slots.tolist())) == expected
        assert policy.size == reference.size and policy.num_seen == reference.num_seen
        start += len(batch)
    if name == "class_balanced":
        assert policy.class_counts() == {c: len(s) for c, s in reference.lists.items() if s}
        for c, members in reference.lists.items():
            np.testing.assert_array_equal(policy.slot_labels[members], c)


@pytest.mark.parametrize("stream", ["class-incremental", "one-class-floods-then-new-ones"])
def test_vectorised_offer_with_slot_lists_compacted_at_every_growth(stream, monkeypatch):
    """The per-class slot lists move and are compacted as classes grow: the
    decisions stay those of the reference."""
    monkeypatch.setattr(ClassBalanced, "_ARENA_SLACK", 0)
    test_vectorised_offer_takes_the_sequential_decisions("class_balanced", stream, 24)


def test_class_balanced_large_batches_keep_over_share_classes_uniform():
    """Large batches in which a new class takes slots from an over-share class
    while that class's own samples keep arriving in the same batch: the kept
    class-0 samples stay a uniform sample of every class-0 sample offered."""
    capacity, batch = 16, 40
    n0_alone, n_mixed = 40, 80
    counts = np.zeros(n0_alone + n_mixed // 2, dtype=np.int64)
    for run in range(RUNS):
        rng = np.random.default_rng(50_000 + run)
        labels = np.concatenate([np.zeros(n0_alone, np.int64),
                                 rng.permutation(np.repeat([0, 1], n_mixed // 2))])
        policy = ClassBalanced(capacity, np.random.default_rng(run))
        owner = _replay(policy, labels, batch)
        if run < 20:
            _check_slot_labels(policy, labels, owner)
        assert policy.class_counts() == {0: 8, 1: 8}
        class0 = np.flatnonzero(labels == 0)
        rank_of = np.full(len(labels), -1)
        rank_of[class0] = np.arange(len(class0))
        counts[rank_of[owner[labels[owner] == 0]]] += 1
    expected = RUNS * 8 / len(counts)
    assert chisquare(counts, np.full(len(counts), expected)).pvalue > ALPHA


# ------------------------------------------------------------------------ state
def _used(name, seed=0, n=300, capacity=20):
    policy = make_policy(name, capacity, np.random.default_rng(seed))
    labels = np.random.default_rng(seed + 1).integers(0, 6, n)
    for k in range(0, n, 13):
        policy.offer(labels[k:k + 13])
    return policy


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_state_round_trip_continues_with_the_same_decisions(name):
    original = _used(name)
    state = original.state_dict()
    for value in state.values():      # arrays and plain values only
        assert isinstance(value, (np.ndarray, int, dict)), type(value)
    restored = make_policy(name, 20, np.random.default_rng(99))
    restored.load_state_dict(state)
    assert restored.class_counts() == original.class_counts()
    labels = np.random.default_rng(7).integers(0, 8, 200)
    for k in range(0, 200, 11):
        a, b = original.offer(labels[k:k + 11]), restored.offer(labels[k:k + 11])
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(original.slot_labels, restored.slot_labels)


def _tampered(name):
    """(description, state changer) pairs for a used policy's state."""
    def set_(key, value):
        def change(state):
            state[key] = value
        return change

    def edit(key, fn):
        def change(state):
            state[key] = fn(state[key].copy())
        return change

    def at(index, value):
        def fn(a):
            a[index] = value
            return a
        return fn

    cases = [
        ("size beyond capacity", set_("size", 21)),
        ("negative size", set_("size", -1)),
        ("negative num_seen", set_("num_seen", -5)),
        ("num_seen below size", set_("num_seen", 3)),
        ("negative label in a slot", edit("slot_labels", at(2, -4))),
        ("label in a free slot", set_("size", 19)),
        ("slot_labels too short", edit("slot_labels", lambda a: a[:-1])),
        ("slot_labels of floats", edit("slot_labels", lambda a: a.astype(np.float64))),
        ("bad random state", edit("rng", lambda r: {**r, "bit_generator": "MT19937"})),
        ("random state of a wrong type", set_("rng", [1, 2, 3])),
        ("missing key", lambda state: state.pop("num_seen")),
        ("unexpected key", set_("surprise", 1)),
    ]
    if name == "class_balanced":
        cases += [
            ("label disagrees with its class", edit("slot_labels", at(0, 99))),
            ("slot listed twice", edit("class_slots", at(1, 0))),
            ("slot out of range", edit("class_slots", at(0, 999))),
            ("negative class count", edit("class_counts", at(0, -1))),
            ("count above seen", edit("class_seen", at(0, 0))),
            ("repeated class", edit("class_labels", at(1, 0))),
            ("seen not summing to num_seen", edit("class_seen", at(0, 10**6))),
        ]
    return cases


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_invalid_states_are_rejected_without_change(name):
    for description, change in _tampered(name):
        policy = _used(name, seed=5)
        before = policy.state_dict()
        state = _used(name, seed=6).state_dict()
        change(state)
        with pytest.raises(ValueError):
            policy.load_state_dict(state)
            pytest.fail(f"accepted: {description}")
        after = policy.state_dict()
        for key in before:
            np.testing.assert_array_equal(np.asarray(before[key], dtype=object),
                                          np.asarray(after[key], dtype=object), err_msg=key)
        policy.load_state_dict(_used(name, seed=6).state_dict())   # a good state still loads
        assert policy.class_counts() == _used(name, seed=6).class_counts()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_state_from_samples_is_a_valid_state(name):
    policy = make_policy(name, 10, np.random.default_rng(0))
    labels = np.array([4, 1, 4, 4, 2, 1], np.int64)
    state = policy.state_from_samples(labels, num_seen=40, class_labels=[1, 4, 2, 8],
                                      class_seen=[10, 20, 5, 5])
    policy.load_state_dict(state)
    assert policy.size == 6 and policy.num_seen == 40
    assert policy.class_counts() == {1: 2, 2: 1, 4: 3}
    np.testing.assert_array_equal(policy.slot_labels[:6], labels)
    policy.offer(np.full(30, 8, np.int64))          # free slots first, then shares
    assert policy.size == 10


# ------------------------------------------------------------ redistribution
def _saved_states(name, capacities, seed):
    """The policy states of ``len(capacities)`` processes fed different streams
    (classes 0..5, unevenly: some classes are rare)."""
    rng = np.random.default_rng(seed)
    states = []
    for p, capacity in enumerate(capacities):
        policy = make_policy(name, capacity, np.random.default_rng([seed, p]))
        for _ in range(12):
            policy.offer(rng.choice(6, size=7, p=[0.4, 0.3, 0.15, 0.1, 0.04, 0.01]))
        states.append(policy.validate_state(policy.state_dict()))
    return states


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("saved, loading", [((30, 30), (20, 20, 20)), ((30, 30, 30), (25,)),
                                            ((12, 40), (7, 9)), ((8,), (50, 50))])
def test_redistribute_shares_out_every_sample_once(name, saved, loading):
    """Every loading process computes its share from the same stream: the
    shares are disjoint, each fits its capacity, together they keep all the
    samples when they fit (else as many as fit), every state is valid with the
    loading policy's own random state, and the offers so far are all shared
    out (per class for class_balanced)."""
    states = _saved_states(name, saved, seed=3)
    labels = np.concatenate([s["slot_labels"][: s["size"]] for s in states])
    offered = sum(s["num_seen"] for s in states)
    kept, seen, per_class_seen = [], 0, {}
    for rank, capacity in enumerate(loading):
        policy = make_policy(name, capacity, np.random.default_rng(100 + rank))
        mine, state = policy.redistribute(states, loading, rank, np.random.default_rng(7))
        valid = policy.validate_state(state)
        assert valid["rng"] == policy.rng.bit_generator.state
        assert len(mine) == valid["size"] <= capacity
        np.testing.assert_array_equal(valid["slot_labels"][: len(mine)], labels[mine])
        kept.extend(mine.tolist())
        seen += valid["num_seen"]
        if name == "class_balanced":
            for c, n in zip(valid["class_labels"].tolist(), valid["class_seen"].tolist()):
                per_class_seen[c] = per_class_seen.get(c, 0) + n
    assert len(set(kept)) == len(kept) == min(len(labels), sum(loading))
    assert seen == offered
    if name == "class_balanced":
        saved_seen = {}
        for s in states:
            for c, n in zip(s["class_labels"].tolist(), s["class_seen"].tolist()):
                saved_seen[c] = saved_seen.get(c, 0) + n
        assert per_class_seen == saved_seen


def test_class_balanced_redistribution_gives_equal_shares_per_class():
    """Fewer slots than samples: each class gets an equal share of the new
    total (a rare class keeps all it has), whatever its share in the saved
    shards."""
    states = _saved_states("class_balanced", (30, 30, 30), seed=4)
    labels = np.concatenate([s["slot_labels"][: s["size"]] for s in states])
    available = {c: int((labels == c).sum()) for c in np.unique(labels).tolist()}
    counts: dict[int, int] = {}
    for rank in range(2):
        policy = make_policy("class_balanced", 12, np.random.default_rng(rank))
        mine, _ = policy.redistribute(states, [12, 12], rank, np.random.default_rng(0))
        for c in labels[mine].tolist():
            counts[c] = counts.get(c, 0) + 1
    assert sum(counts.values()) == 24
    cut = [c for c, n in available.items() if counts.get(c, 0) < n]
    top = max(counts.values())
    # a class that lost samples holds as many as any other class (within one)
    assert cut and all(counts[c] >= top - 1 for c in cut)
    # and a rare class (fewer samples than the others' share) keeps all of them
    rare = [c for c, n in available.items() if c not in cut]
    assert rare and all(available[c] < top for c in rare)


def test_a_new_policy_keeps_what_its_redistribute_chooses(tmp_path, monkeypatch):
    """A policy added without touching the checkpoint code: its own
    ``redistribute`` decides what an elastic load keeps (here: the samples
    with the smallest labels, in order)."""
    import dali_rehearsal as dr
    from dali_rehearsal.policies import Reservoir

    class SmallestLabels(Reservoir):
        name = "smallest_labels"

        def redistribute(self, states, capacities, rank, rng):
            labels = np.concatenate([s["slot_labels"][: s["size"]] for s in states])
            order = np.argsort(labels, kind="stable")[: sum(capacities)]
            mine = order[rank::len(capacities)][: capacities[rank]]
            seen = sum(s["num_seen"] for s in states) // len(capacities)
            return mine, self.state_from_samples(labels[mine], num_seen=max(seen, len(mine)))

    monkeypatch.setitem(POLICIES, SmallestLabels.name, SmallestLabels)
    settings = dict(num_representatives=2, device="cpu", policy="smallest_labels")
    saved = dr.RehearsalBuffer(capacity=20, seed=0, **settings)
    rng = np.random.default_rng(0)
    for _ in range(6):
        labels = rng.integers(0, 50, 8)
        saved.mix(labels.astype(np.float32)[:, None], labels)
    saved.save(tmp_path / "c")
    smallest = np.sort(saved.stored_labels())[:5]
    loaded = dr.RehearsalBuffer(capacity=5, seed=1, **settings)
    loaded.load(tmp_path / "c", resize=True)
    np.testing.assert_array_equal(loaded.stored_labels(), smallest)
    np.testing.assert_array_equal(loaded.stored(0)[:, 0], smallest.astype(np.float32))


# ------------------------------------------------------------- many classes
class _ManyClassesReference:
    """class_balanced as documented, one sample at a time, every share and
    every excess recomputed over all classes at each decision (NumPy arrays:
    straightforward, and fast enough for thousands of classes)."""

    def __init__(self, capacity, rng, max_classes):
        self.capacity, self.rng = capacity, rng
        self.size = 0
        self.index, self.lists = {}, []
        self.count = np.zeros(max_classes, np.int64)
        self.seen = np.zeros(max_classes, np.int64)

    def _quota(self):
        k = len(self.lists)
        base, extra = divmod(self.capacity, k)
        return base + (np.arange(k) < extra)

    def _shuffle_over_share(self):
        over = np.flatnonzero(self.count[: len(self.lists)] > self._quota())
        for c in over.tolist():          # in order of first appearance
            self.lists[c] = self.rng.permutation(np.array(self.lists[c], np.int64)).tolist()

    def offer_one(self, label):
        c = self.index.get(label)
        if c is None:
            c = self.index[label] = len(self.lists)
            self.lists.append([])
            if self.size == self.capacity:
                self._shuffle_over_share()
        self.seen[c] += 1
        if self.size < self.capacity:
            self.lists[c].append(self.size)
            self.count[c] += 1
            self.size += 1
            if self.size == self.capacity:
                self._shuffle_over_share()
            return self.size - 1
        quota = self._quota()
        if self.count[c] < quota[c]:
            giver = int(np.argmax(self.count[: len(self.lists)] - quota))   # first among equals
            slot = self.lists[giver].pop()
            self.count[giver] -= 1
            self.lists[c].append(slot)
            self.count[c] += 1
            return slot
        if quota[c] == 0:
            return -1
        j = min(int(self.rng.random() * self.seen[c]), int(self.seen[c]) - 1)
        return self.lists[c][j] if j < self.count[c] else -1


def _many_class_streams():
    rng = np.random.default_rng(8)
    n = 6000
    return {
        # every label new, small and large ones (past the lookup table)
        "every-label-new": rng.permutation(np.concatenate([
            rng.choice(60_000, 2000, replace=False),
            70_000 + rng.choice(10**12, 2000, replace=False)])),
        # new classes keep arriving while the old ones recur: classes seen
        # grow past the capacity
        "growing-label-space": (rng.random(n) * (1 + np.arange(n) // 2)).astype(np.int64),
        # 62-bit labels, a few frequent, most rare (about 900 classes)
        "skewed-large-labels": rng.integers(0, 2**62, 5000)[
            np.minimum(rng.zipf(1.1, n), 5000) - 1],
    }


@pytest.mark.parametrize("stream", sorted(_many_class_streams()))
@pytest.mark.parametrize("capacity", [300, 2500])
def test_class_balanced_decisions_at_many_classes_match_the_reference(stream, capacity):
    """Thousands of classes, below and beyond the capacity, random batch sizes
    (1 to 200), and a state round trip half way: every batch's writes, the
    classes' slots and the random stream are those of the reference."""
    labels = _many_class_streams()[stream].astype(np.int64)
    policy = ClassBalanced(capacity, np.random.default_rng(4))
    reference = _ManyClassesReference(capacity, np.random.default_rng(4), len(np.unique(labels)))
    sizes = np.random.default_rng(capacity).integers(1, 201, size=len(labels))
    start, restored = 0, False
    while start < len(labels):
        if not restored and start >= len(labels) // 2:
            fresh = ClassBalanced(capacity, np.random.default_rng(99))
            fresh.load_state_dict(policy.state_dict())
            policy, restored = fresh, True
        batch = labels[start:start + int(sizes[start])]
        batch_index, slots = policy.offer(batch)
        last = {}
        for i, label in enumerate(batch.tolist()):
            slot = reference.offer_one(label)
            if slot >= 0:
                last.pop(slot, None)
                last[slot] = i
        assert list(zip(batch_index.tolist(), slots.tolist())) == sorted(
            (i, s) for s, i in last.items()), f"batch at {start}"
        start += len(batch)
    assert policy.size == reference.size == capacity
    assert len(policy.class_labels) == len(reference.lists)
    labels_of = {c: label for label, c in reference.index.items()}
    assert policy.class_counts() == {labels_of[c]: len(s) for c, s in
                                     enumerate(reference.lists) if s}
    for c, members in enumerate(reference.lists):
        np.testing.assert_array_equal(policy.slot_labels[members], labels_of[c])
    assert policy.rng.bit_generator.state == reference.rng.bit_generator.state
