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
